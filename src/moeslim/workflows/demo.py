"""``moeslim demo``: the main job. Original vs a set of compressed variants of the embedded models.

Runs offline on the bundled demo models and corpus. ``--model demo`` (the default) runs both embedded models,
each with its own side-by-side table: the Mixtral-layout model (8 experts, top-2; pruning by enumeration vs the
baselines at two keep ratios, task-specific pruning on code, dynamic skipping alone and after pruning,
mixed-precision quantization) and the fine-grained Qwen3-MoE model (64 experts, top-8; search vs the baselines
at 25 % and 50 % expert removal). ``--model demo-moe`` / ``--model demo-fine`` run one of them; any other model
gets the Mixtral variants when it has 8 experts per layer and the removal-share variants otherwise.

With ``frontier=True`` (``moeslim demo --frontier``) each model also gets its frontier
(``workflows/frontier.py``): the joint plan at 5 budgets from 15 % to 80 % of the original's held bytes against the
best single method at equal or larger measured bytes (PMQ run at each joint plan's bytes, and the demo's own pruned,
quantized, low-rank and merged variants), as a table and a plot (``frontier.png``) in the report and in
``frontier.json``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from rich.console import Console

from moeslim.config import CalibrationConfig, ConfigError, EvalConfig
from moeslim.evaluate.frontier import Frontier, frontier_summary_table, point_of, rank_correlation
from moeslim.workflows.frontier import FrontierConfig
from moeslim.workflows.stages import StageSpec, parse_stage
from moeslim.workflows.variants import Variant

BOTH = "demo"  # the default: both embedded models, one after the other
FINE_SUBDIR = "fine"  # with --model demo, the fine-grained model's outputs go to OUT/fine
# Removal shares of the fine-grained variants, and the token sample and budget of their search: search scores
# ~E^2 kept sets per layer (E = 64: 904 on the greedy path to 48, 1552 to 32, 1024 per swap round), so to stay in
# the demo's time budget on a 2-core CPU it runs on 512 calibration tokens with 1000 loss evaluations per layer
# (past the budget the removal path is finished by removal loss). benchmarks/prune_fine.py runs it with more.
FINE_REMOVAL = (0.25, 0.5)
FINE_SEARCH_TOKENS = 512
FINE_SEARCH_BUDGET = 1000
THIRD_PARTY_LOG = "third-party.log"  # lm-eval's progress bars and warnings, kept out of the console
FRONTIER_FILE = "frontier.json"
FRONTIER_BUDGETS = (0.15, 0.25, 0.4, 0.6, 0.8)
QUICK_BUDGETS = (0.25, 0.6)
# The frontier's joint options and PMQ factors on at most this many calibration tokens per layer (of the demo's
# 32 x 256): the joint options measure every expert at every width with GPTQ, once per model. With 64 experts
# the kept-set sizes go in steps of 8 and the pruning search (its loss curve from 64 down to 8 experts, which
# dominates the options' time there) stops at 300 loss evaluations per layer, the rest of the removal path
# finished by removal loss: the joint plans on this model keep nearly every expert, so the curve's far end
# matters least.
FRONTIER_TOKENS = 4096
FINE_FRONTIER_TOKENS = 2048
FINE_FRONTIER_STEP = 8
FINE_FRONTIER_SEARCH = 300
FRONTIER_HOLD_DTYPES: Final = ("auto", "float16")


@dataclass(frozen=True)
class DemoConfig:
    model: str = BOTH  # "demo": both embedded models; "demo-moe" | "demo-fine": one; else a checkpoint
    out: str = "runs/demo"
    samples: int = 32
    seq_len: int = 256
    eval_windows: int = 24
    task_limit: int = 100
    speed: bool = True
    quick: bool = False  # fewer variants, for tests and a first look
    # the joint plan at several budgets against the best single method: opt-in, as it takes about 20 CPU minutes
    # on the 8-expert model alone, twice the rest of the demo
    frontier: bool = False
    overwrite: bool = False  # replace an earlier demo's results in ``out``

    def __post_init__(self) -> None:
        if self.samples < 1 or self.eval_windows < 1 or self.task_limit < 1:
            raise ConfigError("samples, eval_windows and task_limit must be at least 1")


VariantsFn = Callable[["DemoConfig", CalibrationConfig, int], list[Variant]]


@dataclass(frozen=True)
class DemoModel:
    """One model the demo runs: its label, what ``load_model`` gets, where its outputs go, its variants."""

    label: str
    model: str
    out: Path
    variants: VariantsFn | None  # None: chosen from the model's expert count once it is loaded


def _stage(kind: str, **params: object) -> StageSpec:
    return parse_stage({kind: params}, "demo")


def _prune(method: str, keep: int, **extra: object) -> StageSpec:
    return _stage("prune", method=method, keep=keep, **extra)


def demo_variants(config: DemoConfig, calibration: CalibrationConfig, num_experts: int = 8) -> list[Variant]:
    """The variants of the 8-expert model; names are short because they label plot points."""
    if num_experts != 8:
        raise ConfigError(f"the Mixtral demo variants keep 6 and 4 of 8 experts; this model has {num_experts}")
    code_only = CalibrationConfig(data=("demo:code",), samples=calibration.samples, seq_len=calibration.seq_len,
                                  seed=calibration.seed)
    variants = [
        Variant("enum-6", (_prune("enumerate", 6),), description="enumerate, keep 6 of 8 (layer-wise)"),
        Variant("freq-6", (_prune("frequency", 6),), description="frequency, keep 6 of 8"),
        Variant("reap-6", (_prune("reap", 6),), description="REAP saliency, keep 6 of 8"),
        Variant("random-6", (_prune("random", 6, seed=0),), description="random, keep 6 of 8 (seed 0)"),
        Variant("enum-4", (_prune("enumerate", 4),), description="enumerate, keep 4 of 8 (layer-wise)"),
        Variant("freq-4", (_prune("frequency", 4),), description="frequency, keep 4 of 8"),
        Variant("reap-4", (_prune("reap", 4),), description="REAP saliency, keep 4 of 8"),
        Variant("random-4", (_prune("random", 4, seed=0),), description="random, keep 4 of 8 (seed 0)"),
        Variant("enum-4-code", (_prune("enumerate", 4),), calibration=code_only,
                description="enumerate keep 4, calibrated on code only (task-specific)"),
        Variant("skip", (_stage("skip"),), description="dynamic skipping (median beta per layer)"),
        Variant("enum-6+skip", (_prune("enumerate", 6), _stage("skip")),
                description="enumerate keep 6, then skipping calibrated on the pruned model"),
        Variant("pmq-2.5", (_stage("quantize", method="pmq", bits=2.5),),
                description="PMQ mixed precision, 2.5 bits/expert weight (GPTQ, group 128)"),
        Variant("uniform-3", (_stage("quantize", method="uniform", bits=3),),
                description="uniform 3-bit GPTQ experts (group 128)"),
        Variant("merge-hc-4", (_stage("merge", method="hc-smoe", keep=4, router="fit"),),
                description="HC-SMoE merge 8 -> 4 experts (frequency-weighted, 4 fitted router rows: a smaller "
                            "checkpoint)"),
        Variant("lowrank-0.5", (_stage("lowrank", ratio=0.5),),
                description="low-rank experts: per-expert whitened SVD (SVD-LLM), 50% of the expert weights"),
    ]
    if config.quick:
        keep = {"enum-4", "freq-4", "skip", "pmq-2.5"}
        variants = [v for v in variants if v.name in keep]
    return variants


def fine_variants(config: DemoConfig, calibration: CalibrationConfig, num_experts: int) -> list[Variant]:
    """Removal-share variants for a model with many experts (enumeration is out of reach there), skipping and PMQ."""
    variants = []
    for share in FINE_REMOVAL:
        keep = num_experts - round(share * num_experts)
        what = f"keep {keep} of {num_experts} ({share:.0%} removed)"
        variants += [
            Variant(f"search-{keep}", (_prune("search", keep, max_tokens=FINE_SEARCH_TOKENS,
                                              budget=FINE_SEARCH_BUDGET),),
                    description=f"search (greedy removal + swaps, enumerate objective), {what}"),
            Variant(f"freq-{keep}", (_prune("frequency", keep),), description=f"frequency, {what}"),
            Variant(f"reap-{keep}", (_prune("reap", keep),), description=f"REAP saliency, {what}"),
        ]
    variants += [
        Variant("skip", (_stage("skip", rule="topk"),),
                description="dynamic skipping, top-k rule (median beta per layer)"),
        Variant("uniform-3", (_stage("quantize", method="uniform", bits=3),),
                description="uniform 3-bit GPTQ experts (group 128)"),
    ]
    # No random row here (the Mixtral table has them; benchmarks/prune_fine.py has random over seeds), and one
    # skipping and one quantized row, so that the two embedded models together stay near the demo's 10 minutes
    # (GPTQ of the 4 x 64 experts on the demo's calibration windows takes about 15 s on one CPU thread).
    if config.quick:
        variants = [v for v in variants if v.name.startswith(("freq-", "reap-"))][:2]
    return variants


def frontier_config(config: DemoConfig, num_experts: int) -> FrontierConfig | None:
    """The frontier's budgets and planner settings for a model with ``num_experts`` per layer (None: no frontier)."""
    if not config.frontier:
        return None
    budgets = QUICK_BUDGETS if config.quick else FRONTIER_BUDGETS
    # Both embedded checkpoints are stored in bfloat16 and the demo loads them in float32; each joint plan holds
    # them as loaded or in float16 (the embeddings and attention then take half the bytes of a small budget), the
    # one of least estimated error with the cast's own KL priced in. float16 holds the stored bfloat16 weights
    # exactly (within its range) and computes with 3 more mantissa bits than bfloat16: the cast's KL on the test
    # windows is 4.3e-5 against bfloat16's 1.3e-4 (demo-moe) and 2.5e-4 (demo-fine), at the same bytes. A model
    # whose float16 cast overflows is held as loaded (the candidate is refused, and the report says so).
    if num_experts <= 16:
        return FrontierConfig(budgets=budgets, max_tokens=FRONTIER_TOKENS, hold_dtypes=FRONTIER_HOLD_DTYPES)
    return FrontierConfig(budgets=budgets, max_tokens=FINE_FRONTIER_TOKENS, size_step=FINE_FRONTIER_STEP,
                          search_budget=FINE_FRONTIER_SEARCH, hold_dtypes=FRONTIER_HOLD_DTYPES)


def demo_models(config: DemoConfig) -> list[DemoModel]:
    """What ``config.model`` names: both embedded models, one of them, or any other checkpoint."""
    out = Path(config.out)
    moe = DemoModel("demo", "demo", out, demo_variants)
    fine = DemoModel("demo-fine", "demo-fine", out, fine_variants)
    if config.model == BOTH:
        return [moe, DemoModel(fine.label, fine.model, out / FINE_SUBDIR, fine_variants)]
    if config.model == "demo-moe":
        return [moe]
    if config.model == "demo-fine":
        return [fine]
    return [DemoModel(config.model, config.model, out, None)]


def run_demo(config: DemoConfig) -> Path:
    """Run every model ``config.model`` names; returns the first model's report."""
    from moeslim.models import resolve_model_path
    from moeslim.outputs import check_output_file, output_lock

    models = demo_models(config)
    names = ("results.json", "report.md", "report.json", FRONTIER_FILE, THIRD_PARTY_LOG)
    outputs = [(m, m.out / name) for m in models for name in names]
    with contextlib.ExitStack() as locks:
        for m, path in outputs:  # fail now, not after the variants ran
            locks.enter_context(output_lock(path))
            check_output_file(path, overwrite=config.overwrite, inputs=[resolve_model_path(m.model)])
        reports = [run_demo_model(config, m) for m in models]
    if len(reports) > 1:
        Console(soft_wrap=True).print("reports: " + ", ".join(str(r) for r in reports))
    return reports[0]


def run_demo_model(config: DemoConfig, demo_model: DemoModel) -> Path:
    """Original vs the variants of one model: table, report.md, results.json, plans/ and plots."""
    from moeslim.evaluate import write_report
    from moeslim.evaluate.driver import build_reference
    from moeslim.evaluate.quiet import third_party_output
    from moeslim.models import find_moe_layers, load_model
    from moeslim.workflows.expert_load import expert_loads, plot_expert_load
    from moeslim.workflows.run_folder import write_results
    from moeslim.workflows.variants import CalibrationCache, evaluate_variants, print_table

    console = Console(soft_wrap=True)  # paths and headlines stay on one line off a terminal
    out, label = demo_model.out, demo_model.label
    calibration = CalibrationConfig(samples=config.samples, seq_len=config.seq_len)
    evaluation = EvalConfig(seq_len=config.seq_len, max_windows=config.eval_windows,
                            tasks=("moeslim_code_nextline", "moeslim_prose_continuation"),
                            task_limit=config.task_limit, speed=config.speed)
    out.mkdir(parents=True, exist_ok=True)
    with (out / THIRD_PARTY_LOG).open("w", encoding="utf-8") as log:
        with third_party_output(log):  # transformers' "Loading weights" bar
            model, tokenizer = load_model(demo_model.model)
        if tokenizer is None:
            raise ConfigError(f"{demo_model.model} has no tokenizer")
        num_experts = find_moe_layers(model)[0].num_experts
        make_variants = demo_model.variants or (demo_variants if num_experts == 8 else fine_variants)
        console.print(f"[bold]moeslim demo[/] on {label} ({num_experts} experts per layer): calibration "
                      f"{calibration.samples} x {calibration.seq_len} tokens from {', '.join(calibration.data)}")
        calibration_set = CalibrationCache(tokenizer).get(calibration)
        loads = expert_loads(model, calibration_set.input_ids)
        plot_expert_load(loads, out / "expert_load.png", f"{label}: expert load on calibration text")
        variants = make_variants(config, calibration, num_experts)
        # one KL reference for the variants and the frontier: the same windows, scored once
        reference = build_reference(model, tokenizer, evaluation, demo_model.model)
        results, _ = evaluate_variants(demo_model.model, model, tokenizer, variants, calibration, evaluation, out,
                                       log=log, reference=reference)
        frontier = _frontier(config, demo_model, model, tokenizer, num_experts, variants, results, calibration_set,
                             evaluation, reference, console)
    write_results(results, out)
    report = write_report(results, out, title=f"moeslim demo: {label}", frontier=frontier)
    print_table(results, f"moeslim demo: {label} (ppl on held-out test text; % vs original)")
    if frontier is not None:
        _print_frontier(frontier, console)
    console.print(f"wrote {report}, results.json, plans/, plots and {THIRD_PARTY_LOG} (what lm-eval and "
                  f"transformers printed) in {out}")
    return report


def _frontier(config: DemoConfig, demo_model: DemoModel, model: Any, tokenizer: Any, num_experts: int,
              variants: list[Variant], results: list[Any], calibration_set: Any, evaluation: EvalConfig,
              reference: Any, console: Console) -> Frontier | None:
    """The joint plan at the frontier's budgets against PMQ at the same bytes and the demo's single-method
    variants (reused as measured); writes frontier.json."""
    from moeslim.outputs import write_text_atomic
    from moeslim.workflows.frontier import run_frontier, single_family

    settings = frontier_config(config, num_experts)
    if settings is None:
        return None
    original = results[0]
    singles = []
    for variant, result in zip(variants, results[1:], strict=True):
        family = single_family(variant.stages)
        # task-specific calibrations and variants that hold no fewer bytes (skipping) are not size methods
        if family and variant.calibration is None and (result.param_bytes or 0) < (original.param_bytes or 0):
            singles.append(point_of(result, family))
    budgets = ", ".join(f"{b:.0%}" for b in settings.budgets)
    console.print(f"[bold]frontier[/]: the joint plan at {budgets} of the original's held bytes, and PMQ at each "
                  f"joint plan's bytes ({len(singles)} single-method variants above reused)")
    start, cpu = time.perf_counter(), time.process_time()
    frontier = run_frontier(model, tokenizer, demo_model.model, demo_model.label, calibration_set, evaluation,
                            reference, original, singles, settings, demo_model.out / "plans", console)
    frontier.seconds["total"] = time.perf_counter() - start
    frontier.seconds["total CPU"] = time.process_time() - cpu  # all threads: comparable on a shared machine
    write_text_atomic(demo_model.out / FRONTIER_FILE, json.dumps(frontier.to_dict(), indent=1) + "\n")
    return frontier


def _print_frontier(frontier: Frontier, console: Console) -> None:
    rho, n = rank_correlation(frontier)
    console.print(f"frontier of {frontier.model}: joint plan vs the best single method at equal or larger bytes")
    for line in frontier_summary_table(frontier):
        console.print(line, markup=False, highlight=False)
    console.print(f"spearman(estimated error, KL) over {n} joint plans: {rho:.3f}; frontier took "
                  f"{frontier.seconds.get('total', 0.0):.0f} s ({frontier.seconds.get('total CPU', 0.0):.0f} s CPU)")
