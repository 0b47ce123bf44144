"""Plans: the JSON decision a method writes and ``apply`` reads.

A plan is small, frozen, versioned, and carries its provenance (model, data, method, config,
moeslim version), so a plan computed on one machine applies on another.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import moeslim

PLAN_FORMAT = "moeslim.plan"
PLAN_VERSION = 1
PLAN_KINDS = ("prune", "skip", "quantize")


class PlanError(ValueError):
    """A plan that cannot be read or does not fit the model it is applied to."""


def config_hash(config: Any) -> str:
    """Hash of a model config's architecture keys (name-independent), for provenance checks."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    ignored = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype", "moeslim"}
    stable = {k: v for k, v in sorted(as_dict.items()) if k not in ignored and not k.startswith("_")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Provenance:
    """Where a plan came from."""

    model: str
    model_config_hash: str
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    data_hash: str | None = None
    moeslim_version: str = moeslim.__version__

    @classmethod
    def of(cls, model: Any, model_name: str | None, method: str, config: dict[str, Any], data: str | None,
           data_hash: str | None) -> Provenance:
        """Provenance of a plan computed on ``model`` (named by ``model_name``, else its path or class)."""
        name = model_name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        return cls(model=name, model_config_hash=config_hash(model.config), method=method, config=config,
                   data=data, data_hash=data_hash)


@dataclass(frozen=True)
class Plan:
    """One compression decision.

    ``layers`` maps a decoder-layer index to the per-layer decision:
    prune -> sorted kept expert ids; skip -> {"beta": float}; quantize -> {"bits": [int per expert]}.
    ``summary`` holds method-specific extras (losses of alternatives, skip rates, average bits).
    """

    kind: str
    layers: dict[int, Any]
    provenance: Provenance
    summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in PLAN_KINDS:
            raise PlanError(f"plan kind {self.kind!r} is not one of {', '.join(PLAN_KINDS)}")
        if not self.layers:
            raise PlanError("plan has no layers")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "kind": self.kind,
            "layers": {str(k): v for k, v in sorted(self.layers.items())},
            "summary": self.summary,
            "provenance": asdict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a moeslim plan (format={data.get('format')!r}, expected {PLAN_FORMAT!r})")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(
                f"plan version {data.get('version')} is not supported by moeslim {moeslim.__version__} "
                f"(reads version {PLAN_VERSION}); recompute the plan"
            )
        try:
            layers = {int(k): v for k, v in data["layers"].items()}
        except (KeyError, ValueError, AttributeError) as err:
            raise PlanError(f"plan layers are malformed: {err}") from err
        return cls(
            kind=data.get("kind", ""),
            layers=layers,
            provenance=Provenance(**data.get("provenance", {})),
            summary=data.get("summary", {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) so a killed run never leaves half a plan."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PlanError(f"plan file {path} is not valid JSON: {err}") from err
        return cls.from_dict(data)

