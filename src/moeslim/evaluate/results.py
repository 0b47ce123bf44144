"""The result of evaluating one variant: a plain dataclass with a JSON-ready dict form.

Schema (every field JSON-serialisable; None = not measured):
    name: str                        variant label ("original", "prune-6", ...)
    description: str                 one line: what was done
    perplexity: {domain: ppl}        e.g. {"code": 7.9, "prose": 12.3}
    kl_divergence: {domain: nats}    mean KL per token to the reference's next-token distribution (top-k form)
    top1_agreement: {domain: share}  positions whose most likely token is the reference's, in [0, 1]
    tasks: {task: accuracy}          acc in [0, 1] of tasks that ran (skipped tasks are absent)
    param_bytes: int | None          weight bytes in memory (quantized storage as reported)
    disk_bytes: int | None           bytes of the saved checkpoint folder
    activated_params: int | None     parameters used per token
    expert_calls_per_token: float | None   routed expert calls per token, summed over MoE layers
    decode_tps, prefill_tps: float | None  tokens/s (median)
    speed_ratio: float | None        decode tokens/s relative to the first variant timed with it
    plan: dict | None                plan JSON; pruning {"kind": "prune", "layers": {"0": [kept ids]},
                                     "num_experts": E}; skipping {"kind": "skip", "layers":
                                     {"0": {"beta": 0.47}}, "skip_rate": {"0": 0.5}}
    extra: dict                      anything else (task status, memory, per-layer counts, generations)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VariantResult:
    name: str
    description: str = ""
    perplexity: dict[str, float] = field(default_factory=dict)
    kl_divergence: dict[str, float] = field(default_factory=dict)
    top1_agreement: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=dict)
    param_bytes: int | None = None
    disk_bytes: int | None = None
    activated_params: int | None = None
    expert_calls_per_token: float | None = None
    decode_tps: float | None = None
    prefill_tps: float | None = None
    speed_ratio: float | None = None
    plan: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantResult:
        """Unknown keys go to `extra`, so results written by a newer version still load."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = {k: v for k, v in data.items() if k not in known}
        if unknown:
            kwargs["extra"] = {**kwargs.get("extra", {}), **unknown}
        if "name" not in kwargs:
            raise ValueError("a variant result needs a name")
        return cls(**kwargs)
