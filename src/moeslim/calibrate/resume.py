"""Resumable layer-wise runs: per-layer results and the next layer's inputs, written atomically.

After each decoder layer the runner writes the hidden states that feed the next layer
(``hidden-<layer>.rank<r>.safetensors``) and then, atomically, ``progress.rank<r>.json`` with every finished
layer's result. A killed run rerun with the same arguments (same ``key``) starts at the next layer with
exactly the stored inputs and results, so it ends with the same per-layer results (JSON floats round-trip
exactly); a different key starts over. Results must be JSON values (prune and skip decisions are).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch


def run_key(**parts: Any) -> str:
    """A short fingerprint of everything a run's results depend on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class LayerCheckpoint:
    """The resumable state of one run (one process of it) in ``folder``."""

    def __init__(self, folder: str | Path, key: str, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.key = key
        self.rank = rank
        self.resumed_from: int | None = None  # the first layer this run computed after resuming

    @property
    def _progress(self) -> Path:
        return self.folder / f"progress.rank{self.rank}.json"

    def _hidden(self, layer: int) -> Path:
        return self.folder / f"hidden-{layer}.rank{self.rank}.safetensors"

    def restore(self) -> tuple[dict[int, Any], int, list[torch.Tensor]] | None:
        """(results so far, last finished layer, its output per batch), or None to start from layer 0."""
        from safetensors.torch import load_file

        if not self._progress.is_file():
            return None
        state = json.loads(self._progress.read_text())
        if state.get("key") != self.key or not self._hidden(state["last"]).is_file():
            return None  # another run's state (different arguments): start over
        hidden = load_file(self._hidden(state["last"]))
        results = {int(k): v for k, v in state["results"].items()}
        self.resumed_from = int(state["last"]) + 1
        return results, int(state["last"]), [hidden[str(i)] for i in range(len(hidden))]

    def save_layer(self, layer: int, results: dict[int, Any], outputs: list[torch.Tensor]) -> None:
        """Record that ``layer`` is done: its output per batch first, then the results (the commit)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {str(i): t.contiguous() for i, t in enumerate(outputs)}
        _write_atomic(self._hidden(layer), lambda p: save_file(tensors, str(p)))
        payload = json.dumps({"key": self.key, "last": layer, "results": {str(k): v for k, v in results.items()}})
        _write_atomic(self._progress, lambda p: p.write_text(payload))
        for old in self.folder.glob(f"hidden-*.rank{self.rank}.safetensors"):
            if old != self._hidden(layer):
                old.unlink(missing_ok=True)

    def finish(self) -> None:
        """The run is complete: this process's state goes (the folder too, once every process's has)."""
        for path in self.folder.glob(f"*.rank{self.rank}.*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()
