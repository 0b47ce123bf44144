"""Calibration samples from one or more sources, with provenance for the plan."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from moeslim.config import CalibrationConfig, ConfigError, from_mapping
from moeslim.data.sources import load_source
from moeslim.data.windows import token_windows


@dataclass(frozen=True)
class CalibrationSet:
    input_ids: torch.Tensor  # (N, L)
    name: str
    content_hash: str
    config: CalibrationConfig | None = None  # how the set was drawn (recorded in plans, to redraw it)


def build_calibration_set(config: CalibrationConfig, tokenizer: PreTrainedTokenizerBase) -> CalibrationSet:
    """Draw ``samples`` windows split evenly across the sources (remainder to the first ones)."""
    sources = [load_source(spec, split="calibration") for spec in config.data]
    share, extra = divmod(config.samples, len(sources))
    parts = []
    for i, source in enumerate(sources):
        count = share + (1 if i < extra else 0)
        if count:
            parts.append(token_windows(source, tokenizer, config.seq_len, count, seed=config.seed + i,
                                       spacing=config.spacing))
    name = "+".join(s.name for s in sources)
    content_hash = "+".join(s.content_hash for s in sources)
    return CalibrationSet(input_ids=torch.cat(parts), name=name, content_hash=content_hash, config=config)


def windows_hash(input_ids: torch.Tensor) -> str:
    """Hash of the token windows themselves (N, L): equal only for the very same ids in the same order."""
    return hashlib.sha256(input_ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def calibration_fields(calibration: CalibrationSet | torch.Tensor) -> tuple[torch.Tensor, str, str]:
    """(input_ids (N, L), data name, content hash) of a CalibrationSet or of raw input ids."""
    if isinstance(calibration, CalibrationSet):
        return calibration.input_ids, calibration.name, calibration.content_hash
    ids = torch.as_tensor(calibration)
    if ids.ndim != 2:
        raise ValueError(f"calibration input ids must be (N, L), got shape {tuple(ids.shape)}")
    return ids, "input_ids", windows_hash(ids)


def calibration_spec(calibration: CalibrationSet | torch.Tensor) -> dict[str, Any]:
    """JSON record of a calibration set for a plan: how to draw it again and hashes to check it by.

    ``data``, ``samples``, ``seq_len``, ``seed``, ``batch_size``, ``spacing``: the CalibrationConfig it was drawn with
    (absent for raw input ids, which cannot be redrawn); ``data_hash``: content hash of the sources;
    ``windows`` and ``windows_hash``: the number of windows and a hash of their token ids.
    """
    input_ids, name, data_hash = calibration_fields(calibration)
    spec: dict[str, Any] = {}
    config = calibration.config if isinstance(calibration, CalibrationSet) else None
    if config is not None:
        spec.update({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()})
    spec.update({"data_name": name, "data_hash": data_hash, "windows": int(input_ids.shape[0]),
                 "windows_hash": windows_hash(input_ids)})
    return spec


def calibration_config(spec: dict[str, Any]) -> CalibrationConfig:
    """The CalibrationConfig recorded by ``calibration_spec`` (to redraw the same windows)."""
    names = {f.name for f in fields(CalibrationConfig)}
    if not spec or "data" not in spec:
        raise ConfigError("the plan records no calibration sources (it was made from raw input ids); "
                          "pass the same input ids to apply(model, plan, calibration=...)")
    recorded = {k: v for k, v in spec.items() if k in names}
    recorded.setdefault("spacing", "random")  # plans from before the field existed drew their windows at random
    return from_mapping(CalibrationConfig, recorded, "plan calibration")


def check_same_calibration(calibration: CalibrationSet | torch.Tensor, spec: dict[str, Any] | None,
                           data_hash: str | None) -> torch.Tensor:
    """The input ids (N, L) of ``calibration`` after checking they are the windows a plan was made on.

    ``spec``: the plan's ``summary["calibration"]`` (may be None for plans without one); ``data_hash``: the
    plan's provenance data hash. Raises ValueError naming what differs.
    """
    input_ids, name, given_hash = calibration_fields(calibration)
    if data_hash and given_hash != data_hash:
        raise ValueError(f"calibration data {name} has hash {given_hash}, the plan was made on {data_hash}; "
                         "pass the calibration the plan records (summary['calibration'])")
    spec = spec or {}
    expected = spec.get("windows_hash")
    if expected and windows_hash(input_ids) != expected:
        raise ValueError(f"calibration windows differ from the plan's ({input_ids.shape[0]} windows given, "
                         f"{spec.get('windows')} recorded): same sources but another tokenizer, samples, "
                         "seq_len or seed; redraw them with the plan's summary['calibration'] settings")
    return input_ids
