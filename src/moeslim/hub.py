"""Is the Hugging Face Hub usable from here? Checked fast, so offline runs fail at once instead of hanging."""

from __future__ import annotations

import os
import socket

_HUB_HOST = ("huggingface.co", 443)
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """The user asked for offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(key, "").lower() in _TRUE for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when offline mode is set or a TCP connection to the hub fails within ``timeout_s``."""
    if hub_offline():
        return False
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout_s):
            return True
    except OSError:
        return False
