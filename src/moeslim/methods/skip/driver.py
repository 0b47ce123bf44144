"""``plan_skip``: calibrate one skip threshold beta per MoE layer from routing statistics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from moeslim.calibrate import LayerDecision, Observer, RoutingStats, RoutingSummary, result_of, run_layerwise
from moeslim.calibrate.resume import LayerCheckpoint
from moeslim.config import ConfigError, check_types
from moeslim.data.calibration_set import CalibrationSet, calibration_fields
from moeslim.methods.skip.thresholds import SkipRule, calibrate_beta, skip_rates
from moeslim.models import MoELayer, find_moe_layers
from moeslim.plans import Plan, Provenance


@dataclass(frozen=True)
class SkipConfig:
    """Per-layer dynamic skipping thresholds (optionally with MC-MoE's online dynamic pruning).

    Each field's meaning is its ``metadata["help"]`` (also the ``moeslim plan skip`` help).
    """

    rule: SkipRule = field(default="top2", metadata={
        "help": "top2 (the paper's rule, top-2 routing) | topk (appendix generalisation, for k > 2)"})
    quantile: float = field(default=0.5, metadata={
        "help": "share of tokens that skip (0.5: the median ratio, as in the paper)"})
    protect: float = field(default=0.0, metadata={
        "help": "> 0 turns skipping into MC-MoE's online dynamic pruning (ODP): in every sequence this share of "
                "tokens, the most important by attention, keep all their experts (paper: 0.02)"})

    def __post_init__(self) -> None:
        check_types(self)
        if not 0 <= self.quantile <= 1:
            raise ConfigError(f"quantile={self.quantile}: use a share in [0, 1] (0.5 = the paper's median)")
        if not 0 <= self.protect < 1:
            raise ConfigError(f"protect={self.protect}: use a share of tokens in [0, 1), e.g. 0.02 as in MC-MoE")

    def check_model(self, model: nn.Module) -> None:
        for layer in find_moe_layers(model):
            if layer.family.skip_blocker:
                raise ConfigError(f"{layer.family.name}: dynamic expert skipping cannot run this family: "
                                  f"{layer.family.skip_blocker}")
            if self.rule == "top2" and layer.top_k != 2:
                raise ConfigError(
                    f"rule='top2' needs top-2 routing but {layer.family.name} layer {layer.layer_idx} routes "
                    f"top-{layer.top_k}; use rule='topk'"
                )
            if layer.top_k < 2:
                raise ConfigError(f"{layer.family.name} routes top-{layer.top_k}: there is no expert to skip")


def _decide(layer: MoELayer, observers: Sequence[Observer], config: SkipConfig) -> LayerDecision:
    routing = result_of(observers[0], RoutingSummary)
    weights = routing.topk_weights  # (T, k) sorted descending
    beta = calibrate_beta(weights, config.rule, config.quantile)
    return LayerDecision(result={"beta": beta, **skip_rates(weights, beta, config.rule), "tokens": routing.tokens})


def plan_skip(
    model: nn.Module,
    calibration: CalibrationSet | torch.Tensor,
    config: SkipConfig | None = None,
    model_name: str | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
    checkpoint: LayerCheckpoint | None = None,
) -> Plan:
    """A "skip" plan: layers {idx: {"beta": b}}, summary with the expected skip rates on the calibration data.

    Calibrate on the model as it will run (after pruning, when composing prune + skip).
    """
    config = config or SkipConfig()
    config.check_model(model)
    input_ids, data_name, data_hash = calibration_fields(calibration)
    start = time.perf_counter()
    results: dict[int, dict[str, Any]] = run_layerwise(
        model, input_ids,
        make_observers=lambda layer: [RoutingStats(layer.num_experts)],
        on_layer=lambda layer, obs: _decide(layer, obs, config),
        batch_size=batch_size, device=device, progress=progress, checkpoint=checkpoint,
    )
    summary = {
        "rule": config.rule,
        "quantile": config.quantile,
        "protect": config.protect,
        "skip_rate": {str(i): r["call_skip_rate"] for i, r in sorted(results.items())},
        "layers": {str(i): {k: v for k, v in r.items() if k != "beta"} for i, r in sorted(results.items())},
        "seconds": time.perf_counter() - start,
    }
    method = f"odp-{config.rule}" if config.protect > 0 else f"skip-{config.rule}"
    provenance = Provenance.of(model, model_name, method, asdict(config), data_name, data_hash)
    layers = {idx: {"beta": r["beta"]} for idx, r in results.items()}
    return Plan(kind="skip", layers=layers, provenance=provenance, summary=summary)
