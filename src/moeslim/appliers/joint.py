"""Apply a "joint" plan in one call: cast to the plan's ``hold_dtype``, prune to the plan's kept experts, quantize
them at the plan's widths, then install skipping with the plan's per-layer thresholds (when it has them).

The plan's two halves are applied by the prune and quantize appliers, as a prune plan (compact layout for
unequal counts) and a quantize plan on the pruned model: GPTQ runs on the plan's calibration windows (the
hashes are checked), so the pruned experts are quantized with the inputs the pruned model gives them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from moeslim.appliers.prune import apply_prune
from moeslim.appliers.quantize import apply_quantize
from moeslim.appliers.skip import apply_skip
from moeslim.config import ConfigError
from moeslim.data.calibration_set import CalibrationSet
from moeslim.methods.joint.hold import cast_parameters, hold_torch_dtype, needs_cast
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.fused import KEEP_BITS
from moeslim.plans import Plan, PlanError, config_hash


def _halves(model: nn.Module, plan: Plan) -> tuple[Plan, dict[int, list[int]]]:
    kept: dict[int, list[int]] = {}
    bits: dict[int, list[int]] = {}
    for idx, entry in plan.layers.items():
        order = sorted(range(len(entry["kept"])), key=lambda i: entry["kept"][i])  # pruning keeps ids sorted
        kept[idx] = [int(entry["kept"][i]) for i in order]
        bits[idx] = [int(entry["bits"][i]) for i in order]
    summary = {"layout": plan.summary.get("layout", "compact"), "groups": plan.summary.get("groups")}
    prune = Plan(kind="prune", layers=kept, provenance=plan.provenance, summary=summary)
    return prune, bits


def _skip_plan(model: nn.Module, plan: Plan) -> Plan | None:
    """The plan's skip thresholds as a "skip" plan (None when no layer entry has one), checked against the model
    before anything is changed."""
    if not any("skip_beta" in entry for entry in plan.layers.values()):
        return None
    from moeslim.runtime.skipping import check_skipping_supported

    try:
        check_skipping_supported(model)
    except ValueError as err:
        raise PlanError(f"joint plan skips experts, but: {err}") from err
    rule = plan.summary.get("skip_rule") or plan.provenance.config.get("skip_rule", "top2")
    layers = {idx: {"beta": float(entry.get("skip_beta", 0.0))} for idx, entry in plan.layers.items()}
    return Plan(kind="skip", layers=layers, provenance=plan.provenance, summary={"rule": rule})


def needs_calibration(plan: Plan) -> bool:
    """A GPTQ joint plan with some width below 16 runs GPTQ in apply, on the plan's windows."""
    quantizer = plan.summary.get("quantizer", plan.provenance.config.get("quantizer", "gptq"))
    return quantizer == "gptq" and any(int(b) != KEEP_BITS for e in plan.layers.values() for b in e["bits"])


def apply_joint(model: nn.Module, plan: Plan, calibration: CalibrationSet | torch.Tensor | None = None,
                device: torch.device | str | None = None, progress: bool = False) -> dict[str, Any]:
    """Cast (the plan's ``hold_dtype``), prune, then quantize in place; returns the ``prune``, ``quantize`` and
    ``joint`` config sections (``joint.hold_dtype``: the dtype a save writes and ``moeslim.load`` holds)."""
    if plan.kind != "joint":
        raise PlanError(f"apply_joint got a {plan.kind!r} plan")
    hold = plan.summary.get("hold_dtype")
    try:
        dtype = hold_torch_dtype(hold if hold is None or isinstance(hold, str) else repr(hold))
    except ConfigError as err:
        raise PlanError(f"joint plan summary: {err}") from err
    prune, bits = _halves(model, plan)
    skip = _skip_plan(model, plan)
    if dtype is not None and needs_cast(model, dtype):
        # first: the planner measured every option on the model as cast, and GPTQ then runs on it
        cast_parameters(model, dtype)
    section = apply_prune(model, prune)
    cfg = plan.provenance.config
    quant_config = QuantizeConfig(method="uniform", bits=KEEP_BITS, group_size=int(cfg.get("group_size", 128)),
                                  symmetric=bool(cfg.get("symmetric", False)),
                                  quantizer=str(cfg.get("quantizer", "gptq")),  # type: ignore[arg-type]
                                  seed=int(cfg.get("seed", 0)), batch_size=int(cfg.get("batch_size", 8)))
    provenance = dataclasses.replace(plan.provenance, model_config_hash=config_hash(model.config),
                                     config=quant_config.to_dict())
    quantize = Plan(kind="quantize", layers={idx: {"bits": b} for idx, b in bits.items()}, provenance=provenance,
                    summary={"quantizer": quant_config.quantizer, "group_size": quant_config.group_size,
                             "symmetric": quant_config.symmetric,
                             "calibration": plan.summary.get("calibration")})
    section.update(apply_quantize(model, quantize, calibration, device, progress))
    if skip is not None:  # last: skipping wraps the experts forward of the pruned, quantized layers
        section.update(apply_skip(model, skip))
    section["joint"] = {"held_bytes_planned": plan.summary.get("held_bytes"),
                        "estimated_error": plan.summary.get("estimated_error")}
    if dtype is not None:
        section["joint"]["hold_dtype"] = hold
    return section
