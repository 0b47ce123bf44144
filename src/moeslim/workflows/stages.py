"""Stages: (kind, config) pairs that plan on calibration data and apply the plan to the model.

A recipe and the demo are lists of stages. Each stage calibrates on the model as it is after the
previous stages (so skip thresholds are calibrated on the pruned model), writes its plan, then
applies it. The registry maps a stage kind to its validated config class and its planner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.config import ConfigError, from_mapping
from moeslim.data.calibration_set import CalibrationSet, calibration_spec
from moeslim.plans import Plan

# plan_<kind>(model, calibration, config, model_name, device=None, ...) -> Plan; kinds differ in the
# keywords they take beyond device (checkpoint: the kinds that can resume), hence the open argument list.
Planner = Callable[..., Plan]


@dataclass(frozen=True)
class StageSpec:
    kind: str
    config: Any  # the kind's validated config dataclass


def _registry() -> dict[str, tuple[type, Planner]]:
    # Lazy: a recipe with only pruning stages does not import quantization code.
    from moeslim.methods.joint import JointConfig, plan_joint
    from moeslim.methods.lowrank import LowRankConfig, plan_lowrank
    from moeslim.methods.merge import MergeConfig, plan_merge
    from moeslim.methods.prune import PruneConfig
    from moeslim.methods.prune.refit import plan_prune_with_router_fit
    from moeslim.methods.quant.driver import QuantizeConfig, plan_quantize
    from moeslim.methods.skip import SkipConfig, plan_skip

    return {
        "prune": (PruneConfig, plan_prune_with_router_fit),
        "skip": (SkipConfig, plan_skip),
        "quantize": (QuantizeConfig, plan_quantize),
        "merge": (MergeConfig, plan_merge),
        "lowrank": (LowRankConfig, plan_lowrank),
        "joint": (JointConfig, plan_joint),
    }


def stage_kinds() -> list[str]:
    return list(_registry())


def stage_configs() -> dict[str, type]:
    """kind -> its config dataclass (``moeslim plan <kind>`` derives its flags from it)."""
    return {kind: config_cls for kind, (config_cls, _) in _registry().items()}


def parse_stage(entry: Mapping[str, Any], where: str) -> StageSpec:
    """``{"prune": {"method": "enumerate", "keep": 6}}`` -> StageSpec, naming the bad field on error."""
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise ConfigError(f"{where}: a stage is one mapping like {{prune: {{method: enumerate, keep: 6}}}}")
    (kind, params), = entry.items()
    registry = _registry()
    if kind not in registry:
        raise ConfigError(f"{where}: unknown stage {kind!r}; use one of {', '.join(registry)}")
    config_cls, _ = registry[kind]
    return StageSpec(kind=kind, config=from_mapping(config_cls, params, f"{where}.{kind}"))


def plan_stage(model: nn.Module, stage: StageSpec, calib: CalibrationSet, model_name: str,
               device: torch.device | str | None = None, checkpoint: Any = None, progress: bool = False) -> Plan:
    """Plan on ``calib`` with the model as it is now (the model is not modified); layers run on ``device``.

    ``checkpoint``: a ``calibrate.resume.LayerCheckpoint`` (prune and skip plans) to resume a killed run from.
    ``progress``: a line per finished layer on stderr (``moeslim.progress``).
    """
    _, planner = _registry()[stage.kind]
    extra: dict[str, Any] = {"checkpoint": checkpoint} if checkpoint is not None else {}
    if stage.kind == "joint" and stage.config.verify_windows:  # the candidates are applied and measured here
        from moeslim.workflows.joint_verify import kl_judge

        extra["judge"] = kl_judge(model, stage.config.batch_size)
    plan = planner(model, calib, stage.config, model_name, device=device, progress=progress, **extra)
    # Record how the calibration set was drawn, so the same windows can be drawn again (GPTQ runs in apply).
    return dataclasses.replace(plan, summary={**plan.summary, "calibration": calibration_spec(calib)})


def run_stage(model: nn.Module, stage: StageSpec, calib: CalibrationSet, model_name: str,
              plan_path: Path | None = None) -> Plan:
    """Plan on ``calib`` with the model as it is now, save the plan, apply it in place.

    The plan is applied with the same calibration windows, exactly as ``moeslim apply`` redraws them from the
    saved plan: a GPTQ quantize stage runs its GPTQ pass once, in apply.
    """
    from moeslim.appliers import apply

    plan = plan_stage(model, stage, calib, model_name)
    if plan_path is not None:
        plan.save(plan_path)
    apply(model, plan, calibration=calib)
    return plan


def describe(stages: list[StageSpec]) -> str:
    parts = []
    for stage in stages:
        fields = {k: v for k, v in dataclasses.asdict(stage.config).items() if v is not None}
        shown = ", ".join(f"{k}={v}" for k, v in fields.items() if k in _SHOWN)
        parts.append(f"{stage.kind}({shown})")
    return " -> ".join(parts) or "original"


_SHOWN = {"method", "keep", "mode", "bits", "quantile", "rule", "protect", "seed", "ratio"}
