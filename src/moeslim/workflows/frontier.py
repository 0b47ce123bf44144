"""Measure a model's frontier: the joint plan at several byte budgets, and PMQ at each joint plan's bytes.

Cheap by construction: the joint planner's per-layer options are measured once and serve every budget (each
budget is one MILP), and PMQ's factors are measured once and serve every PMQ allocation. Per budget two models are
applied and evaluated (ppl and KL on the caller's windows, no tasks, no speed): the joint plan, and PMQ at the
fewest average bits whose held bytes are at least the joint plan's (bisection on the planned bytes; the comparison
then uses the measured bytes). The other single methods are the caller's already-measured variants (the demo's
pruned, quantized, low-rank and merged models), each at the bytes it holds.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn
from transformers import PreTrainedTokenizerBase

from moeslim.config import ConfigError, EvalConfig
from moeslim.data.calibration_set import CalibrationSet
from moeslim.evaluate.divergence import Reference
from moeslim.evaluate.frontier import BudgetRow, Frontier, FrontierPoint, point_of
from moeslim.evaluate.results import VariantResult
from moeslim.plans import Plan
from moeslim.workflows.plan_summary import hold_estimates
from moeslim.workflows.stages import StageSpec

MIB = 2**20
PMQ_FAMILY = "quantize pmq"
_BISECT_STEPS = 10  # (16 - 2) / 2**10: PMQ's average bits to 0.014, finer than one expert's step on the demo models
SINGLE_KINDS = ("prune", "quantize", "lowrank", "merge")  # stages that make a model hold fewer bytes


@dataclass(frozen=True)
class FrontierConfig:
    """Budgets (shares of the original's held bytes) and the joint planner's and PMQ's settings."""

    budgets: tuple[float, ...] = (0.15, 0.25, 0.4, 0.6, 0.8)
    widths: tuple[int, ...] = (2, 3, 4, 8, 16)  # the joint planner's candidate widths
    pmq_candidates: tuple[int, ...] = (2, 3, 4, 8, 16)
    max_tokens: int | None = 4096  # token sample per layer of the joint options and PMQ factors
    size_step: int = 1  # the joint planner's kept-set size step (larger for many experts)
    search_budget: int | None = 2000  # the joint planner's pruning search, when it searches
    # the joint planner's candidate hold dtypes ("auto": the model's), each plan priced with its cast's own error
    # (JointConfig.hold_dtypes; one: JointConfig.hold_dtype); PMQ keeps the model's
    hold_dtypes: tuple[str, ...] = ("auto",)
    # widths the joint plans may hold each layer's attention and the token embedding / head at (16 always offered)
    attention_widths: tuple[int, ...] = (8, 4)
    embedding_widths: tuple[int, ...] = (8, 4)
    # calibration windows held out to judge the joint planner's candidate plans by measured KL (0: unverified)
    verify_windows: int = 0

    def __post_init__(self) -> None:
        if not self.budgets or not all(0 < b < 1 for b in self.budgets):
            raise ConfigError(f"frontier budgets {list(self.budgets)}: give shares of the original's bytes in (0, 1)")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"frontier budgets {list(self.budgets)}: each budget once")
        self.joint(max(self.budgets))  # the planner's settings fail here, before any measurement

    def joint(self, share: float) -> Any:
        from moeslim.methods.joint import JointConfig

        return JointConfig(target_ratio=share, widths=self.widths, max_tokens=self.max_tokens,
                           size_step=self.size_step, search_budget=self.search_budget,
                           attention_widths=self.attention_widths, embedding_widths=self.embedding_widths,
                           verify_windows=self.verify_windows,
                           **({"hold_dtype": self.hold_dtypes[0]} if len(self.hold_dtypes) == 1
                              else {"hold_dtypes": self.hold_dtypes}))


def single_family(stages: tuple[StageSpec, ...]) -> str | None:
    """The single-method family of a variant's stages ("prune reap", "quantize pmq", "lowrank svd-llm", ...), or
    None when it is not one size-reducing stage (the original, skipping, chains of stages)."""
    if len(stages) != 1 or stages[0].kind not in SINGLE_KINDS:
        return None
    method = getattr(stages[0].config, "method", None)
    return f"{stages[0].kind} {method}" if method else stages[0].kind


Evaluate = Callable[[nn.Module, str, str], VariantResult]  # (model, name, description) -> measured result


class _Runner:
    """Applies plans to copies of the original and measures them; each plan name is measured once."""

    def __init__(self, model: nn.Module, calibration: CalibrationSet, evaluate: Evaluate, plan_dir: Path | None,
                 console: Console) -> None:
        self.model, self.calibration, self.evaluate = model, calibration, evaluate
        self.plan_dir, self.console = plan_dir, console
        self.measured: dict[str, VariantResult] = {}

    def run(self, name: str, plan: Plan, description: str) -> VariantResult:
        from moeslim.appliers import apply

        if name in self.measured:
            return self.measured[name]
        if self.plan_dir is not None:
            plan.save(self.plan_dir / name / f"00-{plan.kind}.json")
        start = time.perf_counter()
        model = copy.deepcopy(self.model)
        apply(model, plan, calibration=self.calibration)
        result = self.evaluate(model, name, description)
        ppl = ", ".join(f"ppl {d} {v:.1f}" for d, v in result.perplexity.items())
        kl = sum(result.kl_divergence.values()) / len(result.kl_divergence) if result.kl_divergence else None
        self.console.print(f"  {name}: {ppl}{f', KL {kl:.4f}' if kl is not None else ''}, "
                           f"{(result.param_bytes or 0) / MIB:.2f} MiB ({time.perf_counter() - start:.0f} s)")
        self.measured[name] = result
        return result


def _pmq_at_least(model: nn.Module, calibration: CalibrationSet, config: FrontierConfig, factors: Any,
                  planned_bytes: Callable[[Plan], int], floor: int, model_name: str) -> Plan:
    """The global PMQ plan of the fewest average bits whose planned held bytes are >= ``floor`` (bisection; at the
    widest candidate every expert keeps its width, so one always exists)."""
    from moeslim.methods.quant.driver import QuantizeConfig, plan_quantize

    def plan_at(bits: float) -> Plan:
        pmq = QuantizeConfig(method="pmq", bits=bits, candidates=config.pmq_candidates, scope="global",
                             quantizer="gptq", max_tokens=config.max_tokens)
        return plan_quantize(model, calibration, pmq, model_name, factors=factors)

    lo, hi = float(min(config.pmq_candidates)), float(max(config.pmq_candidates))
    best = plan_at(lo)
    if planned_bytes(best) >= floor:
        return best
    best = plan_at(hi)
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        plan = plan_at(mid)
        if planned_bytes(plan) >= floor:
            best, hi = plan, mid
        else:
            lo = mid
    return best




def _short(err: Exception) -> str:
    return str(err).split(": raise")[0]


def run_frontier(model: nn.Module, tokenizer: PreTrainedTokenizerBase, model_name: str, label: str,
                 calibration: CalibrationSet, evaluation: EvalConfig, reference: Reference | None,
                 original: VariantResult, singles: list[FrontierPoint], config: FrontierConfig,
                 plan_dir: Path | None = None, console: Console | None = None) -> Frontier:
    """The joint plan at every budget of ``config`` and PMQ at each joint plan's bytes, measured on
    ``evaluation``'s windows (perplexity, and KL against ``reference``; no tasks, no speed), with ``singles`` (the
    caller's measured single-method variants) as the other candidates. The model is not modified."""
    from moeslim.evaluate import evaluate_model
    from moeslim.methods.joint import measure_held, plan_joint
    from moeslim.methods.joint.config import resolve_targets
    from moeslim.methods.joint.hold import as_held
    from moeslim.methods.quant.driver import QuantizeConfig, pmq_factors
    from moeslim.models.held_bytes import held_bytes
    from moeslim.workflows.joint_verify import kl_judge

    console = console or Console(soft_wrap=True)
    quick = dataclasses.replace(evaluation, tasks=(), speed=False)

    def evaluate(m: nn.Module, name: str, description: str) -> VariantResult:
        return evaluate_model(m, tokenizer, quick, name=name, description=description, reference=reference,
                              progress=False)

    runner = _Runner(model, calibration, evaluate, plan_dir, console)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    measure_config = config.joint(max(config.budgets))
    held = measure_held(model, calibration.input_ids, measure_config)  # per hold dtype, serves every budget
    seconds["joint options (once)"] = time.perf_counter() - start
    judge = kl_judge(model, measure_config.batch_size) if config.verify_windows else None
    start = time.perf_counter()
    factors = pmq_factors(model, calibration.input_ids,
                          QuantizeConfig(method="pmq", candidates=config.pmq_candidates, max_tokens=config.max_tokens))
    seconds["PMQ factors (once)"] = time.perf_counter() - start
    console.print(f"  joint options measured once in {seconds['joint options (once)']:.0f} s, PMQ factors in "
                  f"{seconds['PMQ factors (once)']:.0f} s")

    # PMQ holds the model's own dtype: its bytes are priced on the uncast model even when the joint plans cast
    uncast = resolve_targets(model, measure_config.held_as("auto"))

    def planned_bytes(plan: Plan) -> int:
        # the joint planner's byte accounting of a width per expert (tested against measured bytes)
        return int(uncast.base - sum(uncast.sizes[idx].saving(entry["bits"]) for idx, entry in plan.layers.items()))

    rows: list[BudgetRow] = []
    measured: list[FrontierPoint] = []
    notes: list[str] = []
    if any(h != "auto" for h in config.hold_dtypes):
        cast = ", ".join(f"{d}: {held_bytes(as_held(model, d)) / MIB:.2f} MiB" for d in config.hold_dtypes)
        notes.append(f"the joint plans hold every float weight in {' or '.join(config.hold_dtypes)} (auto: the "
                     f"model's dtype; the original as loaded, {cast}), each budget's plan the dtype of least estimated "
                     "error with the cast's own KL priced in; the single methods and PMQ keep the model's dtype")
    start = time.perf_counter()
    for share in sorted(config.budgets):
        target = int(share * uncast.original)
        try:
            plan = plan_joint(model, calibration, config.joint(share), model_name, measured=held, judge=judge)
        except (ConfigError, ValueError) as err:
            rows.append(BudgetRow(share, target, None, _short(err)))
            notes.append(f"{share:.0%}: no joint plan fits: {_short(err)}")
            continue
        name = f"joint-{round(100 * share)}"
        result = runner.run(name, plan, f"joint plan at {share:.0%} of the original's held bytes")
        joint = point_of(result, "joint", float(plan.summary["estimated_error"]))
        rows.append(BudgetRow(share, target, joint))
        verified = plan.summary.get("verification")
        if verified:
            notes.append(f"{share:.0%}: verification kept {verified['chosen']} (measured KL on "
                         f"{verified['windows']} held-out calibration windows: " + ", ".join(
                             f"{c['name']} {c['measured_kl']:.3g}" for c in verified["candidates"]) + ")")
        if len(config.hold_dtypes) > 1:
            notes.append(f"{share:.0%}: joint plan held in {plan.summary['hold_dtype'] or 'the model dtype (auto)'}"
                         f"; estimates: {hold_estimates(plan.summary['hold_candidates'])}")
        pmq = _pmq_at_least(model, calibration, config, factors, planned_bytes, joint.held_bytes, model_name)
        bits = float(pmq.summary["target_bits"])
        pmq_result = runner.run(f"pmq-{bits:.3f}", pmq, f"PMQ (global), {bits:.3f} average bits: the fewest "
                                f"whose bytes are at least joint-{round(100 * share)}'s")
        point = point_of(pmq_result, PMQ_FAMILY)
        if point not in measured:
            measured.append(point)
        if point.held_bytes < joint.held_bytes:
            notes.append(f"{share:.0%}: PMQ planned at {planned_bytes(pmq) / MIB:.3f} MiB measured "
                         f"{point.held_bytes / MIB:.3f} MiB, below the joint plan's {joint.held_bytes / MIB:.3f}")
    seconds["budgets (plan, apply, evaluate)"] = time.perf_counter() - start
    return Frontier(model=label, original=point_of(original, "original"), budgets=rows,
                    singles=[*singles, *measured], seconds=seconds, notes=notes)
