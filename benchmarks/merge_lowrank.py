"""Pruning vs merging vs low-rank experts at 25 % and 50 % of the expert parameters, on both demo models:
held-out perplexity per domain and KL divergence to the original; writes one markdown file.

Rows per budget (share s of the expert weights; K = s * E experts):

- prune enumerate (exact loss minimiser; only where C(E, K) is small) and prune reap;
- merge hc-smoe / mc-smoe with the authors' router (``router='keep'``: E router rows, every slot computes its
  group's merged expert; HC-SMoE Euclidean + average linkage + frequency weights; MC-SMoE frequency-dominant
  experts, router-logit similarity, weight-matching alignment, global group counts);
- the same two with the fitted router (``router='fit'``: K experts and K least-squares router rows, the hybrid);
- low-rank svd-llm (per-expert whitened SVD) and d2moe (Fisher-weighted shared base + per-expert deltas) at
  ratio s;
- two ablations: HC-SMoE with cosine instead of Euclidean distance, D2-MoE with greedy instead of uniform delta
  ranks.

"unique expert params" is what the method keeps; for router='keep' the saved stock checkpoint still stores E
experts (members repeat their group's merged weights), see the "stored" column. Usage:

    python benchmarks/merge_lowrank.py --threads 1 --out docs/results-merge.md        # both demo models
    python benchmarks/merge_lowrank.py --tiny --models tiny     # a tiny random Mixtral (develop the script)
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.appliers import apply
from moeslim.evaluate.divergence import ReferenceTop, reference_top
from moeslim.evaluate.perplexity import perplexity
from moeslim.methods.lowrank import LowRankConfig, plan_lowrank
from moeslim.methods.merge import MergeConfig, plan_merge
from moeslim.methods.prune import PruneConfig
from moeslim.methods.prune.refit import plan_prune_with_router_fit
from moeslim.models import find_moe_layers
from moeslim.plans import Plan
from moeslim.runtime.lowrank import lowrank_storage

ENUMERATE_LIMIT = 5_000  # kept sets per layer above which the enumerate row is left out


def expert_params(model: nn.Module) -> int:
    """Stored expert weight parameters (fused tensors, or the low-rank factors / bases / dense matrices)."""
    total = 0
    for layer in find_moe_layers(model):
        store = lowrank_storage(layer.experts)
        for name in ("gate_up_proj", "up_proj", "down_proj"):
            if name in store:
                total += store[name].params()
            elif isinstance(p := layer.experts._parameters.get(name), torch.Tensor):
                total += p.numel()
    return total


@dataclass(frozen=True)
class Variant:
    label: str
    planner: Callable[..., Plan]
    config: Any


def variants(keep: int, experts: int, share: float) -> list[Variant]:
    rows = []
    if math.comb(experts, keep) <= ENUMERATE_LIMIT:
        rows.append(Variant("prune enumerate", plan_prune_with_router_fit, PruneConfig(keep=keep, method="enumerate")))
    rows += [
        Variant("prune reap", plan_prune_with_router_fit, PruneConfig(keep=keep, method="reap", score=True)),
        Variant("merge hc-smoe, router keep (authors')", plan_merge, MergeConfig(keep=keep, method="hc-smoe")),
        Variant("merge mc-smoe, router keep (authors')", plan_merge, MergeConfig(keep=keep, method="mc-smoe")),
        Variant("merge hc-smoe, router fit (hybrid)", plan_merge,
                MergeConfig(keep=keep, method="hc-smoe", router="fit")),
        Variant("merge mc-smoe, router fit (hybrid)", plan_merge,
                MergeConfig(keep=keep, method="mc-smoe", router="fit")),
        Variant("low-rank svd-llm (per expert)", plan_lowrank, LowRankConfig(ratio=share, method="svd-llm")),
        Variant("low-rank d2moe (shared base + deltas)", plan_lowrank, LowRankConfig(ratio=share, method="d2moe")),
        # ablations: one setting changed from the row above its name
        Variant("ablation: merge hc-smoe, router keep, cosine distance", plan_merge,
                MergeConfig(keep=keep, method="hc-smoe", metric="cosine")),
        Variant("ablation: low-rank d2moe, greedy delta ranks", plan_lowrank,
                LowRankConfig(ratio=share, method="d2moe", delta_ranks="greedy")),
    ]
    return rows


class Bench:
    """One model: its calibration windows, held-out windows per domain and the original's distributions."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.args, self.name = args, name
        self.tokenizer: Any = None
        if name == "tiny":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny_models import VOCAB, tiny_model

            def ids(seed: int, n: int) -> torch.Tensor:
                return torch.randint(3, VOCAB, (n, args.seq_len), generator=torch.Generator().manual_seed(seed))

            self.model: nn.Module = tiny_model("mixtral")
            self.calibration: Any = ids(0, args.samples)
            self.eval = {"code": ids(3, args.eval_windows), "prose": ids(4, args.eval_windows)}
        else:
            from moeslim.config import CalibrationConfig
            from moeslim.data import load_source, token_windows
            from moeslim.data.calibration_set import build_calibration_set
            from moeslim.models import load_model

            self.model, self.tokenizer = load_model(name)
            tokenizer = self.tokenizer
            self.calibration = build_calibration_set(
                CalibrationConfig(data=("demo:code", "demo:prose"), samples=args.samples, seq_len=args.seq_len),
                tokenizer)
            self.eval = {d: token_windows(load_source(f"demo:{d}:test"), tokenizer, args.seq_len, args.eval_windows)
                         for d in ("code", "prose")}
        self.reference: dict[str, ReferenceTop] = {
            d: reference_top(self.model, w, k=0, batch_size=args.batch_size) for d, w in self.eval.items()}
        self.experts = find_moe_layers(self.model)[0].num_experts
        self.layers = len(find_moe_layers(self.model))
        self.base_params = expert_params(self.model)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for d, w in self.eval.items():
            r = perplexity(model, w, batch_size=self.args.batch_size, progress=False, reference=self.reference[d])
            out[f"ppl {d}"], out[f"KL {d}"] = float(r["ppl"]), float(r["kl"])
        if self.args.task_items and self.tokenizer is not None:
            from moeslim.evaluate.tasks import OFFLINE_TASKS, run_tasks

            scores = run_tasks(model, self.tokenizer, OFFLINE_TASKS, n_items=self.args.task_items,
                               batch_size=self.args.batch_size)
            for task, result in scores.items():
                out[task.removeprefix("moeslim_") + " acc"] = float(result.get("acc") or float("nan"))
        return out

    def unique_share(self, plan: Plan, model: nn.Module) -> float:
        """Share of the original expert parameters the method keeps (merged experts counted once)."""
        if plan.kind == "merge":
            groups = sum(len(entry["groups"]) for entry in plan.layers.values())
            return groups / (self.experts * self.layers)
        return expert_params(model) / self.base_params


def run_model(bench: Bench, shares: list[float], rows: list[list[str]], columns: list[str],
              write: Callable[[], None]) -> None:
    scores = bench.evaluate(bench.model)
    if not columns:
        columns.extend(scores)
    elif list(scores) != columns:
        raise ValueError(f"{bench.name} scores {list(scores)}, the table has {columns}")

    def row(label: str, share: str, unique: float, stored: float, values: dict[str, float], seconds: str) -> None:
        cells = [f"{max(values[c], 0.0):.4f}" if c.startswith("KL") else
                 f"{values[c]:.3f}" if c.endswith("acc") else f"{values[c]:.2f}" for c in columns]
        rows.append([f"`{bench.name}`", label, share, f"{unique:.3f}", f"{stored:.3f}", *cells, seconds])
        print(" | ".join(rows[-1]), flush=True)
        write()

    row("original", "1.00", 1.0, 1.0, scores, "")
    for share in shares:
        keep = round(share * bench.experts)
        for v in variants(keep, bench.experts, share):
            start = time.perf_counter()
            plan = v.planner(bench.model, bench.calibration, v.config, bench.name)
            model = copy.deepcopy(bench.model)
            apply(model, plan, calibration=bench.calibration)
            seconds = time.perf_counter() - start
            row(v.label, f"{share:.2f}", bench.unique_share(plan, model), expert_params(model) / bench.base_params,
                bench.evaluate(model), f"{seconds:.0f} s")
            del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "demo-fine"], help="'tiny' for a tiny random Mixtral")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5],
                        help="shares of the expert parameters kept")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows per domain")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--task-items", type=int, default=0,
                        help="items per bundled offline task (lm-eval); 0: perplexity and KL only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", default="docs/results-merge.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows: list[list[str]] = []
    columns: list[str] = []

    def write() -> None:
        header = ["model", "method", "share", "unique expert params", "stored expert params", *columns, "plan+apply"]
        lines = [
            "# Pruning vs merging vs low-rank experts at 25 % and 50 % of the expert parameters",
            "",
            f"Produced by `benchmarks/merge_lowrank.py` in {time.perf_counter() - start:.0f} s "
            f"(`python benchmarks/merge_lowrank.py {' '.join(sys.argv[1:])}`). Calibration: {args.samples} windows x "
            f"{args.seq_len} tokens (demo code + prose); evaluation: {args.eval_windows} held-out windows of "
            f"{args.seq_len} tokens per domain (fewer than the other results files: shared 2-core machine). "
            "KL: mean KL(original || compressed) per predicted token over the full vocabulary."
            + (f" Task accuracy: the bundled offline tasks, {args.task_items} items each (one standard error is "
               f"about {50 / args.task_items ** 0.5:.0f} points)." if args.task_items else ""),
            "",
            "unique expert params: the expert weights the method keeps, relative to the original (merged experts "
            "counted once; low-rank: factors + shared bases + matrices left dense). stored expert params: what the "
            "saved checkpoint holds. Merging with router keep writes every group's merged expert into each member's "
            "slot so that stock transformers runs it: the checkpoint keeps all E experts and the original bytes.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows],
            "",
        ]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines), encoding="utf-8")

    for name in args.models:
        run_model(Bench(name, args), args.shares, rows, columns, write)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
