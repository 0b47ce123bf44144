"""Calibration samples from one or more sources, with provenance for the plan."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from moeslim.config import CalibrationConfig
from moeslim.data import load_source, token_windows


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
            parts.append(token_windows(source, tokenizer, config.seq_len, count, seed=config.seed + i))
    name = "+".join(s.name for s in sources)
    content_hash = "+".join(s.content_hash for s in sources)
    return CalibrationSet(input_ids=torch.cat(parts), name=name, content_hash=content_hash, config=config)


def calibration_fields(calibration: CalibrationSet | torch.Tensor) -> tuple[torch.Tensor, str, str]:
    """(input_ids (N, L), data name, content hash) of a CalibrationSet or of raw input ids."""
    if isinstance(calibration, CalibrationSet):
        return calibration.input_ids, calibration.name, calibration.content_hash
    ids = torch.as_tensor(calibration)
    if ids.ndim != 2:
        raise ValueError(f"calibration input ids must be (N, L), got shape {tuple(ids.shape)}")
    digest = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return ids, "input_ids", digest
