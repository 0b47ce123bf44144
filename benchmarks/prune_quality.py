"""Held-out perplexity of pruned / skipping models per domain, for every pruning method; writes a markdown table.

Rows: the original; for each keep: enumerate (layerwise, progressive), search, frequency, soft-count, reap,
random (mean and spread over seeds); enumerate calibrated on one domain only; skip alone and prune + skip with
the share of expert calls skipped on the evaluation text. Columns: perplexity per evaluation domain and the summed
reconstruction loss on the calibration data. Usage:

    python benchmarks/prune_quality.py --out docs/results-pruning.md
    python benchmarks/prune_quality.py --tiny        # a tiny random Mixtral, random tokens (develop the script)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from moeslim.appliers.prune import apply_prune
from moeslim.appliers.skip import apply_skip
from moeslim.methods.prune import PruneConfig, plan_prune
from moeslim.methods.skip import plan_skip
from moeslim.plans import Plan
from moeslim.runtime.skipping import counters, reset_counters

MODES_SECTION = "<!-- prune_modes.py: start -->"


def _perplexity_fn() -> Callable[[nn.Module, torch.Tensor, int], float]:
    from moeslim.evaluate.perplexity import perplexity

    return lambda model, windows, batch: float(perplexity(model, windows, batch_size=batch, progress=False)["ppl"])


class Bench:
    """Holds the model, the calibration sets and the evaluation windows; every row starts from a fresh copy."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ppl = _perplexity_fn()
        if args.tiny:
            self._tiny()
        else:
            self._demo()

    def _tiny(self) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import VOCAB, tiny_model

        def ids(seed: int, n: int) -> torch.Tensor:
            return torch.randint(3, VOCAB, (n, self.args.seq_len), generator=torch.Generator().manual_seed(seed))

        self.model, self.name = tiny_model("mixtral"), "tiny-mixtral"
        self.calibration = {"both": ids(0, self.args.samples), "code": ids(1, self.args.samples),
                            "prose": ids(2, self.args.samples)}
        self.eval = {"code": ids(3, self.args.eval_windows), "prose": ids(4, self.args.eval_windows)}

    def _demo(self) -> None:
        from moeslim.config import CalibrationConfig
        from moeslim.data import load_source, token_windows
        from moeslim.data.calibration_set import build_calibration_set
        from moeslim.models import load_model

        self.model, tokenizer = load_model(self.args.model)
        self.name = self.args.model
        a = self.args

        def calib(data: tuple[str, ...]):
            return build_calibration_set(CalibrationConfig(data=data, samples=a.samples, seq_len=a.seq_len), tokenizer)

        self.calibration = {"both": calib(("demo:code", "demo:prose")), "code": calib(("demo:code",)),
                            "prose": calib(("demo:prose",))}
        self.eval = {d: token_windows(load_source(f"demo:{d}:test"), tokenizer, a.seq_len, a.eval_windows)
                     for d in ("code", "prose")}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {d: self.ppl(model, w, self.args.batch_size) for d, w in self.eval.items()}

    def prune(self, config: PruneConfig, data: str = "both") -> tuple[Plan, nn.Module]:
        plan = plan_prune(self.model, self.calibration[data], config, model_name=self.name)
        model = copy.deepcopy(self.model)
        apply_prune(model, plan)
        return plan, model

    def skip(self, model: nn.Module, data: str = "both") -> tuple[dict[str, float], float]:
        """Install median-beta skipping (calibrated on ``model`` itself); perplexity and skipped-call share."""
        apply_skip(model, plan_skip(model, self.calibration[data], model_name=self.name))
        reset_counters(model)
        ppl = self.evaluate(model)
        calls = sum(c["expert_calls"] for c in counters(model).values())
        tokens = sum(c["tokens"] for c in counters(model).values())
        top_k = 2  # skipping plans only run on top-2 routers (SkipConfig.check_model)
        return ppl, 1 - calls / (tokens * top_k)


def _loss(plan: Plan) -> float:
    return sum(float(e.get("loss", float("nan"))) for e in plan.summary["layers"].values())


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def run(args: argparse.Namespace) -> list[list[str]]:
    bench = Bench(args)
    domains = list(bench.eval)
    rows: list[list[str]] = []

    def row(label: str, keep: str, ppls: list[dict[str, float]], loss: list[float] | None = None, extra: str = ""):
        cells = [label, keep, *[_fmt([p[d] for p in ppls]) for d in domains]]
        cells.append(_fmt(loss) if loss else "")
        cells.append(extra)
        rows.append(cells)
        print(" | ".join(cells), flush=True)

    from moeslim.models import find_moe_layers

    experts = str(find_moe_layers(bench.model)[0].num_experts)
    row("original", experts, [bench.evaluate(bench.model)])
    for keep in args.keep:
        for method, mode in [("enumerate", "layerwise"), ("enumerate", "progressive"), ("search", "layerwise"),
                             ("frequency", "layerwise"), ("soft-count", "layerwise"), ("reap", "layerwise")]:
            start = time.perf_counter()
            plan, model = bench.prune(PruneConfig(method=method, keep=keep, mode=mode, score=True))
            label = method if method != "enumerate" else f"enumerate ({mode})"
            row(label, str(keep), [bench.evaluate(model)], [_loss(plan)],
                f"plan {time.perf_counter() - start:.1f} s")
        runs = [bench.prune(PruneConfig(method="random", keep=keep, seed=s, score=True)) for s in range(args.seeds)]
        row(f"random ({args.seeds} seeds)", str(keep), [bench.evaluate(m) for _, m in runs],
            [_loss(p) for p, _ in runs])
        for data in ("code", "prose"):
            plan, model = bench.prune(PruneConfig(method="enumerate", keep=keep), data=data)
            row(f"enumerate, {data}-only calibration", str(keep), [bench.evaluate(model)], [_loss(plan)])
    ppl, share = bench.skip(copy.deepcopy(bench.model))
    row("skip (median beta)", experts, [ppl], extra=f"skipped calls {share:.1%}")
    for keep in args.keep:
        _, model = bench.prune(PruneConfig(method="enumerate", keep=keep))
        ppl, share = bench.skip(model)
        row("enumerate + skip", str(keep), [ppl], extra=f"skipped calls {share:.1%}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--keep", type=int, nargs="+", default=[6, 4])
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows per domain")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=5, help="random-subset seeds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", default="docs/results-pruning.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = run(args)
    header = ["method", "keep", "ppl code (test)", "ppl prose (test)", "calib. recon. loss (sum over layers)",
              "notes"]
    lines = [
        "# Expert pruning and dynamic skipping on the "
        + ("tiny random Mixtral (random tokens)" if args.tiny else f"`{args.model}` model"),
        "",
        f"Calibration: {args.samples} windows x {args.seq_len} tokens (code + prose unless noted); evaluation: "
        f"{args.eval_windows} held-out windows per domain. Produced by `benchmarks/prune_quality.py` in "
        f"{time.perf_counter() - start:.0f} s.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Keep the section benchmarks/prune_modes.py writes into the same page.
    old = out.read_text(encoding="utf-8") if out.is_file() else ""
    kept = old[old.index(MODES_SECTION):] if MODES_SECTION in old else ""
    out.write_text("\n".join(lines) + ("\n" + kept if kept else ""), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
