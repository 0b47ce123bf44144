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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeslim.calibrate import ExpertOutputs, ExpertOutputSample, LayerDecision, result_of, run_layerwise
from moeslim.config import ConfigError
from moeslim.data.calibration_set import CalibrationSet, calibration_fields, calibration_spec
from moeslim.methods.joint.cast_price import cast_error
from moeslim.methods.joint.config import MIB, JointConfig, JointTargets, held_targets, resolve_targets
from moeslim.methods.joint.curves import size_options
from moeslim.methods.joint.hold import as_held
from moeslim.methods.joint.lowrank_options import rank_options
from moeslim.methods.joint.nonexpert import EMBEDDING, nonexpert_groups
from moeslim.methods.joint.probe import probe_scales, scale_options
from moeslim.methods.joint.solve import ChoiceGroup, JointChoice, SizeOption, solve_joint
from moeslim.methods.prune.driver import PruneContext, decide_layer
from moeslim.models import MoELayer
from moeslim.models.select import group_limits
from moeslim.plans import Plan, Provenance

__all__ = ["HeldOptions", "measure_held", "measure_nonexpert", "measure_options", "plan_joint"]


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


@dataclass(frozen=True)
class HeldOptions:
    """What the planner measures for one hold dtype: the experts' ``options`` (``measure_options``), the
    attention / embedding groups (``measure_nonexpert``) and the cast's own error (``cast_price.py``; 0 unmeasured
    for a single hold dtype)."""

    options: dict[int, list[SizeOption]]
    nonexpert: list[ChoiceGroup]
    cast_error: float = 0.0


def measure_held(model: nn.Module, input_ids: torch.Tensor, config: JointConfig,
                 device: torch.device | str | None = None, progress: bool = False,
                 fits: Mapping[str, JointTargets] | None = None) -> dict[str, HeldOptions]:
    """{hold dtype: its measurements} for each of ``config.hold_candidates()`` that fits ``config``'s targets (a
    ConfigError when none does): one layer-wise pass per dtype, on the model cast to it. The options do not depend
    on the byte target: one call serves every target whose candidates fit (``plan_joint(measured=...)``).
    ``fits``: ``held_targets(model, config)`` when the caller has it already."""
    out = {}
    for dtype, targets in (fits if fits is not None else held_targets(model, config)).items():
        held_config = config.held_as(dtype)
        held = as_held(model, dtype)
        options = measure_options(held, input_ids, held_config, targets, device, progress)
        nonexpert = measure_nonexpert(held, input_ids, held_config, targets, options)
        price = 0.0
        if config.hold_dtypes:
            price = cast_error(model, held, input_ids, options, config.widths, config.group_size, config.symmetric,
                               config.error_scale, config.probe_windows, config.batch_size)
        out[dtype] = HeldOptions(options, nonexpert, price)
        del held
    return out


@dataclass(frozen=True)
class _Solved:
    dtype: str
    targets: JointTargets
    measured: HeldOptions
    choice: JointChoice

    @property
    def error(self) -> float:
        return self.choice.error + self.measured.cast_error


def plan_joint(model: nn.Module, calibration: CalibrationSet | torch.Tensor, config: JointConfig,
               model_name: str | None = None, device: torch.device | str | None = None, progress: bool = False,
               options: dict[int, list[SizeOption]] | None = None, nonexpert: list[ChoiceGroup] | None = None,
               measured: Mapping[str, HeldOptions] | None = None) -> Plan:
    """Choose kept experts and widths per layer for the least estimated error under the targets; a "joint" plan.

    The model is not modified. ``options``: the layers' options from ``measure_options`` on the same model and
    calibration (one pass serves several targets); ``nonexpert``: ``measure_nonexpert``'s groups likewise (both for
    one hold dtype). ``measured``: ``measure_held``'s per-dtype measurements, for ``hold_dtypes`` (or one dtype).
    With several hold dtypes one plan is solved per dtype that fits and the least estimated error, the cast's own
    price included, is kept.
    """
    input_ids, data_name, data_hash = calibration_fields(calibration)
    if options is not None or nonexpert is not None:
        if config.hold_dtypes:
            raise ValueError("options / nonexpert hold one dtype's measurements: with hold_dtypes pass measure_held's "
                             "per-dtype measurements as measured")
        targets = resolve_targets(model, config)
        start = time.perf_counter()
        if options is None or nonexpert is None:
            held = as_held(model, config.hold_dtype)
            options = options if options is not None else measure_options(held, input_ids, config, targets, device,
                                                                          progress)
            nonexpert = nonexpert if nonexpert is not None else measure_nonexpert(held, input_ids, config, targets,
                                                                                  options)
            del held
        measured = {config.hold_dtype: HeldOptions(options, nonexpert)}
        fits: dict[str, JointTargets] = {config.hold_dtype: targets}
    else:
        fits = held_targets(model, config)
        start = time.perf_counter()
        if measured is None:
            measured = measure_held(model, input_ids, config, device, progress, fits)
    measure_seconds = time.perf_counter() - start
    solved: list[_Solved] = []
    for dtype, targets in fits.items():
        if dtype not in measured:
            raise ValueError(f"hold dtype {dtype} fits the target but has no measurements (measured: "
                             f"{sorted(measured)}): measure with this config's hold_dtypes")
        held_options = measured[dtype]
        if sorted(g.name for g in held_options.nonexpert) != sorted(targets.nonexpert):
            raise ValueError(f"nonexpert groups {sorted(g.name for g in held_options.nonexpert)} are not the "
                             f"config's {sorted(targets.nonexpert)}: measure them with this config")
        try:
            choice = solve_joint(held_options.options, config.widths, targets.sizes, targets.base, targets.target,
                                 targets.active, ranks=config.ranks, groups=held_options.nonexpert)
        except ValueError:
            if len(fits) == 1:
                raise
            continue  # this dtype's options cannot meet the targets together: another dtype may
        solved.append(_Solved(dtype, targets, held_options, choice))
    if not solved:
        raise ConfigError(f"no hold dtype of {list(fits)} has a plan that meets the targets: raise the target")
    best = min(solved, key=lambda s: s.error)
    targets, options, nonexpert, choice = best.targets, best.measured.options, best.measured.nonexpert, best.choice
    hold_dtype = best.dtype
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
        "hold_dtype": None if hold_dtype == "auto" else hold_dtype,  # apply casts to it
        "cast_bytes": targets.base,
        "held_bytes": choice.held_bytes,
        "held_mib": choice.held_bytes / MIB,
        "held_ratio": choice.held_bytes / targets.original,
        "active_bytes": choice.active_bytes,
        "estimated_error": best.error,
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
        "seconds": {"measure": measure_seconds, "solve": time.perf_counter() - start - measure_seconds},
        "calibration": calibration_spec(calibration),
    }
    if config.hold_dtypes:  # why this dtype: every candidate's estimate (the cast's price included)
        summary["cast_error"] = best.measured.cast_error
        candidates: dict[str, Any] = {dtype: {"fits": False} for dtype in config.hold_dtypes}
        for s in solved:
            candidates[s.dtype] = {"fits": True, "estimated_error": s.error, "cast_error": s.measured.cast_error,
                                   "plan_error": s.choice.error, "held_bytes": s.choice.held_bytes}
        summary["hold_candidates"] = candidates
    if nonexpert:  # apply packs these (appliers/nonexpert.py), after the experts
        summary["attention_bits"] = {name.split(".")[1]: b for name, b in choice.groups.items()
                                     if name.startswith("attention.")}
        summary["embedding_bits"] = choice.groups.get(EMBEDDING)
        summary["nonexpert"] = {g.name: g.to_dict() for g in nonexpert}
    provenance = Provenance.of(model, model_name, "joint", config.to_dict(), data_name, data_hash)
    return Plan(kind="joint", layers=layers, provenance=provenance, summary=summary)
