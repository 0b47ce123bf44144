"""Is the Hugging Face Hub usable from here? Checked fast, so offline runs fail at once instead of hanging."""

from __future__ import annotations

import os
import socket
import threading

_HUB_HOST = ("huggingface.co", 443)
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """The user asked for offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(key, "").lower() in _TRUE for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _connect(host: tuple[str, int], timeout_s: float, answer: list[bool]) -> None:
    try:
        with socket.create_connection(host, timeout=timeout_s):
            answer.append(True)
    except OSError:
        answer.append(False)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when offline mode is set or the hub does not answer a TCP connection within ``timeout_s``.

    The deadline covers the name lookup too (``getaddrinfo`` has no timeout of its own, and where packets
    are silently dropped it, and one connect per resolved address, can take far longer), so the probe
    runs in a daemon thread that is abandoned at the deadline.
    """
    if hub_offline():
        return False
    answer: list[bool] = []
    probe = threading.Thread(target=_connect, args=(_HUB_HOST, timeout_s, answer), daemon=True)
    probe.start()
    probe.join(timeout_s)
    return bool(answer and answer[0])
