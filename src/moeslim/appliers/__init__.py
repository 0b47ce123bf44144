"""``moeslim.apply`` (this package's ``apply``): the only place that turns (model, plan) into a compressed model.

One handler per plan kind; each handler mutates the model in place and returns the entries it
adds to the ``moeslim`` section of config.json (what stock transformers cannot express).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeslim.models.attrs import hf_config
from moeslim.plans import Plan, PlanError, config_hash


@dataclass(frozen=True)
class ApplyInputs:
    """What a handler may need besides the plan: the calibration windows (a GPTQ quantize plan is GPTQ'd in
    apply, on the windows it was planned on) and where / how visibly to run that pass."""

    calibration: Any = None  # CalibrationSet | (N, L) input ids | None
    device: torch.device | str | None = None
    progress: bool = False


Handler = Callable[[nn.Module, Plan, ApplyInputs], dict[str, Any]]


def _handlers() -> dict[str, Handler]:
    # Imported lazily so that importing moeslim does not import every method's runtime.
    from moeslim.appliers.joint import apply_joint
    from moeslim.appliers.lowrank import apply_lowrank
    from moeslim.appliers.merge import apply_merge
    from moeslim.appliers.quantize import apply_quantize
    from moeslim.appliers.router_fit import apply_prune_refit
    from moeslim.appliers.skip import apply_skip

    return {
        "prune": lambda model, plan, inputs: apply_prune_refit(model, plan, inputs.calibration, inputs.device,
                                                               inputs.progress),
        "skip": lambda model, plan, _inputs: apply_skip(model, plan),
        "quantize": lambda model, plan, inputs: apply_quantize(model, plan, inputs.calibration, inputs.device,
                                                               inputs.progress),
        "merge": lambda model, plan, inputs: apply_merge(model, plan, inputs.calibration, inputs.device,
                                                         inputs.progress),
        "lowrank": lambda model, plan, inputs: apply_lowrank(model, plan, inputs.calibration, inputs.device,
                                                             inputs.progress),
        "joint": lambda model, plan, inputs: apply_joint(model, plan, inputs.calibration, inputs.device,
                                                         inputs.progress),
    }


def needs_calibration(plan: Plan) -> bool:
    """Whether applying ``plan`` runs a calibration pass (pass the plan's windows to ``apply``): GPTQ quantize
    plans, low-rank plans, merge plans with router fits, prune plans with ``recalibrate_router``, GPTQ joint plans."""
    from moeslim.appliers.joint import needs_calibration as joint_needs_calibration
    from moeslim.appliers.merge import merge_config
    from moeslim.appliers.quantize import needs_calibration as gptq_needs_calibration
    from moeslim.appliers.router_fit import refits_router

    if plan.kind == "quantize":
        return gptq_needs_calibration(plan)
    if plan.kind == "lowrank":
        return True
    if plan.kind == "joint":
        return joint_needs_calibration(plan)
    if plan.kind == "merge":
        return merge_config(plan).needs_data_in_apply
    return plan.kind == "prune" and refits_router(plan)


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """Refuse a plan computed on a model with another architecture config (hash of its config keys).

    Plans chain: a skip plan calibrated on a pruned model carries the pruned model's hash, so each plan
    is checked against the model as it is when that plan is applied.
    """
    have = config_hash(model.config)
    if plan.provenance.model_config_hash != have:
        raise PlanError(
            f"this {plan.kind} plan was computed on {plan.provenance.model!r} (config hash "
            f"{plan.provenance.model_config_hash}), but the model it is applied to has config hash {have}: "
            "apply plans in the order they were made, to the model they were made on, or pass force=True "
            "(CLI: --force) to apply it anyway")


def apply(model: nn.Module, plan: Plan, calibration: Any = None, *, force: bool = False,
          device: torch.device | str | None = None, progress: bool = False) -> nn.Module:
    """Apply ``plan`` to ``model`` in place; record it in ``config.moeslim`` and return the model.

    ``calibration`` (a CalibrationSet or (N, L) input ids): the windows the plan was made on. A quantize plan
    with quantizer "gptq" needs them, since its GPTQ pass runs here, once (it raises without them, naming
    what to pass; the hashes must match the plan's); other plans ignore it.

    ``force`` applies a plan made on a model with a different config (the plan must still fit its shapes).
    """
    handlers = _handlers()
    if plan.kind not in handlers:
        raise PlanError(f"no handler for plan kind {plan.kind!r}; known kinds: {', '.join(handlers)}")
    if not force:
        check_plan_fits(model, plan)
    section = dict(getattr(model.config, "moeslim", None) or {})
    section.update(handlers[plan.kind](model, plan, ApplyInputs(calibration, device, progress)))
    history = list(section.get("applied", []))
    history.append({"kind": plan.kind, "method": plan.provenance.method, "data": plan.provenance.data})
    section["applied"] = history
    hf_config(model).moeslim = section
    return model
