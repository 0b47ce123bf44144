"""``moeslim demo``: the main job. Original vs a set of compressed variants of the embedded model.

Runs offline on the bundled demo model and corpus: pruning (enumeration vs the baselines at two
keep ratios, task-specific pruning on code), dynamic skipping alone and after pruning, and
mixed-precision quantization; prints the side-by-side table and writes report.md + plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from moeslim.config import CalibrationConfig, ConfigError, EvalConfig
from moeslim.workflows.stages import StageSpec, parse_stage
from moeslim.workflows.variants import Variant


@dataclass(frozen=True)
class DemoConfig:
    model: str = "demo"
    out: str = "runs/demo"
    samples: int = 32
    seq_len: int = 256
    eval_windows: int = 24
    task_limit: int = 100
    speed: bool = True
    quick: bool = False  # fewer variants, for tests and a first look

    def __post_init__(self) -> None:
        if self.samples < 1 or self.eval_windows < 1 or self.task_limit < 1:
            raise ConfigError("samples, eval_windows and task_limit must be at least 1")


def _stage(kind: str, **params: object) -> StageSpec:
    return parse_stage({kind: params}, "demo")


def _prune(method: str, keep: int, **extra: object) -> StageSpec:
    return _stage("prune", method=method, keep=keep, **extra)


def demo_variants(config: DemoConfig, calibration: CalibrationConfig) -> list[Variant]:
    """The variants the demo compares; names are short because they label plot points."""
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
    ]
    if config.quick:
        keep = {"enum-4", "freq-4", "skip", "pmq-2.5"}
        variants = [v for v in variants if v.name in keep]
    return variants


def run_demo(config: DemoConfig) -> Path:
    from moeslim.evaluate import write_report
    from moeslim.models import load_model, resolve_model_path
    from moeslim.outputs import check_output_file
    from moeslim.workflows.expert_load import expert_loads, plot_expert_load
    from moeslim.workflows.run_folder import write_results
    from moeslim.workflows.variants import CalibrationCache, evaluate_variants, print_table

    console = Console()
    out = Path(config.out)
    for name in ("results.json", "report.md", "report.json"):  # fail now, not after the variants ran
        check_output_file(out / name, inputs=[resolve_model_path(config.model)])
    calibration = CalibrationConfig(samples=config.samples, seq_len=config.seq_len)
    evaluation = EvalConfig(seq_len=config.seq_len, max_windows=config.eval_windows,
                            tasks=("moeslim_code_nextline", "moeslim_prose_continuation"),
                            task_limit=config.task_limit, speed=config.speed)
    model, tokenizer = load_model(config.model)
    if tokenizer is None:
        raise ConfigError(f"{config.model} has no tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]moeslim demo[/] on {config.model}: calibration {calibration.samples} x "
                  f"{calibration.seq_len} tokens from {', '.join(calibration.data)}")
    loads = expert_loads(model, CalibrationCache(tokenizer).get(calibration).input_ids)
    plot_expert_load(loads, out / "expert_load.png", f"{config.model}: expert load on calibration text")
    variants = demo_variants(config, calibration)
    results, _ = evaluate_variants(config.model, model, tokenizer, variants, calibration, evaluation, out)
    write_results(results, out)
    report = write_report(results, out, title=f"moeslim demo: {config.model}")
    print_table(results, f"moeslim demo: {config.model} (ppl on held-out test text; % vs original)")
    console.print(f"wrote {report}, results.json, plans/ and plots in {out}")
    return report
