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

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeslim.calibrate import ExpertOutputs, ExpertOutputSample, LayerDecision, result_of, run_layerwise
from moeslim.config import ConfigError
from moeslim.data.calibration_set import CalibrationSet, calibration_fields, calibration_spec
from moeslim.methods.joint.cast_price import cast_error, cast_kl
from moeslim.methods.joint.config import MIB, JointConfig, JointTargets, held_targets, resolve_targets
from moeslim.methods.joint.curves import size_options
from moeslim.methods.joint.hold import as_held
from moeslim.methods.joint.lowrank_options import rank_options
from moeslim.methods.joint.nonexpert import EMBEDDING, nonexpert_groups
from moeslim.methods.joint.probe import probe_scales, scale_options
from moeslim.methods.joint.solve import ChoiceGroup, JointChoice, SizeOption, solve_joint
from moeslim.methods.joint.verify import Judge, full_options, pmq_choice, split_windows
from moeslim.methods.prune.driver import PruneContext, decide_layer
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.driver import pmq_factors
from moeslim.methods.quant.factors import LayerFactors
from moeslim.models import MoELayer
from moeslim.models.select import group_limits
from moeslim.plans import Plan, Provenance

log = logging.getLogger(__name__)

__all__ = ["HeldOptions", "fit_windows", "measure_held", "measure_nonexpert", "measure_options", "plan_joint"]


def fit_windows(input_ids: torch.Tensor, config: JointConfig) -> torch.Tensor:
    """The calibration windows (N, S) the options are measured on: all but the last ``verify_windows``."""
    return split_windows(input_ids, config.verify_windows)[0]


def _layer_options(layer: MoELayer, observers: Any, config: JointConfig, targets: JointTargets, ctx: PruneContext
                   ) -> list[SizeOption]:
    entry = decide_layer(layer, observers, targets.prune, ctx)
    sample = result_of(observers[0], ExpertOutputSample)
    options = size_options(entry["curve"], targets.kept_sizes, layer, sample, ctx.route(layer), config.widths,
                           config.group_size, config.symmetric, config.quantizer, config.skip_betas, config.skip_rule,
                           config.gptq_folds, config.act_order)
    if config.ranks:
        options = rank_options(options, layer, sample, ctx.route(layer), config.ranks, config.rank_damp)
    return options


def measure_options(model: nn.Module, input_ids: torch.Tensor, config: JointConfig, targets: JointTargets,
                    device: torch.device | str | None = None, progress: bool = False
                    ) -> dict[int, list[SizeOption]]:
    """{decoder layer index: the layer's options} from one layer-wise pass (original-model inputs per layer);
    with ``error_scale="kl"`` their errors are then weighed by each layer's probed KL scales (``probe.py``).
    With ``hold_dtype`` they are measured on a copy of the model cast to it (the model as the plan holds it).
    ``input_ids``: all calibration windows; the last ``verify_windows`` are left out (``fit_windows``)."""
    input_ids = fit_windows(input_ids, config)
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
    ``model`` as the plan holds it (empty when neither option is set); ``options`` from ``measure_options``;
    ``input_ids`` all calibration windows (the last ``verify_windows`` left out)."""
    if not targets.nonexpert:
        return []
    input_ids = fit_windows(input_ids, config)
    held = as_held(model, config.hold_dtype)
    return nonexpert_groups(held, input_ids, targets.nonexpert, options, config.group_size, config.symmetric,
                            config.error_scale, config.probe_windows, config.batch_size)


def _curve_key(option: SizeOption) -> str:
    """"k" for k kept experts, "k@beta" for the same with skip threshold beta."""
    return f"{len(option.kept)}@{option.skip_beta:g}" if option.skip_beta else str(len(option.kept))


@dataclass(frozen=True)
class HeldOptions:
    """What the planner measures for one hold dtype: the experts' ``options`` (``measure_options``), the
    attention / embedding groups (``measure_nonexpert``) and the cast's own error (``cast_price.py``; 0 unmeasured
    for a single hold dtype); with ``verify_windows``, ``pmq`` PMQ's factors for its candidate allocation
    (``verify.py``; None: no PMQ candidate). ``refused``: why the model cannot be held in this dtype (its cast
    overflows; nothing else measured), one of several ``hold_dtypes`` the planner then leaves out."""

    options: dict[int, list[SizeOption]]
    nonexpert: list[ChoiceGroup]
    cast_error: float = 0.0
    pmq: dict[int, LayerFactors] | None = None
    refused: str = ""


def measure_pmq(model: nn.Module, input_ids: torch.Tensor, config: JointConfig) -> dict[int, LayerFactors]:
    """PMQ's factors over ``config.widths`` on ``model`` as held, from the fit windows (one layer-wise pass of
    round-to-nearest errors): the verification's PMQ candidate (``verify.pmq_choice``)."""
    pmq = QuantizeConfig(method="pmq", bits=min(config.widths), candidates=tuple(sorted(config.widths)),
                         group_size=config.group_size, symmetric=config.symmetric, max_tokens=config.max_tokens,
                         batch_size=config.batch_size, seed=config.seed, token_fraction=config.token_fraction)
    return pmq_factors(as_held(model, config.hold_dtype), fit_windows(input_ids, config), pmq)


def measure_held(model: nn.Module, input_ids: torch.Tensor, config: JointConfig,
                 device: torch.device | str | None = None, progress: bool = False,
                 fits: Mapping[str, JointTargets] | None = None) -> dict[str, HeldOptions]:
    """{hold dtype: its measurements} for each of ``config.hold_candidates()`` that fits ``config``'s targets (a
    ConfigError when none does): one layer-wise pass per dtype, on the model cast to it. The options do not depend
    on the byte target: one call serves every target whose candidates fit (``plan_joint(measured=...)``).
    ``fits``: ``held_targets(model, config)`` when the caller has it already."""
    out = {}
    windows = fit_windows(input_ids, config)
    for dtype, targets in (fits if fits is not None else held_targets(model, config)).items():
        held_config = config.held_as(dtype)
        held = as_held(model, dtype)
        kl = None
        if held is not model:  # a cast that overflows is refused here, before its options are measured
            try:
                kl = cast_kl(model, held, windows, config.probe_windows, config.batch_size)
            except ConfigError as err:
                if len(config.hold_candidates()) == 1:
                    raise
                log.warning("hold dtype %s left out: %s", dtype, err)
                out[dtype] = HeldOptions({}, [], refused=str(err))
                continue
        options = measure_options(held, input_ids, held_config, targets, device, progress)
        nonexpert = measure_nonexpert(held, input_ids, held_config, targets, options)
        price = 0.0
        if config.hold_dtypes:
            price = cast_error(model, held, windows, options, config.group_size, config.symmetric, config.error_scale,
                               config.probe_windows, config.batch_size, kl)
        pmq = measure_pmq(held, input_ids, held_config) if config.verify_windows else None
        out[dtype] = HeldOptions(options, nonexpert, price, pmq)
        del held
    return out


@dataclass(frozen=True)
class _Solved:
    dtype: str
    targets: JointTargets
    measured: HeldOptions
    choice: JointChoice
    nonexpert: list[ChoiceGroup]  # the groups this decision chose among (none: attention / embedding untouched)
    name: str = "optimum"

    @property
    def error(self) -> float:
        return self.choice.error + self.measured.cast_error


def _key(s: _Solved) -> tuple[Any, ...]:
    """Two candidates with equal keys apply the same model."""
    layers = tuple((idx, c.kept, c.bits, c.skip_beta, c.ranks) for idx, c in sorted(s.choice.layers.items()))
    groups = tuple(sorted((n, b) for n, b in s.choice.groups.items() if b != 16))
    return s.dtype, layers, groups


def _candidates(model: nn.Module, config: JointConfig, solved: list[_Solved]) -> list[_Solved]:
    """The verification's candidates (``verify.py``), duplicates dropped, the estimated optimum first."""
    out = sorted(solved, key=lambda s: s.error)
    out = [dataclasses.replace(s, name=f"optimum {s.dtype}") for s in out]
    for s in sorted(solved, key=lambda s: s.error):
        t, held = s.targets, s.measured
        solve = dict(widths=config.widths, sizes=t.sizes, base=t.base, target=t.target, active_target=t.active,
                     ranks=config.ranks)
        if held.nonexpert:
            try:
                choice = solve_joint(held.options, groups=[], **solve)  # type: ignore[arg-type]
                out.append(_Solved(s.dtype, t, held, choice, [], f"untouched attention/embedding {s.dtype}"))
            except ValueError:
                pass  # the target needs them packed
        experts = {idx: lb.num_experts for idx, lb in t.sizes.items()}
        full = full_options(held.options, experts)
        if all(full.values()) and full != {idx: list(o) for idx, o in held.options.items()}:
            try:
                choice = solve_joint(full, groups=held.nonexpert, **solve)  # type: ignore[arg-type]
                out.append(_Solved(s.dtype, t, held, choice, held.nonexpert, f"widths only {s.dtype}"))
            except ValueError:
                pass  # the target needs pruning
        if held.pmq is not None and not config.ranks:
            pmq = pmq_choice(model, held.pmq, held.options, config.widths, t.sizes, t.base, t.target, t.active)
            if pmq is not None:
                out.append(_Solved(s.dtype, t, held, pmq, [], f"PMQ allocation {s.dtype}"))
            if any(b != 16 for b in s.choice.groups.values()):  # the optimum's attention / embedding widths
                pmq = pmq_choice(model, held.pmq, held.options, config.widths, t.sizes, t.base, t.target, t.active,
                                 held.nonexpert, s.choice.groups)
                if pmq is not None:
                    out.append(_Solved(s.dtype, t, held, pmq, held.nonexpert,
                                       f"PMQ allocation + optimum's attention/embedding {s.dtype}"))
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for s in out:
        if _key(s) not in seen:
            seen.add(_key(s))
            unique.append(s)
    return unique


def plan_joint(model: nn.Module, calibration: CalibrationSet | torch.Tensor, config: JointConfig,
               model_name: str | None = None, device: torch.device | str | None = None, progress: bool = False,
               options: dict[int, list[SizeOption]] | None = None, nonexpert: list[ChoiceGroup] | None = None,
               measured: Mapping[str, HeldOptions] | None = None, judge: Judge | None = None) -> Plan:
    """Choose kept experts and widths per layer for the least estimated error under the targets; a "joint" plan.

    The model is not modified. ``options``: the layers' options from ``measure_options`` on the same model and
    calibration (one pass serves several targets); ``nonexpert``: ``measure_nonexpert``'s groups likewise (both for
    one hold dtype). ``measured``: ``measure_held``'s per-dtype measurements, for ``hold_dtypes`` (or one dtype).
    With several hold dtypes one plan is solved per dtype that fits and the least estimated error, the cast's own
    price included, is kept. With ``verify_windows`` the candidates (``verify.py``) are judged by ``judge`` (their
    measured KL on the held-out windows) and the least measured is kept; the summary's ``verification`` says which
    and why.
    """
    input_ids, data_name, data_hash = calibration_fields(calibration)
    if config.verify_windows and judge is None:
        raise ValueError(f"verify_windows={config.verify_windows}: pass a judge that applies the candidates and "
                         "measures their KL (moeslim.workflows.joint_verify.kl_judge), or set verify_windows=0")
    fit_ids, held_ids = split_windows(input_ids, config.verify_windows)
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
        pmq = measure_pmq(model, input_ids, config) if config.verify_windows else None
        measured = {config.hold_dtype: HeldOptions(options, nonexpert, 0.0, pmq)}
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
        if held_options.refused:
            continue
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
        solved.append(_Solved(dtype, targets, held_options, choice, held_options.nonexpert))
    refused = {d: measured[d].refused for d in fits if measured[d].refused}
    if not solved:
        if len(refused) == len(fits):
            raise ConfigError("every hold dtype was refused: " + "; ".join(f"{d}: {why}" for d, why in refused.items()))
        raise ConfigError(f"no hold dtype of {list(fits)} has a plan that meets the targets: raise the target")
    best = min(solved, key=lambda s: s.error)
    verification: dict[str, Any] | None = None
    if config.verify_windows:
        if any(m.pmq is None for m in measured.values()):
            raise ValueError("verify_windows: the measurements hold no PMQ factors; measure them with this config "
                             "(measure_held)")
        verify_start = time.perf_counter()
        candidates = _candidates(model, config, solved)
        plans = [_plan(model, model_name, config, fit_ids, c, solved, {}, refused) for c in candidates]
        kls = judge(plans, fit_ids, held_ids)  # type: ignore[misc]
        if len(kls) != len(plans):
            raise ValueError(f"the judge measured {len(kls)} of {len(plans)} candidate plans")
        pick = min(range(len(plans)), key=lambda i: (kls[i], i))  # a tie keeps the estimate's order
        best = candidates[pick]
        verification = {
            "windows": int(held_ids.shape[0]), "fit_windows": int(fit_ids.shape[0]),
            "criterion": "least mean KL per token to the original on the held-out calibration windows, each "
                         "candidate applied with GPTQ on the fit windows",
            "chosen": best.name,
            "candidates": [{"name": c.name, "hold_dtype": c.dtype, "estimated_error": c.error,
                            "held_bytes": c.choice.held_bytes, "measured_kl": float(k)}
                           for c, k in zip(candidates, kls, strict=True)],
            "seconds": time.perf_counter() - verify_start,
        }
    seconds = {"measure": measure_seconds, "solve": time.perf_counter() - start - measure_seconds}
    plan = _plan(model, model_name, config, calibration, best, solved, seconds, refused)
    if verification is not None:
        plan.summary["verification"] = verification
        plan.summary["seconds"]["solve"] -= verification["seconds"]
        plan.summary["seconds"]["verify"] = verification["seconds"]
    return plan


def _plan(model: nn.Module, model_name: str | None, config: JointConfig, calibration: CalibrationSet | torch.Tensor,
          best: _Solved, solved: list[_Solved], seconds: dict[str, float], refused: Mapping[str, str]) -> Plan:
    """The "joint" plan of one decision, recorded with ``calibration`` (the windows apply's GPTQ runs on);
    ``refused``: the hold dtypes left out, and why."""
    _, data_name, data_hash = calibration_fields(calibration)
    targets, options, nonexpert, choice = best.targets, best.measured.options, best.nonexpert, best.choice
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
        "seconds": dict(seconds),
        "calibration": calibration_spec(calibration),
    }
    if config.hold_dtypes:  # why this dtype: every candidate's estimate (the cast's price included)
        summary["cast_error"] = best.measured.cast_error
        candidates: dict[str, Any] = {dtype: {"fits": False} for dtype in config.hold_dtypes}
        candidates.update({dtype: {"fits": True, "refused": why} for dtype, why in refused.items()})
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
