"""Pruning vs merging vs low-rank experts at equal expert parameter count, each with and without router
re-calibration; held-out perplexity per domain and the bundled offline tasks; writes a markdown table.

At ``keep`` K of E experts, pruning (enumerate, REAP) and merging (HC-SMoE, MC-SMoE) keep exactly K/E of the expert
weights; low-rank experts get ratio = K/E of them (factors + matrices left dense, what is stored). Usage:

    python benchmarks/merge_lowrank.py --out docs/results-merge.md                  # the demo model
    python benchmarks/merge_lowrank.py --model src/moeslim/assets/demo-fine --out docs/results-merge-fine.md
    python benchmarks/merge_lowrank.py --tiny --no-tasks     # a tiny random Mixtral (develop the script)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.appliers import apply
from moeslim.evaluate.perplexity import perplexity
from moeslim.methods.lowrank import LowRankConfig, plan_lowrank
from moeslim.methods.merge import MergeConfig, plan_merge
from moeslim.methods.prune import PruneConfig
from moeslim.methods.prune.refit import plan_prune_with_router_fit
from moeslim.models import find_moe_layers
from moeslim.plans import Plan
from moeslim.runtime.lowrank import lowrank_storage


def _perplexity(model: nn.Module, windows: torch.Tensor, batch: int) -> float:
    return float(perplexity(model, windows, batch_size=batch, progress=False)["ppl"])


def expert_params(model: nn.Module) -> int:
    """Stored expert weight parameters (fused tensors, or the low-rank factors / dense matrices that replace them)."""
    total = 0
    for layer in find_moe_layers(model):
        store = lowrank_storage(layer.experts)
        for name in ("gate_up_proj", "up_proj", "down_proj"):
            if name in store:
                total += store[name].params()
            elif isinstance(p := layer.experts._parameters.get(name), torch.Tensor):
                total += p.numel()
    return total


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tokenizer: Any = None
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny_models import VOCAB, tiny_model

            def ids(seed: int, n: int) -> torch.Tensor:
                return torch.randint(3, VOCAB, (n, args.seq_len), generator=torch.Generator().manual_seed(seed))

            self.model, self.name = tiny_model("mixtral"), "tiny-mixtral"
            self.calibration: Any = ids(0, args.samples)
            self.eval = {"code": ids(3, args.eval_windows), "prose": ids(4, args.eval_windows)}
            return
        from moeslim.config import CalibrationConfig
        from moeslim.data import load_source, token_windows
        from moeslim.data.calibration_set import build_calibration_set
        from moeslim.models import load_model

        self.model, self.tokenizer = load_model(args.model)
        self.name = args.model
        self.calibration = build_calibration_set(
            CalibrationConfig(data=("demo:code", "demo:prose"), samples=args.samples, seq_len=args.seq_len),
            self.tokenizer)
        self.eval = {d: token_windows(load_source(f"demo:{d}:test"), self.tokenizer, args.seq_len, args.eval_windows)
                     for d in ("code", "prose")}

    def evaluate(self, model: nn.Module) -> dict[str, float | None]:
        out: dict[str, float | None] = {d: _perplexity(model, w, self.args.batch_size) for d, w in self.eval.items()}
        if self.args.tasks and self.tokenizer is not None:
            from moeslim.evaluate.tasks import OFFLINE_TASKS, run_tasks

            scores = run_tasks(model, self.tokenizer, OFFLINE_TASKS, n_items=self.args.task_items,
                               batch_size=self.args.batch_size)
            for task, r in scores.items():
                out[task] = r.get("acc")
        return out

    def run(self, planner: Callable[..., Plan], config: Any) -> tuple[Plan, nn.Module, float]:
        start = time.perf_counter()
        plan = planner(self.model, self.calibration, config, self.name)
        model = copy.deepcopy(self.model)
        apply(model, plan, calibration=self.calibration)
        return plan, model, time.perf_counter() - start


def _loss(plan: Plan) -> float:
    """Summed reconstruction loss over layers (after the router fit where there is one)."""
    fits = plan.summary.get("router_fit")
    if fits:  # prune plans with recalibrate_router
        return sum(float(f["loss_after"]) for f in fits.values())
    return sum(float(e.get("loss", float("nan"))) for e in plan.summary["layers"].values())


def _loss_before(plan: Plan) -> float | None:
    fits = plan.summary.get("router_fit")
    if fits:
        return sum(float(f["loss_before"]) for f in fits.values())
    layer_fits = [e.get("router_fit") for e in plan.summary["layers"].values()]
    if all(layer_fits):
        return sum(float(f["loss_before"]) for f in layer_fits)  # type: ignore[index]
    return None


def variants(keep: int, experts: int, loss_method: str) -> list[tuple[str, Callable[..., Plan], Callable[[bool], Any]]]:
    ratio = keep / experts
    loss_pruning = [] if loss_method == "none" else [
        (f"prune {loss_method}", plan_prune_with_router_fit,
         lambda rc: PruneConfig(keep=keep, method=loss_method, recalibrate_router=rc)),  # type: ignore[arg-type]
    ]
    return [
        *loss_pruning,
        ("prune reap", plan_prune_with_router_fit,
         lambda rc: PruneConfig(keep=keep, method="reap", score=True, recalibrate_router=rc)),
        ("merge hc-smoe", plan_merge, lambda rc: MergeConfig(keep=keep, method="hc-smoe", recalibrate_router=rc)),
        ("merge mc-smoe", plan_merge, lambda rc: MergeConfig(keep=keep, method="mc-smoe", recalibrate_router=rc)),
        (f"low-rank ratio {ratio:.2f}", plan_lowrank, lambda rc: LowRankConfig(ratio=ratio, recalibrate_router=rc)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--keep", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows per domain")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-tasks", dest="tasks", action="store_false", help="perplexity only")
    parser.add_argument("--task-items", type=int, default=200)
    parser.add_argument("--prune-method", choices=("enumerate", "search", "none"), default="enumerate",
                        help="loss-minimising pruning method (search for many experts: C(64, 32) sets cannot be "
                             "enumerated; none: REAP is the only pruning row)")
    parser.add_argument("--no-refit", dest="refit", action="store_false", help="skip the router-refit rows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", default="docs/results-merge.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bench = Bench(args)
    experts = find_moe_layers(bench.model)[0].num_experts
    base_params = expert_params(bench.model)
    rows: list[list[str]] = []
    columns: list[str] = []

    def row(label: str, keep: str, scores: dict[str, float | None], params: int, loss: str, notes: str) -> None:
        if not columns:
            columns.extend(scores)
        cells = [label, keep, f"{params / base_params:.3f}",
                 *["n/a" if scores.get(c) is None else f"{scores[c]:.3f}" for c in columns], loss, notes]
        rows.append(cells)
        print(" | ".join(cells), flush=True)
        write()  # after every row: a long run leaves its finished rows on disk

    def write() -> None:
        scored = [f"ppl {c} (test)" if c in bench.eval else f"{c} acc" for c in columns]
        header = ["method", "keep", "expert params", *scored, "calib. recon. loss (sum over layers)", "notes"]
        lines = [
            "# Pruning vs merging vs low-rank experts on the "
            + ("tiny random Mixtral (random tokens)" if args.tiny else f"`{args.model}` model"),
            "",
            f"Calibration: {args.samples} windows x {args.seq_len} tokens (code + prose); evaluation: "
            f"{args.eval_windows} held-out windows per domain"
            + (f", offline tasks with {args.task_items} items each" if args.tasks and not args.tiny else "")
            + f". Produced by `benchmarks/merge_lowrank.py` in {time.perf_counter() - start:.0f} s "
            f"(`python benchmarks/merge_lowrank.py {' '.join(sys.argv[1:])}`).",
            "Expert params: stored expert weights relative to the original (router rows excluded). Router refit: "
            "Adam on the router rows only, 200 full-batch steps on 8192 calibration tokens per layer, best iterate "
            "kept (the loss in brackets is before the refit).",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows],
            "",
        ]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines), encoding="utf-8")

    row("original", str(experts), bench.evaluate(bench.model), base_params, "", "")
    for keep in args.keep:
        for label, planner, make in variants(keep, experts, args.prune_method):
            for refit in (False, True) if args.refit else (False,):
                plan, model, seconds = bench.run(planner, make(refit))
                before = _loss_before(plan)
                loss = f"{_loss(plan):.2f}" + (f" (from {before:.2f})" if refit and before is not None else "")
                row(label + (" + router refit" if refit else ""), str(keep), bench.evaluate(model),
                    expert_params(model), loss, f"plan+apply {seconds:.1f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
