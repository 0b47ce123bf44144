"""Resumable layer-wise runs: per-layer results and the next layer's inputs, written atomically.

After each decoder layer the runner writes the hidden states that feed the next layer
(``hidden-<layer>.rank<r>.safetensors``) and then, atomically, ``progress.rank<r>.json`` with every finished
layer's result. A killed run rerun with the same arguments (same ``key``) starts at the next layer with
exactly the stored inputs and results, so it ends with the same per-layer results (JSON floats round-trip
exactly); a different key starts over. Results are JSON values (prune and skip decisions), or tensors, tuples
and moeslim dataclasses of them (PMQ's ``LayerFactors``), stored exactly by ``encode`` / ``decode``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch


def run_key(**parts: Any) -> str:
    """A short fingerprint of everything a run's results depend on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode(value: Any) -> Any:
    """A JSON value that ``decode`` turns back into ``value`` exactly (tensors: values, dtype and shape)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().reshape(-1)
        # float32/bfloat16/float16 -> Python floats (float64) is exact, and so is the cast back.
        data = flat.double().tolist() if flat.is_floating_point() else flat.tolist()
        return {"__tensor__": str(value.dtype).removeprefix("torch."), "shape": list(value.shape), "data": data}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        return {"__dataclass__": f"{kind.__module__}:{kind.__qualname__}",
                "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):  # (non-string keys become strings, as in plain JSON)
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a resumable layer result cannot hold a {type(value).__name__}")


def decode(value: Any) -> Any:
    """Inverse of ``encode``; dataclasses are rebuilt only from moeslim's own modules."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        dtype = getattr(torch, value["__tensor__"])
        return torch.tensor(value["data"], dtype=torch.float64 if dtype.is_floating_point else dtype
                            ).to(dtype).reshape(value["shape"])
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__dataclass__" in value:
        module, _, name = value["__dataclass__"].partition(":")
        if module.split(".")[0] != "moeslim":
            raise ValueError(f"resume state names a class outside moeslim: {value['__dataclass__']}")
        kind: Any = importlib.import_module(module)
        for part in name.split("."):
            kind = getattr(kind, part)
        return kind(**{k: decode(v) for k, v in value["fields"].items()})
    return {k: decode(v) for k, v in value.items()}


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
        results = {int(k): decode(v) for k, v in state["results"].items()}
        self.resumed_from = int(state["last"]) + 1
        return results, int(state["last"]), [hidden[str(i)] for i in range(len(hidden))]

    def save_layer(self, layer: int, results: dict[int, Any], outputs: list[torch.Tensor]) -> None:
        """Record that ``layer`` is done: its output per batch first, then the results (the commit)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {str(i): t.contiguous() for i, t in enumerate(outputs)}
        _write_atomic(self._hidden(layer), lambda p: save_file(tensors, str(p)))
        encoded = {str(k): encode(v) for k, v in results.items()}
        payload = json.dumps({"key": self.key, "last": layer, "results": encoded})
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
