"""``plan_joint``: one layer-wise calibration pass, each layer's options measured, one exact choice over layers.

Flow: targets resolved and checked (``targets.py``, before any work) -> the layer-wise runner gives each MoE
layer its token sample -> the pruning method's loss curve (best kept set of every size) and every kept
expert's quantization error at every width under that kept set's routing (``curves.py``) -> the MILP over all
layers (``solve.py``) -> a "joint" plan: per layer the kept experts and one width per kept expert (and a skip
threshold with ``skip_betas``). With ``hold_dtype`` all of it is measured on a copy of the model cast to that dtype
(``hold.py``). ``apply`` casts, prunes, quantizes (GPTQ on the plan's windows, or round-to-nearest), then installs
skipping, in one call.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from moeslim.calibrate import ExpertOutputs, ExpertOutputSample, LayerDecision, result_of, run_layerwise
from moeslim.data.calibration_set import CalibrationSet, calibration_fields, calibration_spec
from moeslim.methods.joint.config import MIB, JointConfig, JointTargets, resolve_targets
from moeslim.methods.joint.curves import size_options
from moeslim.methods.joint.hold import as_held
from moeslim.methods.joint.lowrank_options import rank_options
from moeslim.methods.joint.nonexpert import EMBEDDING, nonexpert_groups
from moeslim.methods.joint.probe import probe_scales, scale_options
from moeslim.methods.joint.solve import ChoiceGroup, SizeOption, solve_joint
from moeslim.methods.prune.driver import PruneContext, decide_layer
from moeslim.models import MoELayer
from moeslim.models.select import group_limits
from moeslim.plans import Plan, Provenance

__all__ = ["measure_nonexpert", "measure_options", "plan_joint"]


def _layer_options(layer: MoELayer, observers: Any, config: JointConfig, targets: JointTargets, ctx: PruneContext
                   ) -> list[SizeOption]:
    entry = decide_layer(layer, observers, targets.prune, ctx)
    sample = result_of(observers[0], ExpertOutputSample)
    options = size_options(entry["curve"], targets.kept_sizes, layer, sample, ctx.route(layer), config.widths,
                           config.group_size, config.symmetric, config.quantizer, config.skip_betas, config.skip_rule)
    if config.ranks:
        options = rank_options(options, layer, sample, ctx.route(layer), config.ranks, config.rank_damp)
    return options


def measure_options(model: nn.Module, input_ids: torch.Tensor, config: JointConfig, targets: JointTargets,
                    device: torch.device | str | None = None, progress: bool = False
                    ) -> dict[int, list[SizeOption]]:
    """{decoder layer index: the layer's options} from one layer-wise pass (original-model inputs per layer);
    with ``error_scale="kl"`` their errors are then weighed by each layer's probed KL scales (``probe.py``).
    With ``hold_dtype`` they are measured on a copy of the model cast to it (the model as the plan holds it)."""
    model = as_held(model, config.hold_dtype)
    ctx = PruneContext(targets.prune, targets.shape, group_limits(model))
    options: dict[int, list[SizeOption]] = run_layerwise(
        model, input_ids,
        make_observers=lambda _layer: [ExpertOutputs(fraction=config.token_fraction, seed=config.seed,
                                                     max_tokens=config.max_tokens)],
        on_layer=lambda layer, obs: LayerDecision(result=_layer_options(layer, obs, config, targets, ctx)),
        propagate="original", batch_size=config.batch_size, device=device, progress=progress, label="joint",
    )
    if config.error_scale == "squared":
        return options
    scales = probe_scales(model, input_ids, options, config.widths, config.group_size, config.symmetric,
                          config.probe_windows, config.batch_size)
    tokens = {idx: opts[0].tokens for idx, opts in options.items()}
    return scale_options(options, scales, tokens)


def measure_nonexpert(model: nn.Module, input_ids: torch.Tensor, config: JointConfig, targets: JointTargets,
                      options: dict[int, list[SizeOption]]) -> list[ChoiceGroup]:
    """The attention / embedding choice groups of ``config`` (``nonexpert.py``) with their probed errors, measured on
    ``model`` as the plan holds it (empty when neither option is set); ``options`` from ``measure_options``."""
    if not targets.nonexpert:
        return []
    held = as_held(model, config.hold_dtype)
    return nonexpert_groups(held, input_ids, targets.nonexpert, options, config.widths, config.group_size,
                            config.symmetric, config.error_scale, config.probe_windows, config.batch_size)


def _curve_key(option: SizeOption) -> str:
    """"k" for k kept experts, "k@beta" for the same with skip threshold beta."""
    return f"{len(option.kept)}@{option.skip_beta:g}" if option.skip_beta else str(len(option.kept))


def plan_joint(model: nn.Module, calibration: CalibrationSet | torch.Tensor, config: JointConfig,
               model_name: str | None = None, device: torch.device | str | None = None, progress: bool = False,
               options: dict[int, list[SizeOption]] | None = None, nonexpert: list[ChoiceGroup] | None = None
               ) -> Plan:
    """Choose kept experts and widths per layer for the least estimated error under the targets; a "joint" plan.

    The model is not modified. ``options``: the layers' options from ``measure_options`` on the same model and
    calibration (one pass serves several targets); ``nonexpert``: ``measure_nonexpert``'s groups likewise.
    """
    held = as_held(model, config.hold_dtype)  # the model as the plan holds it: a cast copy, or ``model`` itself
    targets: JointTargets = resolve_targets(model, config, held)
    input_ids, data_name, data_hash = calibration_fields(calibration)
    start = time.perf_counter()
    if options is None:
        options = measure_options(held, input_ids, config, targets, device, progress)
    if nonexpert is None:
        nonexpert = measure_nonexpert(held, input_ids, config, targets, options)
    del held
    if sorted(g.name for g in nonexpert) != sorted(targets.nonexpert):
        raise ValueError(f"nonexpert groups {sorted(g.name for g in nonexpert)} are not the config's "
                         f"{sorted(targets.nonexpert)}: measure them with this config")
    measured = time.perf_counter() - start
    choice = solve_joint(options, config.widths, targets.sizes, targets.base, targets.target, targets.active,
                         ranks=config.ranks, groups=nonexpert)
    layers: dict[int, dict[str, Any]] = {idx: {"kept": list(c.kept), "bits": list(c.bits)}
                                         for idx, c in sorted(choice.layers.items())}
    if config.skip_betas:  # the chosen thresholds, 0 where a layer does not skip (apply installs skipping)
        for idx, c in choice.layers.items():
            layers[idx]["skip_beta"] = c.skip_beta
    for idx, c in choice.layers.items():
        if c.ranks is not None:  # a low-rank layer: (up, down) ranks per kept expert, null = dense
            layers[idx]["ranks"] = [None if f is None else list(targets.sizes[idx].rank_ranks[f]) for f in c.ranks]
    summary: dict[str, Any] = {
        "target_bytes": targets.target,
        "target_active_bytes": targets.active,
        "original_bytes": targets.original,
        "hold_dtype": None if config.hold_dtype == "auto" else config.hold_dtype,  # apply casts to it
        "cast_bytes": targets.base,
        "held_bytes": choice.held_bytes,
        "held_mib": choice.held_bytes / MIB,
        "held_ratio": choice.held_bytes / targets.original,
        "active_bytes": choice.active_bytes,
        "estimated_error": choice.error,
        "error_scale": config.error_scale,
        "mip_gap": choice.mip_gap,
        "prune_method": targets.prune.method,
        "group_size": config.group_size,
        "symmetric": config.symmetric,
        "quantizer": config.quantizer,
        "layout": "compact",
        "groups": targets.shape.groups,
        "bytes": {str(idx): lb.to_dict() for idx, lb in sorted(targets.sizes.items())},
        "skip_rule": config.skip_rule if config.skip_betas else None,
        "ranks": list(config.ranks),
        "lowrank_layers": sorted(idx for idx, c in choice.layers.items() if c.ranks is not None),
        "layers": {str(idx): {"error": c.error, "curve": {_curve_key(o): {
            "prune_err": o.prune_err,
            "quant_err_min": float(o.quant_err.min(axis=1).sum()),
        } for o in options[idx]}} for idx, c in sorted(choice.layers.items())},
        "seconds": {"measure": measured, "solve": time.perf_counter() - start - measured},
        "calibration": calibration_spec(calibration),
    }
    if nonexpert:  # apply packs these (appliers/nonexpert.py), after the experts
        summary["attention_bits"] = {name.split(".")[1]: b for name, b in choice.groups.items()
                                     if name.startswith("attention.")}
        summary["embedding_bits"] = choice.groups.get(EMBEDDING)
        summary["nonexpert"] = {g.name: g.to_dict() for g in nonexpert}
    provenance = Provenance.of(model, model_name, "joint", config.to_dict(), data_name, data_hash)
    return Plan(kind="joint", layers=layers, provenance=provenance, summary=summary)
