"""The ``moeslim`` command: parse arguments into validated configs, call the library, print results.

No logic lives here: every subcommand builds configs (which fail fast on bad values) and calls
library functions with plain values.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

from rich.console import Console
from rich.table import Table

from moeslim.config import (
    DEFAULT_CALIBRATION_DATA,
    DEFAULT_SPACING,
    SPACING_WHY,
    SPACINGS,
    CalibrationConfig,
    ConfigError,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from moeslim.calibrate.distributed import World
    from moeslim.data.calibration_set import CalibrationSet
    from moeslim.export.compressed_tensors import CtExport
    from moeslim.plans import Plan
    from moeslim.workflows.stages import StageSpec

console = Console(soft_wrap=True)  # long paths stay on one line: a person copies them, scripts grep them


def _add_calibration_args(parser: argparse.ArgumentParser, data_default: Sequence[str] | None) -> None:
    # Defaults None = CalibrationConfig's defaults, so a plan config field fed by the same flag (seed,
    # batch_size: _SHARED_FIELDS) keeps its own default unless the flag is given.
    parser.add_argument("--data", action="append", default=None,
                        help="text source: demo:DOMAIN[:SPLIT], a .txt/.jsonl/.parquet file, or "
                             f"hf:NAME[:CONFIG][:SPLIT]; repeatable (default: {', '.join(data_default or [])})")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (default 64)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 256)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the window draw, and of the plan's own sampling when it has one (default 0)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per forward pass, calibration and the plan's own passes (default 8)")
    parser.add_argument("--spacing", choices=SPACINGS, default=None,
                        help=f"which windows: random (seeded draw) | even (one per equal stretch of each source, "
                             f"offset by the seed) (default {DEFAULT_SPACING}: {SPACING_WHY.replace('%', '%%')})")


def _add_device_args(parser: argparse.ArgumentParser, stream: bool = False) -> None:
    parser.add_argument("--device", default="auto",
                        help="where layers compute: auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto",
                        help="float type of the weights: auto (bfloat16 on cuda, float32 on cpu) | float32 | "
                             "bfloat16 | float16")
    parser.add_argument("--device-map", default=None,
                        help="place the model across devices with accelerate (when one device cannot hold it): "
                             "auto | balanced | balanced_low_0 | sequential | a JSON map such as '{\"\": \"cpu\"}'; "
                             "layers then run where they were placed")
    if stream:
        parser.add_argument("--resume", action="store_true",
                            help="write each finished layer to .OUT.layers/ and, rerun with the same arguments "
                                 "after a kill, continue at the next layer (prune, skip and quantize plans)")
        parser.add_argument("--stream", action="store_true",
                            help="build the model on the meta device and read each decoder layer from the "
                                 "safetensors shards when calibration reaches it (memory: one layer, not the model)")


def _device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    from moeslim.devices import resolve_device, resolve_device_map, resolve_dtype

    device = resolve_device(args.device)
    if resolve_device_map(args.device_map) is not None and getattr(args, "stream", False):
        raise ConfigError("--device-map and --stream exclude each other: --stream reads one layer at a time onto "
                          "--device; --device-map places the whole model across devices")
    return device, resolve_dtype(args.dtype, device)


def _load_placed(args: argparse.Namespace, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """``moeslim.load`` on ``device``, or, with ``--device-map``, the model placed by accelerate."""
    from moeslim.devices import check_device_map_checkpoint, resolve_device_map
    from moeslim.io import load
    from moeslim.models import load_model

    device_map = resolve_device_map(args.device_map)
    if device_map is None:
        return load(args.model, dtype=dtype, device=device)
    check_device_map_checkpoint(_input_paths(args.model)[0])
    return load_model(args.model, dtype=dtype, device_map=device_map)


def _join_torchrun(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group when started by it (WORLD_SIZE > 1); a plain run is rank 0 of 1.
    On CUDA each process computes on its own GPU (cuda:LOCAL_RANK)."""
    from moeslim.calibrate.distributed import init_from_env, process_device

    world = init_from_env(device)
    return world, process_device(device, world)


def _resume_checkpoint(args: argparse.Namespace, stage: StageSpec, calib: CalibrationConfig, dtype: torch.dtype,
                       device: torch.device, world: World) -> Any:
    """Per-layer state beside --out (``.NAME.layers/``), keyed by everything the plan depends on."""
    from moeslim.calibrate.resume import LayerCheckpoint, run_key
    from moeslim.models import resolve_model_path

    if args.kind not in ("prune", "skip", "quantize"):
        raise ConfigError(f"--resume works for plan prune, skip and quantize, not plan {args.kind}")
    key = run_key(model=resolve_model_path(args.model), stage=dataclasses.asdict(stage.config),
                  calibration=dataclasses.asdict(calib), dtype=str(dtype), device=device.type, world=world.size,
                  stream=args.stream)
    out = Path(args.out)
    return LayerCheckpoint(out.parent / f".{out.name}.layers", key, rank=world.rank)


def _load_streamed(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from moeslim.models.lazy import load_streamed

    return load_streamed(name, dtype)


def _calibration_config(args: argparse.Namespace, default: Sequence[str]) -> CalibrationConfig:
    given = {name: getattr(args, name) for name in ("samples", "seq_len", "seed", "batch_size", "spacing")
             if getattr(args, name) is not None}
    return CalibrationConfig(data=tuple(args.data or default), **given)


def cmd_inspect(args: argparse.Namespace) -> int:
    from moeslim.outputs import check_output_file

    calib = _calibration_config(args, ()) if args.data else None
    out = Path(args.out) if args.out is not None else None  # without --out inspect only prints
    outputs = [out / "inspect.json", out / "expert_load.png"] if out is not None else []
    with _claim(*outputs):
        for path in outputs:
            check_output_file(path, overwrite=args.overwrite, inputs=_input_paths(args.model))
        return _inspect(args, calib, out)


def _inspect(args: argparse.Namespace, calib: CalibrationConfig | None, out: Path | None) -> int:
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.outputs import write_text_atomic
    from moeslim.workflows.expert_load import inspect_model, plot_expert_load

    device, dtype = _device_and_dtype(args)
    model, tokenizer = _load_placed(args, dtype, str(device))
    input_ids: torch.Tensor | None = None
    name: str | None = None
    if calib is not None:
        if tokenizer is None:
            raise ConfigError(f"{args.model} has no tokenizer; --data needs one")
        calib_set = build_calibration_set(calib, tokenizer)
        input_ids, name = calib_set.input_ids, calib_set.name
    report = inspect_model(model, input_ids, data=name, batch_size=calib.batch_size if calib else 8)
    _print_summary(args.model, report.summary)
    if report.loads:
        _print_loads(report.loads)
    if out is None:
        return 0
    payload = {"model": args.model, "summary": report.summary, "data": report.data,
               "loads": [vars(entry) for entry in report.loads]}
    write_text_atomic(out / "inspect.json", json.dumps(payload, indent=1) + "\n")
    if report.loads:
        plot = plot_expert_load(report.loads, out / "expert_load.png", f"{args.model}: expert load on {name}")
        console.print(f"wrote {plot}")
    console.print(f"wrote {out / 'inspect.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from moeslim.config import EvalConfig, from_mapping
    from moeslim.outputs import check_output_file

    given = _config_values(args, EvalConfig, shared=())
    if args.data:
        given["data"] = tuple(args.data)
    config = from_mapping(EvalConfig, {**given, "tasks": _task_names(args.tasks)}, "eval")
    if args.reference and not config.kl:
        raise ConfigError("--reference asks for the KL divergence, which --no-kl turns off")
    inputs = _input_paths(args.model, *([args.reference] if args.reference else []))
    outputs = [args.out, *([args.save_reference] if args.save_reference else [])]
    with _claim(*outputs):
        for path in outputs:
            check_output_file(path, overwrite=args.overwrite, inputs=inputs)
        return _eval(args, config, Path(args.out))


def _kl_reference(args: argparse.Namespace, config: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """The KL reference: a file written by ``eval --save-reference``, or computed here from a model (loaded,
    scored on the same windows, and freed before the evaluated model is loaded)."""
    from moeslim.evaluate.divergence import Reference
    from moeslim.evaluate.driver import build_reference
    from moeslim.io import load

    if Path(args.reference).is_file():
        return Reference.load(args.reference)
    model, tokenizer = load(args.reference, dtype=dtype, device=device)
    if tokenizer is None:
        raise ConfigError(f"--reference {args.reference} has no tokenizer; the reference needs one to draw windows")
    reference = build_reference(model, tokenizer, config, args.reference)
    del model
    return reference


def _eval(args: argparse.Namespace, config: Any, out: Path) -> int:
    from moeslim.evaluate import evaluate_model
    from moeslim.evaluate.driver import build_reference
    from moeslim.evaluate.table import print_table
    from moeslim.models.loading import check_context
    from moeslim.outputs import write_text_atomic

    device, dtype = _device_and_dtype(args)
    reference = _kl_reference(args, config, dtype, device) if args.reference else None
    model, tokenizer = _load_placed(args, dtype, device)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer; eval needs one")
    check_context(model, config.seq_len)
    checkpoint = Path(args.model) if Path(args.model).is_dir() else None
    result = evaluate_model(model, tokenizer, config, name=args.name or args.model, checkpoint_dir=checkpoint,
                            reference=reference)
    if args.save_reference:
        saved = build_reference(model, tokenizer, config, args.model).save(args.save_reference)
        kept = f"top {config.kl_top_k} tokens" if config.kl_top_k else "every token"
        console.print(f"wrote {saved} (KL reference: {kept} per position)")
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
    from moeslim.outputs import check_output_dir

    inputs = _input_paths(args.model, *args.plans)
    device, dtype = _device_and_dtype(args)
    world, device = _join_torchrun(device) if args.stream else (None, device)
    with _claim(args.out, main=world is None or world.is_main):
        out = check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)  # before any work
        return _apply(args, inputs, out, device, dtype)


def _apply(args: argparse.Namespace, inputs: list[str], out: Path, device: torch.device, dtype: torch.dtype) -> int:
    from moeslim.appliers import apply
    from moeslim.io import checkpoint_dtype, save
    from moeslim.plans import Plan, PlanError
    from moeslim.workflows.apply_summary import describe_change, model_shape

    plans = [Plan.load(p) for p in args.plans]
    if args.resume and not args.stream:
        raise ConfigError("apply --resume needs --stream (a resumable apply writes the checkpoint layer by layer)")
    if args.stream:  # one decoder layer at a time, shard by shard; torchrun splits a GPTQ pass, rank 0 writes
        return _apply_streamed(args, plans, out, inputs, device, dtype)
    model, tokenizer = _load_placed(args, dtype, device)
    before = model_shape(model)
    for path, plan in zip(args.plans, plans, strict=True):
        try:
            apply(model, plan, calibration=_gptq_calibration(tokenizer, plan), force=args.force, progress=True)
        except PlanError as err:  # name the file: the plan was read from one, the model may not fit it
            raise PlanError(f"plan file {path}: {err}") from err
    save(model, out, tokenizer, overwrite=args.overwrite, inputs=inputs, dtype=checkpoint_dtype(args.model))
    for line in describe_change(before, model_shape(model), plans):
        console.print(line, highlight=False)
    console.print(f"wrote checkpoint {out}")
    return 0


def _apply_streamed(args: argparse.Namespace, plans: list[Plan], out: Path, inputs: list[str],
                    device: torch.device, dtype: torch.dtype) -> int:
    from moeslim.calibrate.resume import run_key
    from moeslim.models import resolve_model_path
    from moeslim.workflows.apply_summary import describe_disk_change
    from moeslim.workflows.streamed_apply import stream_apply

    world, device = _join_torchrun(device)  # joined already in cmd_apply; returns the same world
    source = resolve_model_path(args.model)
    key = run_key(model=source, plans=[p.to_dict() for p in plans], dtype=str(dtype), device=device.type,
                  world=world.size, force=args.force) if args.resume else None
    written = stream_apply(source, plans, out, dtype=dtype, device=device, overwrite=args.overwrite,
                           force=args.force, inputs=inputs, resume=key, progress=True)
    if written is not None:
        for line in describe_disk_change(source, out, plans):
            console.print(line, highlight=False)
        console.print(f"wrote checkpoint {out}")
    return 0


def _input_paths(model: str, *files: str) -> list[str]:
    """Paths a command reads (the model folder when local, plan files), which no output may replace."""
    from moeslim.models import resolve_model_path

    return [resolve_model_path(model), *files]


def _claim(*outputs: str | Path, main: bool = True) -> contextlib.ExitStack:
    """Lock the command's outputs for its whole run (``outputs.output_lock``): a second run writing the same
    output fails at once. Under torchrun only rank 0 writes, so only rank 0 locks (``main``)."""
    from moeslim.outputs import output_lock

    stack = contextlib.ExitStack()
    if main:
        for out in outputs:
            stack.enter_context(output_lock(out))
    return stack


def _gptq_calibration(tokenizer: PreTrainedTokenizerBase | None, plan: Plan) -> CalibrationSet | None:
    """A quantize plan made with GPTQ: its calibration windows, redrawn with the model's tokenizer, for the
    GPTQ pass that ``apply`` runs (once). None for plans that need no data."""
    from moeslim.appliers import needs_calibration  # GPTQ, low-rank factors, merged / refitted router rows
    from moeslim.data.calibration_set import build_calibration_set, calibration_config

    if not needs_calibration(plan):
        return None
    if tokenizer is None:
        raise ConfigError(f"this {plan.kind} plan needs its calibration windows, which need the model's tokenizer")
    config = calibration_config(plan.summary.get("calibration") or {})
    console.print(f"{plan.kind}: calibration pass on the plan's data ({', '.join(config.data)}, "
                  f"{config.samples} windows)")
    return build_calibration_set(config, tokenizer)


def cmd_report(args: argparse.Namespace) -> int:
    from moeslim.evaluate import write_report
    from moeslim.outputs import check_output_file

    outputs = [Path(args.out) / name for name in ("report.md", "report.json")]
    with _claim(*outputs):
        for path in outputs:
            check_output_file(path, overwrite=args.overwrite, inputs=args.inputs)
        written = write_report(args.inputs, args.out, title=args.title)
    console.print(f"wrote {written} (+ report.json and plots in {written.parent})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from moeslim.workflows.recipe import load_recipe
    from moeslim.workflows.run_folder import run_recipe

    recipe = load_recipe(args.recipe)
    run_recipe(recipe, out_root=args.out, overwrite=args.overwrite)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from moeslim.outputs import check_output_file
    from moeslim.workflows.stages import parse_stage

    # Validated before the model is loaded.
    stage = parse_stage({args.kind: _config_values(args, args.config_cls)}, f"plan {args.kind}")
    calib = _calibration_config(args, DEFAULT_CALIBRATION_DATA)
    device, dtype = _device_and_dtype(args)
    world, device = _join_torchrun(device)
    with _claim(args.out, main=world.is_main):
        check_output_file(args.out, overwrite=args.overwrite, inputs=_input_paths(args.model))
        return _plan(args, stage, calib, world, device, dtype)


def _plan(args: argparse.Namespace, stage: StageSpec, calib: CalibrationConfig, world: World, device: torch.device,
          dtype: torch.dtype) -> int:
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.models.loading import check_context
    from moeslim.progress import note
    from moeslim.workflows.plan_summary import summarize

    model, tokenizer = _load_streamed(args.model, dtype) if args.stream else _load_placed(args, dtype)
    if tokenizer is None:
        raise ConfigError(f"{args.model} has no tokenizer; calibration needs one")
    check_context(model, calib.seq_len)
    from moeslim.workflows.stages import plan_stage

    checkpoint = _resume_checkpoint(args, stage, calib, dtype, device, world) if args.resume else None
    calib_set = build_calibration_set(calib, tokenizer)
    if world.is_main:  # on stderr, with the per-layer progress lines that follow
        note(f"plan {args.kind}: {calib_set.input_ids.shape[0]} calibration windows of "
             f"{calib_set.input_ids.shape[1]} tokens from {calib_set.name}, one decoder layer at a time")
    plan = plan_stage(model, stage, calib_set, args.model, device=device, checkpoint=checkpoint,
                      progress=True)
    if not world.is_main:  # every process computed the same plan; rank 0 writes it
        if checkpoint is not None:
            checkpoint.finish()
        return 0
    if plan.kind == "quantize" and plan.summary.get("quantizer") == "gptq":
        console.print("note: GPTQ runs in `moeslim apply`, once, on the calibration windows recorded in the plan")
    path = plan.save(args.out)
    if checkpoint is not None:
        checkpoint.finish()
    for line in summarize(plan):  # the decision in a few lines; every integer of it is in the file
        console.print(line, highlight=False)
    console.print(f"wrote {path}")
    return 0


# ``moeslim plan <kind>`` flags are derived from the config dataclass registered for the kind in
# ``workflows.stages._registry``: a new kind, or a new field of a config, gets its flags with no edit here.
# Not transformers' HfArgumentParser: it builds the dataclass itself from defaults it copies (we pass only the
# flags given and let ``from_mapping`` name the bad field), it rewrites ``field.type`` on the classes it reads,
# it has no ``tuple[int, ...]`` type (only lists, as ``nargs="+"``), and a field that shares a flag with the
# calibration options (``--seed``, ``--batch-size``) would be an argparse conflict.

_SHARED_FIELDS = ("seed", "batch_size")
"""Config fields fed by the calibration flag of the same name (one ``--seed`` for the draw and the plan)."""

_CONFIG_DEST = "config."  # namespace prefix: a field can never overwrite another option's value


def _add_config_args(parser: argparse.ArgumentParser, config_cls: type,
                     exclude: Sequence[str] = _SHARED_FIELDS) -> None:
    """One ``--field-name`` per init field of dataclass ``config_cls`` (except ``exclude``: flags built elsewhere).

    Type hints give the parsing: Literal -> choices, bool -> ``--x/--no-x``, ``tuple[T, ...]`` -> a comma
    list, ``T | None`` -> T or ``none``. Every flag defaults to None (= the config's default); a field without a default
    is a required flag, and so is one whose metadata says ``"required_flag": True`` (a value the user should
    always state, like the bit budget). Help: ``field(metadata={"help": ...})``.
    """
    hints = get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if not f.init or f.name in exclude:
            continue
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        required = not has_default or bool(f.metadata.get("required_flag", False))
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        spec = _parsing(hints[f.name])
        note = "required" if required else f"default {_shown(default)}"
        if isinstance(spec.get("type"), _OrNone):
            note += "; 'none' for None"
        text = f"{f.metadata.get('help', '')} ({note})".strip().replace("%", "%%")
        if "choices" not in spec and "action" not in spec:  # argparse shows choices; a flag has no value
            spec.setdefault("metavar", f.name.upper())
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=_CONFIG_DEST + f.name, default=None,
                            required=required, help=text, **spec)


def _parsing(hint: Any) -> dict[str, Any]:
    """argparse ``type``/``choices``/``action`` for one annotated field type."""
    optional = _without_none(hint) is not hint
    hint = _without_none(hint)
    origin = get_origin(hint)
    spec = _parsing_of(hint, origin)
    if optional and "type" in spec and "choices" not in spec:
        spec["type"] = _OrNone(spec["type"])
    return spec


def _parsing_of(hint: Any, origin: Any) -> dict[str, Any]:
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = get_args(hint)
        return {"type": type(choices[0]), "choices": choices}  # argparse shows the choices as the metavar
    if origin is tuple:
        item = get_args(hint)[0]  # other item types arrive as strings; check_types names a wrong one
        return {"type": _CommaList(item if item in (int, float, str) else str), "metavar": "A,B,..."}
    if origin in (Union, types.UnionType):  # int | float: the widest number
        return {"type": float if set(get_args(hint)) <= {int, float} else str}
    if hint in (int, float, str):
        return {"type": hint}
    return {"type": json.loads, "metavar": "JSON"}  # anything else (a mapping): spelled as in a recipe


def _without_none(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        rest = tuple(a for a in get_args(hint) if a is not type(None))
        return rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007 (a runtime tuple of types)
    return hint


class _Null:
    """``none`` given for a field that may be None (``--budget none``: no limit); unset flags are plain None."""


_NULL = _Null()


class _OrNone:
    """argparse type: ``none``/``null`` -> ``_NULL``, anything else -> ``inner(text)``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.__name__ = f"{getattr(inner, '__name__', inner)} or none"

    def __call__(self, text: str) -> Any:
        return _NULL if text.strip().lower() in ("none", "null") else self.inner(text)


class _CommaList:
    """argparse type: ``"1,2,3"`` -> ``(1, 2, 3)`` (the item type converts and rejects each element)."""

    def __init__(self, item: Any) -> None:
        self.item = item
        self.__name__ = f"comma-separated list of {getattr(item, '__name__', item)}"  # argparse's error text

    def __call__(self, text: str) -> tuple[Any, ...]:
        return tuple(self.item(part) for part in text.split(",") if part.strip())


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "empty"
    return str(value)


def _config_values(args: argparse.Namespace, config_cls: type, shared: Sequence[str] = _SHARED_FIELDS
                   ) -> dict[str, Any]:
    """The config fields given on the command line (flags left out take the config's default); ``shared``:
    fields fed by a shared flag of the same name."""
    values = {name[len(_CONFIG_DEST):]: None if value is _NULL else value for name, value in vars(args).items()
              if name.startswith(_CONFIG_DEST) and value is not None}
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values.update({name: getattr(args, name) for name in shared
                   if name in fields and getattr(args, name, None) is not None})
    return values


def _add_plan_parsers(sub: argparse._SubParsersAction, with_kinds: bool = True) -> None:
    """``moeslim plan <kind>`` for every kind in the stage registry (``with_kinds=False``: the ``plan`` entry
    only, so other commands and ``--help`` do not import every method to list flags they never show)."""
    plan = sub.add_parser("plan", help="compute a plan (JSON) from calibration data").add_subparsers(
        dest="kind", required=True)
    if not with_kinds:
        return
    from moeslim.workflows.stages import stage_configs

    for kind, config_cls in stage_configs().items():
        p = plan.add_parser(kind, help=_first_line(config_cls.__doc__))
        p.add_argument("model", help="checkpoint folder, hub id (online), or 'demo'")
        _add_config_args(p, config_cls)
        _add_calibration_args(p, DEFAULT_CALIBRATION_DATA)
        p.add_argument("--out", required=True, help="plan JSON path")
        _add_overwrite_arg(p, "an existing plan file")
        _add_device_args(p, stream=True)
        p.set_defaults(func=cmd_plan, config_cls=config_cls)


def _add_overwrite_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} at --out (never an input, nor anything inside an input model folder)")


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0].replace("``", "").replace("%", "%%")


def cmd_demo(args: argparse.Namespace) -> int:
    from moeslim.workflows.demo import DemoConfig, run_demo

    run_demo(DemoConfig(model=args.model, out=args.out, quick=args.quick, speed=not args.no_speed,
                        frontier=args.frontier, overwrite=args.overwrite))
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


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    """``moeslim export``: GGUF for llama.cpp, compressed-tensors for vLLM (moeslim.export)."""
    p = sub.add_parser("export", help="write a model for an inference engine: GGUF (llama.cpp) or "
                                      "compressed-tensors (vLLM)")
    p.add_argument("model", help="checkpoint folder (original, pruned or quantized), hub id (online), or 'demo'")
    p.add_argument("--format", required=True, choices=("gguf", "compressed-tensors"))
    p.add_argument("--out", required=True, help="gguf: the .gguf file; compressed-tensors: the folder to write")
    p.add_argument("--plan", default=None,
                   help="gguf: a quantize plan made with --scope gguf (one llama.cpp type per expert tensor); "
                        "compressed-tensors: a quantize plan with one width per layer (uniform, or --granularity "
                        "layer), applied (GPTQ) before writing")
    p.add_argument("--type", default="F16",
                   help="gguf: type of every matrix without a plan type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, "
                        "Q5_1 (gguf-py), or a llama.cpp type/preset such as Q4_K_M (needs --llama-quantize)")
    p.add_argument("--llama-quantize", default=None,
                   help="gguf: path of llama.cpp's llama-quantize program, for K-quant types and presets")
    p.add_argument("--imatrix", default=None, help="gguf: importance matrix file for --llama-quantize")
    p.add_argument("--top-k", type=int, default=None,
                   help="gguf: a reduced top-k (expert_used_count): every token runs its K best experts, the form of "
                        "skipping llama.cpp runs (per-token skip thresholds are refused)")
    p.add_argument("--ct-scheme", default="symmetric", choices=("symmetric", "asymmetric"),
                   help="compressed-tensors: symmetric (what vLLM's MoE kernels and transformers load; stores "
                        "b or b+1 bits exactly) or asymmetric (b bits + zero points)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (gguf: a file; compressed-tensors: a checkpoint folder); never an "
                        "input, nor anything inside an input model folder")
    p.add_argument("--stream", action="store_true",
                   help="read one decoder layer at a time from a local checkpoint folder (original, pruned or "
                        "moeslim-quantized) and write as it goes (memory: one layer, not the model): the same GGUF; "
                        "compressed-tensors: the same tensors, the dense ones in the checkpoint's dtype, and --plan "
                        "applied as apply --stream applies it")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from moeslim.export.compressed_tensors import check_ct_plan
    from moeslim.outputs import check_output_dir, check_output_file
    from moeslim.plans import Plan

    inputs = _input_paths(args.model, *([args.plan] if args.plan else []))
    gguf = args.format == "gguf"
    if not gguf and (args.type != "F16" or args.llama_quantize or args.imatrix or args.top_k is not None):
        raise ConfigError("--type, --llama-quantize, --imatrix and --top-k are GGUF options; compressed-tensors "
                          "writes the experts' own codes (quantize them with --plan or moeslim apply)")
    if gguf and args.ct_scheme != "symmetric":
        raise ConfigError("--ct-scheme is a compressed-tensors option")
    with _claim(args.out):
        if gguf:  # before any work
            check_output_file(args.out, overwrite=args.overwrite, inputs=inputs)
        else:
            check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)
        plan = Plan.load(args.plan) if args.plan else None
        if plan is not None and not gguf:
            check_ct_plan(plan, args.plan)
        return _export(args, plan, inputs)


def _export(args: argparse.Namespace, plan: Plan | None, inputs: list[str]) -> int:
    from moeslim.appliers import apply
    from moeslim.export import export_compressed_tensors, export_gguf
    from moeslim.io import load

    gguf = args.format == "gguf"
    if args.stream:
        from moeslim.workflows.streamed_export import export_streamed

        streamed = export_streamed(args.model, args.out, gguf=gguf, plan=plan, qtype=args.type,
                                   llama_quantize=args.llama_quantize, imatrix=args.imatrix, scheme=args.ct_scheme,
                                   inputs=inputs, overwrite=args.overwrite, progress=True, top_k=args.top_k)
        return _report_gguf(args, streamed) if gguf else _report_ct(args, streamed)
    model, tokenizer = load(args.model)
    if gguf:
        return _report_gguf(args, export_gguf(model, tokenizer, args.out, qtype=args.type, plan=plan,
                                              llama_quantize=args.llama_quantize, imatrix=args.imatrix, inputs=inputs,
                                              overwrite=args.overwrite, progress=True, top_k=args.top_k))
    if plan is not None:
        apply(model, plan, calibration=_gptq_calibration(tokenizer, plan), progress=True)
    return _report_ct(args, export_compressed_tensors(model, tokenizer, args.out, scheme=args.ct_scheme,
                                                      overwrite=args.overwrite, inputs=inputs, progress=True))


def _report_gguf(args: argparse.Namespace, result: Any) -> int:
    for line in result.fallbacks:
        console.print(f"fallback {line}")
    counts: dict[str, int] = {}
    for qtype in result.tensor_types.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    console.print(f"wrote {args.out} ({result.nbytes / 2**20:.1f} MiB, {result.expert_count} experts, top-"
                  f"{result.expert_used_count}; tensor types {dict(sorted(counts.items()))}; quantizer "
                  f"{result.quantizer})")
    return 0


def _report_ct(args: argparse.Namespace, ct: CtExport) -> int:
    console.print(f"wrote {args.out} (compressed-tensors pack-quantized; {ct.describe()})")
    return 0


def build_parser(plan_kinds: bool = True) -> argparse.ArgumentParser:
    """The whole parser; ``plan_kinds=False`` leaves out the per-kind ``plan`` subcommands (see main)."""
    from moeslim.config import EvalConfig

    parser = argparse.ArgumentParser(
        prog="moeslim",
        description="Make Mixture-of-Experts models smaller and faster without retraining: "
        "calibrate -> plan -> apply -> evaluate -> save.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="architecture summary and expert load")
    p.add_argument("model", help="local directory, hub id (online), or 'demo'")
    _add_calibration_args(p, DEFAULT_CALIBRATION_DATA)
    p.add_argument("--out", default=None,
                   help="folder for inspect.json and the expert-load heatmap (default: none, only print)")
    _add_overwrite_arg(p, "inspect.json and expert_load.png")
    _add_device_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="perplexity per domain, task accuracy, cost and speed of one model")
    p.add_argument("model", help="checkpoint folder, hub id (online), or 'demo'")
    # data and tasks stay repeatable flags (and tasks defaults to the bundled offline tasks, not EvalConfig's
    # empty tuple); every other EvalConfig field is derived like the plan flags.
    p.add_argument("--data", action="append", default=None,
                   help="text source to score (default demo:code and demo:prose, test split); repeatable")
    p.add_argument("--tasks", action="append", default=None,
                   help="lm-eval task name, repeatable (default: the bundled offline tasks "
                        "moeslim_code_nextline and moeslim_prose_continuation; 'none' for no tasks)")
    _add_config_args(p, EvalConfig, exclude=("data", "tasks"))
    p.add_argument("--name", default=None, help="label of this model in the report")
    p.add_argument("--reference", default=None,
                   help="KL divergence and top-1 agreement to this model's next-token distribution: the original "
                        "checkpoint (folder, hub id, 'demo') or a file written by --save-reference")
    p.add_argument("--save-reference", default=None,
                   help="also write this model's top-k next-token log-probabilities on the eval windows (a "
                        ".safetensors file), the --reference of later evals without loading it again")
    p.add_argument("--out", default="runs/eval/result.json", help="result JSON path")
    _add_overwrite_arg(p, "an existing result file")
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
                   help="read, apply and write one decoder layer at a time (memory: one layer); a quantize plan "
                        "on its own; under torchrun a GPTQ pass is split over the processes")
    p.add_argument("--resume", action="store_true",
                   help="with --stream, quantize plans: keep finished layers in .OUT.layers/ and, rerun with the "
                        "same arguments after a kill, continue at the next layer")
    _add_device_args(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("report", help="side-by-side report.md/json + plots from results or run folders")
    p.add_argument("inputs", nargs="+", help="run folders or result/report JSON files; the first is the reference")
    p.add_argument("--out", default="runs/report", help="output folder (default runs/report)")
    p.add_argument("--title", default="moeslim report")
    _add_overwrite_arg(p, "report.md, report.json and the plots")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="run a recipe: stages -> checkpoint -> side-by-side report")
    p.add_argument("recipe", help="recipe YAML/JSON (see examples/)")
    p.add_argument("--out", default="runs", help="parent of the run folder (default runs)")
    _add_overwrite_arg(p, "the recipe's earlier run folder (plans, checkpoint, results, report)")
    p.set_defaults(func=cmd_run)

    _add_plan_parsers(sub, with_kinds=plan_kinds)
    _add_export_parser(sub)

    p = sub.add_parser("demo", help="the main job: original vs compressed variants of the embedded model")
    p.add_argument("--model", default="demo", help="model to run the demo on (default: the embedded model)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="four variants instead of all")
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    p.add_argument("--frontier", action="store_true",
                   help="also run the frontier: the joint plan at 15-80 %% of the original's bytes vs the best single "
                        "method (about 20 CPU minutes more per model)")
    _add_overwrite_arg(p, "an earlier demo's results, report and plots")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(plan_kinds=bool(given) and given[0] == "plan")  # kinds import torch and the methods
    args = parser.parse_args(given)
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
    finally:
        if "moeslim.calibrate.distributed" in sys.modules:  # a command that may have joined torchrun's group
            from moeslim.calibrate.distributed import leave

            leave()


def _one_line(err: BaseException) -> str:
    text = str(err.strerror if isinstance(err, OSError) and err.strerror and not err.filename else err)
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
