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

from rich.console import Console
from rich.table import Table

from moeslim.config import DEFAULT_CALIBRATION_DATA, CalibrationConfig, ConfigError

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
    parser = argparse.ArgumentParser(prog="moeslim", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="architecture summary and expert load")
    p.add_argument("model", help="local directory, hub id (online), or 'demo'")
    _add_calibration_args(p, DEFAULT_CALIBRATION_DATA)
    p.add_argument("--out", default="runs/inspect", help="output folder (default runs/inspect)")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        console.print(f"[bold red]error:[/] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
