"""Plans: the JSON decision a method writes and ``apply`` reads.

A plan is small, frozen, versioned, and carries its provenance (model, data, method, config,
moeslim version), so a plan computed on one machine applies on another.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moeslim._package import __version__

PLAN_FORMAT = "moeslim.plan"
PLAN_VERSION = 1
PLAN_KINDS = ("prune", "skip", "quantize", "merge", "lowrank", "joint")
KEEP_WIDTH = 16  # a quantize plan's width for an expert left as it is


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
    moeslim_version: str = __version__

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
    prune -> sorted kept expert ids; skip -> {"beta": float}; quantize -> {"bits": [int per expert]};
    merge -> {"groups", "weights", "representatives"}; lowrank -> {"up_ranks", "down_ranks"} (ints per expert);
    joint -> {"kept": [expert ids], "bits": [one width per kept expert]} (prune, then quantize), and
    "skip_beta": float (>= 0, 0 skips nothing) when the plan skips (then skip, with the summary's ``skip_rule``).
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
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"not a moeslim plan: expected a JSON object, got a JSON {_json_kind(data)}")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a moeslim plan (format={data.get('format')!r}, expected {PLAN_FORMAT!r})")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(
                f"plan version {data.get('version')} is not supported by moeslim {__version__} "
                f"(reads version {PLAN_VERSION}); recompute the plan"
            )
        unknown = sorted(set(data) - _PLAN_KEYS)
        if unknown:
            raise PlanError(f"plan has unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_PLAN_KEYS))}")
        raw_layers = data.get("layers")
        if not isinstance(raw_layers, dict):
            raise PlanError(f"plan 'layers' must be an object {{layer index: decision}}, got {_json_kind(raw_layers)}")
        layers = {_layer_index(k): v for k, v in raw_layers.items()}
        kind = data.get("kind", "")
        if kind in _LAYER_CHECKS:
            for idx, entry in layers.items():
                _LAYER_CHECKS[kind](entry, f"layers.{idx}")
        summary = data.get("summary", {})
        if not isinstance(summary, dict):
            raise PlanError(f"plan 'summary' must be an object, got {_json_kind(summary)}")
        return cls(kind=kind, layers=layers, provenance=_provenance(data.get("provenance")),
                   summary=summary)

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) so a killed run never leaves half a plan."""
        from moeslim.outputs import write_text_atomic

        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PlanError(f"plan file {path} is not valid JSON: {err}") from err
        try:
            return cls.from_dict(data)
        except PlanError as err:
            raise PlanError(f"plan file {path}: {err}") from err



_PLAN_KEYS = {"format", "version", "kind", "layers", "summary", "provenance"}


# -- per-layer decisions: JSON types and ranges, checked when a plan is read (before any work) -----------------
# Model-dependent ranges (expert ids below the expert count, ranks below the projection's full rank) are checked
# by each applier against the model, also before any work.

def _layer_index(key: str) -> int:
    if not (key.isascii() and key.isdigit()):
        raise PlanError(f"plan 'layers' key {key!r} is not a decoder layer index (0, 1, ...)")
    return int(key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(value: Any, where: str, low: int = 0, allowed: str = "", ok: Any = None) -> list[int]:
    """A non-empty JSON array of integers >= ``low`` (and accepted by ``ok`` when given, ``allowed`` saying what)."""
    if not isinstance(value, list) or not value:
        got = f"{_json_kind(value)} {value!r}"[:120]
        raise PlanError(f"{where} must be a non-empty array of integers, got {got}")
    for i, item in enumerate(value):
        if not _is_int(item):
            raise PlanError(f"{where}[{i}] = {item!r} is not an integer")
        if item < low or (ok is not None and not ok(item)):
            raise PlanError(f"{where}[{i}] = {item} is out of range: {allowed or f'use {low} or more'}")
    return value


def _number(value: Any, where: str, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < low:
        raise PlanError(f"{where} = {value!r} must be a finite number >= {low:g}")
    return float(value)


def _fields(entry: Any, where: str, required: tuple[str, ...]) -> dict[str, Any]:
    """``entry`` is a JSON object with exactly the fields ``required``."""
    if not isinstance(entry, dict):
        got = f"{_json_kind(entry)} {entry!r}"[:120]
        raise PlanError(f"{where} must be an object with {', '.join(required)}, got {got}")
    missing = [name for name in required if name not in entry]
    unknown = sorted(set(entry) - set(required))
    if missing or unknown:
        what = f"lacks {', '.join(missing)}" if missing else f"has unknown field(s) {', '.join(unknown)}"
        raise PlanError(f"{where} {what}; expected {', '.join(required)}")
    return entry


def _check_prune(entry: Any, where: str) -> None:
    kept = _ints(entry, where, allowed="expert ids are 0 or more")
    if len(set(kept)) != len(kept):
        raise PlanError(f"{where} lists an expert more than once: {kept}")


def _check_skip(entry: Any, where: str) -> None:
    _number(_fields(entry, where, ("beta",))["beta"], f"{where}.beta")


def _check_quantize(entry: Any, where: str) -> None:
    if isinstance(entry, dict) and "gguf_types" in entry:
        types = _fields(entry, where, ("gguf_types",))["gguf_types"]
        if not isinstance(types, dict) or not all(isinstance(t, str) for t in types.values()):
            raise PlanError(f"{where}.gguf_types must map a projection to a llama.cpp type name, got {types!r}"[:200])
        return
    _ints(_fields(entry, where, ("bits",))["bits"], f"{where}.bits", low=1,
          allowed=f"widths are whole bits 1..8, or {KEEP_WIDTH} to keep an expert as it is",
          ok=lambda b: b <= 8 or b == KEEP_WIDTH)


def _check_merge(entry: Any, where: str) -> None:
    fields_ = _fields(entry, where, ("groups", "weights", "representatives"))
    for name in ("groups", "weights"):
        if not isinstance(fields_[name], list) or not fields_[name]:
            raise PlanError(f"{where}.{name} must be a non-empty array of arrays")
    for g, group in enumerate(fields_["groups"]):
        _ints(group, f"{where}.groups[{g}]", allowed="expert ids are 0 or more")
    for g, weights in enumerate(fields_["weights"]):
        if not isinstance(weights, list):
            raise PlanError(f"{where}.weights[{g}] must be an array of numbers")
        for i, w in enumerate(weights):
            _number(w, f"{where}.weights[{g}][{i}]")
    _ints(fields_["representatives"], f"{where}.representatives", allowed="expert ids are 0 or more")


def _check_lowrank(entry: Any, where: str) -> None:
    fields_ = _fields(entry, where, ("up_ranks", "down_ranks"))
    for name in ("up_ranks", "down_ranks"):
        _ints(fields_[name], f"{where}.{name}", allowed="ranks are 0 or more")


def _check_joint(entry: Any, where: str) -> None:
    names = ("skip_beta", "ranks")
    optional = tuple(name for name in names if isinstance(entry, dict) and name in entry)
    fields_ = _fields(entry, where, ("kept", "bits", *optional))
    if "skip_beta" in fields_:
        _number(fields_["skip_beta"], f"{where}.skip_beta")  # 0 skips nothing
    lowrank = "ranks" in fields_
    _check_prune(fields_["kept"], f"{where}.kept")
    _check_quantize({"bits": fields_["bits"]}, where)
    if len(fields_["bits"]) != len(fields_["kept"]):
        raise PlanError(f"{where}: {len(fields_['kept'])} kept experts but {len(fields_['bits'])} widths; give one "
                        "width per kept expert")
    if lowrank:
        _check_joint_ranks(fields_, where)


def _check_joint_ranks(fields_: dict[str, Any], where: str) -> None:
    """A low-rank layer of a joint plan: per kept expert null (dense) or [up rank, down rank], every width 16."""
    ranks = fields_["ranks"]
    if not isinstance(ranks, list) or len(ranks) != len(fields_["kept"]):
        raise PlanError(f"{where}.ranks must be an array with one entry per kept expert ({len(fields_['kept'])}): "
                        f"null (dense) or [up rank, down rank], got {ranks!r}"[:200])
    for i, pair in enumerate(ranks):
        if pair is not None:
            _ints(pair, f"{where}.ranks[{i}]", low=1, allowed="ranks are 1 or more")
            if len(pair) != 2:
                raise PlanError(f"{where}.ranks[{i}] = {pair!r}: give [up rank, down rank] or null")
    if any(b != KEEP_WIDTH for b in fields_["bits"]):
        raise PlanError(f"{where}: a low-rank layer (with ranks) keeps every width at {KEEP_WIDTH}; the runtime holds "
                        "a layer's experts low-rank or quantized, not both")


_LAYER_CHECKS = {"prune": _check_prune, "skip": _check_skip, "quantize": _check_quantize, "merge": _check_merge,
                 "lowrank": _check_lowrank, "joint": _check_joint}


def _json_kind(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _provenance(raw: Any) -> Provenance:
    """Provenance from its JSON object: every required key present, no unknown key, types checked."""
    if not isinstance(raw, dict):
        raise PlanError(f"plan 'provenance' must be an object, got {_json_kind(raw)}; recompute the plan")
    known = {f.name: f for f in fields(Provenance)}
    required = [name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise PlanError(f"plan provenance lacks {', '.join(missing)}; recompute the plan with moeslim plan")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise PlanError(f"plan provenance has unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    for name in ("model", "model_config_hash", "method", "moeslim_version"):
        if name in raw and not isinstance(raw[name], str):
            raise PlanError(f"plan provenance {name} must be a string, got {_json_kind(raw[name])}")
    for name in ("data", "data_hash"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise PlanError(f"plan provenance {name} must be a string or null, got {_json_kind(raw[name])}")
    if not isinstance(raw.get("config", {}), dict):
        raise PlanError(f"plan provenance config must be an object, got {_json_kind(raw['config'])}")
    return Provenance(**raw)
