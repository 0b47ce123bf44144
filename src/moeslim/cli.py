"""The ``moeslim`` command: parse arguments into validated configs, call the library, print results.

No logic lives here: every subcommand builds configs (which fail fast on bad values) and calls
library functions with plain values.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from moeslim.config import DEFAULT_CALIBRATION_DATA, CalibrationConfig, ConfigError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from moeslim.plans import Plan

console = Console()


def _add_calibration_args(parser: argparse.ArgumentParser, data_default: Sequence[str] | None) -> None:
    parser.add_argument("--data", action="append", default=None,
                        help="text source: demo:DOMAIN[:SPLIT], a .txt/.jsonl/.parquet file, or "
                             f"hf:NAME[:CONFIG][:SPLIT]; repeatable (default: {', '.join(data_default or [])})")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the window draw (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")


def _calibration_config(args: argparse.Namespace, default: Sequence[str], **extra: object) -> CalibrationConfig:
    return CalibrationConfig(
        data=tuple(args.data or default), samples=args.samples, seq_len=args.seq_len, seed=args.seed,
        batch_size=args.batch_size, **extra,  # type: ignore[arg-type]
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    from moeslim.calibration_data import build_calibration_set
    from moeslim.inspect import inspect_model, plot_expert_load
    from moeslim.models import load_model

    calib = _calibration_config(args, ()) if args.data else None
    model, tokenizer = load_model(args.model)
    input_ids, name = None, None
    if calib is not None:
        if tokenizer is None:
            raise ConfigError(f"{args.model} has no tokenizer; --data needs one")
        calib_set = build_calibration_set(calib, tokenizer)
        input_ids, name = calib_set.input_ids, calib_set.name
    report = inspect_model(model, input_ids, data=name, batch_size=calib.batch_size if calib else 8)
    _print_summary(args.model, report.summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "summary": report.summary, "data": report.data,
               "loads": [vars(entry) for entry in report.loads]}
    (out / "inspect.json").write_text(json.dumps(payload, indent=1) + "\n")
    if report.loads:
        _print_loads(report.loads)
        plot = plot_expert_load(report.loads, out / "expert_load.png", f"{args.model}: expert load on {name}")
        console.print(f"wrote {plot}")
    console.print(f"wrote {out / 'inspect.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from moeslim.config import EvalConfig
    from moeslim.evaluate import evaluate_model
    from moeslim.io import load
    from moeslim.variants import print_table

    config = EvalConfig(
        data=tuple(args.data or EvalConfig.data), seq_len=args.seq_len, max_windows=args.max_windows,
        tasks=_task_names(args.tasks), task_limit=args.task_limit, speed=args.speed, batch_size=args.batch_size,
    )
    out = Path(args.out)
    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer; eval needs one")
    checkpoint = Path(args.model) if Path(args.model).is_dir() else None
    result = evaluate_model(
        model, tokenizer, data_specs=list(config.data), seq_len=config.seq_len, max_windows=config.max_windows,
        tasks=list(config.tasks), limit=config.task_limit, speed=config.speed, name=args.name or args.model,
        checkpoint_dir=checkpoint, batch_size=config.batch_size,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.to_dict(), indent=1, default=str) + "\n")
    print_table([result], f"eval: {args.model}")
    console.print(f"wrote {out}")
    return 0


def _task_names(given: list[str] | None) -> tuple[str, ...]:
    from moeslim.evaluate import OFFLINE_TASKS

    if given is None:
        return tuple(OFFLINE_TASKS)
    return tuple(t for t in given if t != "none")


def cmd_apply(args: argparse.Namespace) -> int:
    from moeslim.appliers import apply
    from moeslim.io import load, save
    from moeslim.plans import Plan

    plans = [Plan.load(p) for p in args.plans]
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {out} already exists; choose another folder or pass --overwrite")
    model, tokenizer = load(args.model)
    for plan in plans:
        _attach_gptq(model, tokenizer, plan)
        apply(model, plan)
    save(model, out, tokenizer, overwrite=args.overwrite)
    console.print(f"wrote checkpoint {out}")
    return 0


def _attach_gptq(model: nn.Module, tokenizer: PreTrainedTokenizerBase, plan: Plan) -> None:
    """A quantize plan made with GPTQ: redraw its calibration windows and redo GPTQ before applying it."""
    from moeslim.calibration_data import build_calibration_set
    from moeslim.config import CalibrationConfig
    from moeslim.methods.quant.driver import attach_gptq_results

    recorded = plan.summary.get("calibration")
    if plan.kind != "quantize" or not plan.summary.get("gptq_results") or not recorded:
        return
    config = CalibrationConfig(**{**recorded, "data": tuple(recorded["data"])})
    console.print(f"GPTQ on the plan's calibration data ({', '.join(config.data)}, {config.samples} windows)")
    attach_gptq_results(model, plan, build_calibration_set(config, tokenizer))


def cmd_report(args: argparse.Namespace) -> int:
    from moeslim.evaluate import write_report

    path = write_report(args.inputs, args.out, title=args.title)
    console.print(f"wrote {path} (+ report.json and plots in {path.parent})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from moeslim.recipe import load_recipe
    from moeslim.runs import run_recipe

    recipe = load_recipe(args.recipe)
    run_recipe(recipe, out_root=args.out)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from moeslim.calibration_data import build_calibration_set
    from moeslim.io import load
    from moeslim.pipeline import parse_stage

    params = {k: v for k, v in _PLAN_FIELDS[args.kind](args).items() if v is not None}
    stage = parse_stage({args.kind: params}, f"plan {args.kind}")  # validates before loading the model
    calib = _calibration_config(args, DEFAULT_CALIBRATION_DATA)
    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer; calibration needs one")
    from moeslim.pipeline import plan_stage

    plan = plan_stage(model, stage, build_calibration_set(calib, tokenizer), args.model)
    if plan.kind == "quantize":
        console.print("note: `moeslim apply` redoes GPTQ on the calibration data recorded in the plan")
    path = plan.save(args.out)
    console.print_json(data={"layers": {str(k): v for k, v in plan.layers.items()}})
    console.print(f"wrote {path}")
    return 0


def _prune_fields(args: argparse.Namespace) -> dict[str, object]:
    return {"method": args.method, "keep": args.keep, "mode": args.mode, "budget": args.budget,
            "beam": args.beam, "seed": args.seed}


def _skip_fields(args: argparse.Namespace) -> dict[str, object]:
    return {"rule": args.rule, "quantile": args.quantile}


def _quantize_fields(args: argparse.Namespace) -> dict[str, object]:
    candidates = tuple(int(b) for b in args.candidates.split(",")) if args.candidates else None
    return {"method": args.method, "bits": args.bits, "candidates": candidates, "alpha": args.alpha,
            "beta": args.beta, "gamma": args.gamma, "group_size": args.group_size, "scope": args.scope,
            "seed": args.seed}


_PLAN_FIELDS = {"prune": _prune_fields, "skip": _skip_fields, "quantize": _quantize_fields}


def cmd_demo(args: argparse.Namespace) -> int:
    from moeslim.demo import DemoConfig, run_demo

    run_demo(DemoConfig(model=args.model, out=args.out, quick=args.quick, speed=not args.no_speed))
    return 0


def _print_summary(model_name: str, summary: dict) -> None:
    table = Table(title=f"{model_name}: architecture")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        table.add_row(key, shown)
    console.print(table)


def _print_loads(loads: list) -> None:
    experts = len(loads[0].load)
    table = Table(title="expert load: % of routed tokens per expert")
    table.add_column("layer", justify="right")
    for e in range(min(experts, 16)):
        table.add_column(str(e), justify="right")
    table.add_column("entropy / max", justify="right")
    table.add_column("never routed", justify="right")
    for entry in loads:
        cells = [f"{100 * v:.1f}" for v in entry.load[:16]]
        table.add_row(str(entry.layer), *cells, f"{entry.entropy:.2f} / {entry.max_entropy:.2f}",
                      ",".join(map(str, entry.never_routed)) or "-")
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeslim",
        description="Make Mixture-of-Experts models smaller and faster without retraining: "
        "calibrate -> plan -> apply -> evaluate -> save.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="architecture summary and expert load")
    p.add_argument("model", help="local directory, hub id (online), or 'demo'")
    _add_calibration_args(p, DEFAULT_CALIBRATION_DATA)
    p.add_argument("--out", default="runs/inspect", help="output folder (default runs/inspect)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="perplexity per domain, task accuracy, cost and speed of one model")
    p.add_argument("model", help="checkpoint folder, hub id (online), or 'demo'")
    p.add_argument("--data", action="append", default=None,
                   help="text source to score (default demo:code and demo:prose, test split); repeatable")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per fixed, non-overlapping window")
    p.add_argument("--max-windows", type=int, default=64, help="windows per source (seeded draw; default 64)")
    p.add_argument("--tasks", action="append", default=None,
                   help="lm-eval task name, repeatable (default: the bundled offline tasks "
                        "moeslim_code_nextline and moeslim_prose_continuation; 'none' for no tasks)")
    p.add_argument("--task-limit", type=int, default=None, help="items per task (default all)")
    p.add_argument("--speed", action="store_true", help="also time prefill and decode")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--name", default=None, help="label of this model in the report")
    p.add_argument("--out", default="runs/eval/result.json", help="result JSON path")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("apply", help="apply one or more plans and save a checkpoint")
    p.add_argument("model", help="checkpoint folder, hub id (online), or 'demo'")
    p.add_argument("plans", nargs="+", help="plan JSON files, applied in order")
    p.add_argument("--out", required=True, help="checkpoint folder to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("report", help="side-by-side report.md/json + plots from results or run folders")
    p.add_argument("inputs", nargs="+", help="run folders or result/report JSON files; the first is the reference")
    p.add_argument("--out", default="runs/report", help="output folder (default runs/report)")
    p.add_argument("--title", default="moeslim report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="run a recipe: stages -> checkpoint -> side-by-side report")
    p.add_argument("recipe", help="recipe YAML/JSON (see examples/)")
    p.add_argument("--out", default="runs", help="parent of the run folder (default runs)")
    p.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="compute a plan (JSON) from calibration data").add_subparsers(
        dest="kind", required=True)
    p = plan.add_parser("prune", help="choose which experts each layer keeps")
    p.add_argument("model")
    p.add_argument("--method", default="enumerate",
                   help="enumerate | search | frequency | soft-count | reap | random (default enumerate)")
    p.add_argument("--keep", type=int, required=True, help="experts to keep per layer")
    p.add_argument("--mode", default=None, help="layerwise (default) | progressive")
    p.add_argument("--budget", type=int, default=None, help="search: max loss evaluations per layer")
    p.add_argument("--beam", type=int, default=None, help="search: beam width")
    _add_calibration_args(p, DEFAULT_CALIBRATION_DATA)
    p.add_argument("--out", required=True, help="plan JSON path")
    p.set_defaults(func=cmd_plan)

    p = plan.add_parser("skip", help="per-layer dynamic skipping thresholds")
    p.add_argument("model")
    p.add_argument("--rule", default=None, help="top2 (the paper's rule) | topk (appendix rule for k > 2)")
    p.add_argument("--quantile", type=float, default=None,
                   help="share of tokens that skip (default 0.5: the median ratio)")
    _add_calibration_args(p, DEFAULT_CALIBRATION_DATA)
    p.add_argument("--out", required=True, help="plan JSON path")
    p.set_defaults(func=cmd_plan)

    p = plan.add_parser("quantize", help="bit-width per expert (PMQ mixed precision or uniform)")
    p.add_argument("model")
    p.add_argument("--method", default="pmq", help="pmq | uniform | random (default pmq)")
    p.add_argument("--bits", type=float, required=True, help="average bits per expert weight")
    p.add_argument("--candidates", default=None, help="candidate widths, e.g. 1,2,3")
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--scope", default=None, help="layer (the paper: budget per layer) | global")
    _add_calibration_args(p, DEFAULT_CALIBRATION_DATA)
    p.add_argument("--out", required=True, help="plan JSON path")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="the main job: original vs compressed variants of the embedded model")
    p.add_argument("--model", default="demo", help="model to run the demo on (default: the embedded model)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="four variants instead of all")
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, OSError) as err:  # our errors are ValueErrors; OSError: missing files/models
        console.print(f"[bold red]error:[/] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
