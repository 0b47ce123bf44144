"""Apply a "joint" plan in one call: cast to the plan's ``hold_dtype``, prune to the plan's kept experts, make its
low-rank layers' experts whitened-SVD factors of the plan's ranks, quantize the other layers' experts at the plan's
widths, then install skipping with the plan's per-layer thresholds (when it has them).

The plan's two halves are applied by the prune and quantize appliers, as a prune plan (compact layout for
unequal counts) and a quantize plan on the pruned model: GPTQ runs on the plan's calibration windows (the
hashes are checked), so the pruned experts are quantized with the inputs the pruned model gives them. Low-rank
layers (entries with "ranks") go through the lowrank applier first (method 'svd-llm', on the same windows, the
pruned model's covariances), so GPTQ then sees the inputs the pruned, partly low-rank model gives its layers.

Attention projections and the token embedding / head (the plan's ``attention_bits`` / ``embedding_bits``) are
packed after the experts (round-to-nearest, ``appliers/nonexpert.py``): the planner priced the experts' widths on
the model with float attention and embedding, and GPTQ calibrates on that same model; these need no data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from moeslim.appliers.lowrank import apply_lowrank
from moeslim.appliers.nonexpert import pack_nonexpert
from moeslim.appliers.prune import apply_prune
from moeslim.appliers.quantize import apply_quantize
from moeslim.appliers.skip import apply_skip
from moeslim.config import ConfigError
from moeslim.data.calibration_set import CalibrationSet
from moeslim.methods.joint.hold import cast_parameters, hold_torch_dtype, needs_cast
from moeslim.methods.joint.lowrank_options import expert_ranks
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.fused import KEEP_BITS
from moeslim.models import find_moe_layers
from moeslim.plans import Plan, PlanError, config_hash


def _halves(model: nn.Module, plan: Plan) -> tuple[Plan, dict[int, list[int]]]:
    kept: dict[int, list[int]] = {}
    bits: dict[int, list[int]] = {}
    for idx, entry in plan.layers.items():
        order = _kept_order(entry)
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
def _kept_order(entry: dict[str, Any]) -> list[int]:
    return sorted(range(len(entry["kept"])), key=lambda i: entry["kept"][i])  # pruning keeps ids sorted


def _lowrank_plan(model: nn.Module, plan: Plan) -> Plan | None:
    """The plan's low-rank layers as a "lowrank" plan on the pruned model (dense experts at full rank), or None."""
    layers: dict[int, Any] = {}
    found = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    for idx, entry in plan.layers.items():
        if entry.get("ranks") is None:
            continue
        if idx not in found:
            raise PlanError(f"joint plan layer {idx} is not a MoE layer of this model (MoE layers: {sorted(found)})")
        full = expert_ranks(found[idx], 1.0)
        ranks = [entry["ranks"][i] for i in _kept_order(entry)]
        layers[idx] = {"up_ranks": [int((r or full)[0]) for r in ranks],
                       "down_ranks": [int((r or full)[1]) for r in ranks]}
    if not layers:
        return None
    cfg = plan.provenance.config
    shares = [float(f) for f in cfg.get("ranks", [])]
    config = {"method": "svd-llm", "ratio": max(shares, default=1.0), "damp": float(cfg.get("rank_damp", 0.01)),
              "weighting": "gate2"}
    provenance = dataclasses.replace(plan.provenance, model_config_hash=config_hash(model.config), config=config)
    return Plan(kind="lowrank", layers=layers, provenance=provenance,
                summary={"calibration": plan.summary.get("calibration")})


def needs_calibration(plan: Plan) -> bool:
    """A GPTQ joint plan with some width below 16 runs GPTQ in apply, on the plan's windows; a plan with low-rank
    layers computes their factors there."""
    if any(entry.get("ranks") is not None for entry in plan.layers.values()):
        return True
    quantizer = plan.summary.get("quantizer", plan.provenance.config.get("quantizer", "gptq"))
    return quantizer == "gptq" and any(int(b) != KEEP_BITS for e in plan.layers.values() for b in e["bits"])


def apply_joint(model: nn.Module, plan: Plan, calibration: CalibrationSet | torch.Tensor | None = None,
                device: torch.device | str | None = None, progress: bool = False) -> dict[str, Any]:
    """Cast (the plan's ``hold_dtype``), prune, low-rank, quantize, then skip in place; returns the config sections
    of the steps and ``joint`` (``joint.hold_dtype``: the dtype a save writes and ``moeslim.load`` holds)."""
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
    lowrank = _lowrank_plan(model, plan)
    if lowrank is not None:
        section.update(apply_lowrank(model, lowrank, calibration, device, progress))
        bits = {idx: b for idx, b in bits.items() if idx not in lowrank.layers}
    if bits:  # a plan whose layers are all low-rank quantizes nothing
        section.update(_quantize(model, plan, bits, calibration, device, progress))
    section.update(_nonexpert(model, plan))
    if skip is not None:  # last: skipping wraps the experts forward of the pruned, quantized layers
        section.update(apply_skip(model, skip))
    section["joint"] = {"held_bytes_planned": plan.summary.get("held_bytes"),
                        "estimated_error": plan.summary.get("estimated_error")}
    if dtype is not None:
        section["joint"]["hold_dtype"] = hold
    return section


def _nonexpert(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """The plan's attention and embedding widths packed (after the experts); their config section."""
    attention = {int(idx): int(b) for idx, b in (plan.summary.get("attention_bits") or {}).items()}
    embedding = plan.summary.get("embedding_bits")
    if not attention and embedding is None:
        return {}
    for b in [*attention.values(), *([] if embedding is None else [embedding])]:
        if not (1 <= int(b) <= 8 or int(b) == KEEP_BITS):
            raise PlanError(f"joint plan summary: attention / embedding width {b} is not in 1..8 or 16")
    group_size = int(plan.summary.get("group_size", plan.provenance.config.get("group_size", 128)))
    return pack_nonexpert(model, attention, None if embedding is None else int(embedding), group_size)


def _quantize(model: nn.Module, plan: Plan, bits: dict[int, list[int]], calibration: Any,
              device: torch.device | str | None, progress: bool) -> dict[str, Any]:
    """The plan's widths of the (pruned) layers ``bits`` applied as a quantize plan; its ``quantize`` section."""
    cfg = plan.provenance.config
    quant_config = QuantizeConfig(method="uniform", bits=KEEP_BITS, group_size=int(cfg.get("group_size", 128)),
                                  symmetric=bool(cfg.get("symmetric", False)),
                                  act_order=bool(cfg.get("act_order", False)),  # plans made before it: off
                                  quantizer=str(cfg.get("quantizer", "gptq")),  # type: ignore[arg-type]
                                  seed=int(cfg.get("seed", 0)), batch_size=int(cfg.get("batch_size", 8)))
    provenance = dataclasses.replace(plan.provenance, model_config_hash=config_hash(model.config),
                                     config=quant_config.to_dict())
    quantize = Plan(kind="quantize", layers={idx: {"bits": b} for idx, b in bits.items()}, provenance=provenance,
                    summary={"quantizer": quant_config.quantizer, "group_size": quant_config.group_size,
                             "symmetric": quant_config.symmetric,
                             "calibration": plan.summary.get("calibration")})
    return apply_quantize(model, quantize, calibration, device, progress)
