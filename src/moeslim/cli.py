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
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from moeslim.config import DEFAULT_CALIBRATION_DATA, CalibrationConfig, ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from moeslim.calibrate.distributed import World
    from moeslim.data.calibration_set import CalibrationSet
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


def _add_device_args(parser: argparse.ArgumentParser, stream: bool = False) -> None:
    parser.add_argument("--device", default="auto",
                        help="where layers compute: auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto",
                        help="float type of the weights: auto (bfloat16 on cuda, float32 on cpu) | float32 | "
                             "bfloat16 | float16")
    if stream:
        parser.add_argument("--resume", action="store_true",
                            help="write each finished layer to .OUT.layers/ and, rerun with the same arguments "
                                 "after a kill, continue at the next layer (prune and skip plans)")
        parser.add_argument("--stream", action="store_true",
                            help="build the model on the meta device and read each decoder layer from the "
                                 "safetensors shards when calibration reaches it (memory: one layer, not the model)")


def _device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    from moeslim.devices import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def _join_torchrun(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group when started by it (WORLD_SIZE > 1); a plain run is rank 0 of 1.
    On CUDA each process computes on its own GPU (cuda:LOCAL_RANK)."""
    from moeslim.calibrate.distributed import init_from_env, process_device

    world = init_from_env(device)
    return world, process_device(device, world)


def _resume_checkpoint(args: argparse.Namespace, stage: object, calib: CalibrationConfig, dtype: torch.dtype,
                       device: torch.device, world: World) -> Any:
    """Per-layer state beside --out (``.NAME.layers/``), keyed by everything the plan depends on."""
    import dataclasses

    from moeslim.calibrate.resume import LayerCheckpoint, run_key
    from moeslim.models import resolve_model_path

    if args.kind == "quantize":
        raise ConfigError("--resume works for plan prune and plan skip; quantize plans recompute their factors")
    key = run_key(model=resolve_model_path(args.model), stage=dataclasses.asdict(stage.config),  # type: ignore[attr-defined]
                  calibration=dataclasses.asdict(calib), dtype=str(dtype), device=device.type, world=world.size,
                  stream=args.stream)
    out = Path(args.out)
    return LayerCheckpoint(out.parent / f".{out.name}.layers", key, rank=world.rank)


def _load_streamed(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from moeslim.models.lazy import load_streamed

    return load_streamed(name, dtype)


def _calibration_config(args: argparse.Namespace, default: Sequence[str], **extra: object) -> CalibrationConfig:
    return CalibrationConfig(
        data=tuple(args.data or default), samples=args.samples, seq_len=args.seq_len, seed=args.seed,
        batch_size=args.batch_size, **extra,  # type: ignore[arg-type]
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.models import load_model
    from moeslim.outputs import check_output_file, write_text_atomic
    from moeslim.workflows.expert_load import inspect_model, plot_expert_load

    calib = _calibration_config(args, ()) if args.data else None
    out = Path(args.out)
    for name in ("inspect.json", "expert_load.png"):
        check_output_file(out / name, inputs=_input_paths(args.model))
    device, dtype = _device_and_dtype(args)
    model, tokenizer = load_model(args.model, dtype=dtype, device=str(device))
    input_ids, name = None, None
    if calib is not None:
        if tokenizer is None:
            raise ConfigError(f"{args.model} has no tokenizer; --data needs one")
        calib_set = build_calibration_set(calib, tokenizer)
        input_ids, name = calib_set.input_ids, calib_set.name
    report = inspect_model(model, input_ids, data=name, batch_size=calib.batch_size if calib else 8)
    _print_summary(args.model, report.summary)
    payload = {"model": args.model, "summary": report.summary, "data": report.data,
               "loads": [vars(entry) for entry in report.loads]}
    write_text_atomic(out / "inspect.json", json.dumps(payload, indent=1) + "\n")
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
    from moeslim.models.loading import check_context
    from moeslim.outputs import check_output_file, write_text_atomic
    from moeslim.workflows.variants import print_table

    config = EvalConfig(
        data=tuple(args.data or EvalConfig.data), seq_len=args.seq_len, max_windows=args.max_windows,
        tasks=_task_names(args.tasks), task_limit=args.task_limit, speed=args.speed, batch_size=args.batch_size,
    )
    out = check_output_file(args.out, inputs=_input_paths(args.model))
    device, dtype = _device_and_dtype(args)
    model, tokenizer = load(args.model, dtype=dtype, device=device)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer; eval needs one")
    check_context(model, config.seq_len)
    checkpoint = Path(args.model) if Path(args.model).is_dir() else None
    result = evaluate_model(model, tokenizer, config, name=args.name or args.model, checkpoint_dir=checkpoint)
    write_text_atomic(out, json.dumps(result.to_dict(), indent=1, default=str) + "\n")
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
    from moeslim.io import checkpoint_dtype, load, save
    from moeslim.outputs import check_output_dir
    from moeslim.plans import Plan

    inputs = _input_paths(args.model, *args.plans)
    out = check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)  # before any work
    plans = [Plan.load(p) for p in args.plans]
    device, dtype = _device_and_dtype(args)
    if args.stream:  # one decoder layer at a time, shard by shard (prune and skip plans)
        from moeslim.models import resolve_model_path
        from moeslim.workflows.streamed_apply import apply_streamed

        apply_streamed(resolve_model_path(args.model), plans, out, dtype=dtype, overwrite=args.overwrite,
                       force=args.force, inputs=inputs)
        console.print(f"wrote checkpoint {out}")
        return 0
    model, tokenizer = load(args.model, dtype=dtype, device=device)
    for plan in plans:
        apply(model, plan, calibration=_gptq_calibration(tokenizer, plan), force=args.force)
    save(model, out, tokenizer, overwrite=args.overwrite, inputs=inputs, dtype=checkpoint_dtype(args.model))
    console.print(f"wrote checkpoint {out}")
    return 0


def _input_paths(model: str, *files: str) -> list[str]:
    """Paths a command reads (the model folder when local, plan files), which no output may replace."""
    from moeslim.models import resolve_model_path

    return [resolve_model_path(model), *files]


def _gptq_calibration(tokenizer: PreTrainedTokenizerBase | None, plan: Plan) -> CalibrationSet | None:
    """A quantize plan made with GPTQ: its calibration windows, redrawn with the model's tokenizer, for the
    GPTQ pass that ``apply`` runs (once). None for plans that need no data."""
    from moeslim.appliers.quantize import needs_calibration
    from moeslim.data.calibration_set import build_calibration_set, calibration_config

    if not needs_calibration(plan):
        return None
    if tokenizer is None:
        raise ConfigError("this GPTQ quantize plan needs its calibration windows, which need the model's tokenizer")
    config = calibration_config(plan.summary.get("calibration") or {})
    console.print(f"GPTQ on the plan's calibration data ({', '.join(config.data)}, {config.samples} windows)")
    return build_calibration_set(config, tokenizer)


def cmd_report(args: argparse.Namespace) -> int:
    from moeslim.evaluate import write_report
    from moeslim.outputs import check_output_file

    for name in ("report.md", "report.json"):
        check_output_file(Path(args.out) / name, inputs=args.inputs)
    path = write_report(args.inputs, args.out, title=args.title)
    console.print(f"wrote {path} (+ report.json and plots in {path.parent})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from moeslim.workflows.recipe import load_recipe
    from moeslim.workflows.run_folder import run_recipe

    recipe = load_recipe(args.recipe)
    run_recipe(recipe, out_root=args.out)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.io import load
    from moeslim.models.loading import check_context
    from moeslim.outputs import check_output_file
    from moeslim.workflows.stages import parse_stage

    params = {k: v for k, v in _PLAN_FIELDS[args.kind](args).items() if v is not None}
    stage = parse_stage({args.kind: params}, f"plan {args.kind}")  # validates before loading the model
    calib = _calibration_config(args, DEFAULT_CALIBRATION_DATA)
    check_output_file(args.out, inputs=_input_paths(args.model))
    device, dtype = _device_and_dtype(args)
    world, device = _join_torchrun(device)
    model, tokenizer = _load_streamed(args.model, dtype) if args.stream else load(args.model, dtype=dtype)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer; calibration needs one")
    check_context(model, calib.seq_len)
    from moeslim.workflows.stages import plan_stage

    checkpoint = _resume_checkpoint(args, stage, calib, dtype, device, world) if args.resume else None
    plan = plan_stage(model, stage, build_calibration_set(calib, tokenizer), args.model, device=device,
                      checkpoint=checkpoint)
    if not world.is_main:  # every process computed the same plan; rank 0 writes it
        if checkpoint is not None:
            checkpoint.finish()
        return 0
    if plan.kind == "quantize" and plan.summary.get("quantizer") == "gptq":
        console.print("note: GPTQ runs in `moeslim apply`, once, on the calibration windows recorded in the plan")
    path = plan.save(args.out)
    if checkpoint is not None:
        checkpoint.finish()
    console.print_json(data={"layers": {str(k): v for k, v in plan.layers.items()}})
    console.print(f"wrote {path}")
    return 0


def _prune_fields(args: argparse.Namespace) -> dict[str, object]:
    return {"method": args.method, "keep": args.keep, "mode": args.mode, "budget": args.budget,
            "beam": args.beam, "seed": args.seed, "max_tokens": args.max_tokens}


def _skip_fields(args: argparse.Namespace) -> dict[str, object]:
    return {"rule": args.rule, "quantile": args.quantile}


def _quantize_fields(args: argparse.Namespace) -> dict[str, object]:
    candidates = tuple(int(b) for b in args.candidates.split(",")) if args.candidates else None
    return {"method": args.method, "bits": args.bits, "candidates": candidates, "alpha": args.alpha,
            "beta": args.beta, "gamma": args.gamma, "group_size": args.group_size, "scope": args.scope,
            "seed": args.seed, "quantizer": args.quantizer}


_PLAN_FIELDS = {"prune": _prune_fields, "skip": _skip_fields, "quantize": _quantize_fields}


def cmd_demo(args: argparse.Namespace) -> int:
    from moeslim.workflows.demo import DemoConfig, run_demo

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
    _add_device_args(p)
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
    _add_device_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("apply", help="apply one or more plans and save a checkpoint")
    p.add_argument("model", help="checkpoint folder, hub id (online), or 'demo'")
    p.add_argument("plans", nargs="+", help="plan JSON files, applied in order")
    p.add_argument("--out", required=True, help="checkpoint folder to write (atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an existing checkpoint folder (swapped atomically)")
    p.add_argument("--force", action="store_true",
                   help="apply plans computed on a model with a different config (refused by default)")
    p.add_argument("--stream", action="store_true",
                   help="prune/skip plans: read, apply and write one decoder layer at a time (memory: one layer)")
    _add_device_args(p)
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
    p.add_argument("--max-tokens", type=int, default=None,
                   help="search/reap: cap on the tokens whose expert outputs are kept per layer (default 16384; "
                        "memory: max-tokens x experts x hidden x 4 bytes; enumerate needs no cap)")
    _add_calibration_args(p, DEFAULT_CALIBRATION_DATA)
    p.add_argument("--out", required=True, help="plan JSON path")
    _add_device_args(p, stream=True)
    p.set_defaults(func=cmd_plan)

    p = plan.add_parser("skip", help="per-layer dynamic skipping thresholds")
    p.add_argument("model")
    p.add_argument("--rule", default=None, help="top2 (the paper's rule) | topk (appendix rule for k > 2)")
    p.add_argument("--quantile", type=float, default=None,
                   help="share of tokens that skip (default 0.5: the median ratio)")
    _add_calibration_args(p, DEFAULT_CALIBRATION_DATA)
    p.add_argument("--out", required=True, help="plan JSON path")
    _add_device_args(p, stream=True)
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
    p.add_argument("--quantizer", default=None,
                   help="gptq (default; runs in apply on the plan's windows) | rtn (round-to-nearest, no data)")
    _add_calibration_args(p, DEFAULT_CALIBRATION_DATA)
    p.add_argument("--out", required=True, help="plan JSON path")
    _add_device_args(p, stream=True)
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
    except (ValueError, OSError) as err:  # our errors are ValueErrors; OSError: missing or unreadable files
        # One unwrapped line on stderr, so scripts can grep it and the message is never cut.
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; outputs that were not finished were not written", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    text = str(err.strerror if isinstance(err, OSError) and err.strerror and not err.filename else err)
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
