"""Pruning vs merging vs low-rank experts at 25 % and 50 % of the expert parameters, on both demo models:
held-out perplexity per domain and KL divergence to the original; writes one markdown file.

Rows per budget (share s of the expert weights; K = s * E experts):

- prune enumerate (exact loss minimiser; only where C(E, K) is small) and prune reap;
- merge hc-smoe / mc-smoe with the authors' router (``router='keep'``: E router rows, every slot computes its
  group's merged expert; HC-SMoE Euclidean + average linkage + frequency weights; MC-SMoE frequency-dominant
  experts, router-logit similarity, weight-matching alignment, global group counts);
- the same two with the fitted router (``router='fit'``: K experts and K least-squares router rows, the hybrid);
- MC-SMoE with its compression stage (merge to 3E/4 groups with the authors' router, then every merged expert
  low-rank + 10 % of its residual rows at compress_ratio = s / 0.75, so the unique parameters are s);
- low-rank svd-llm (per-expert whitened SVD), d2moe (Fisher-weighted shared base + per-expert deltas) and mobe
  (E/4 shared bases mixed per expert) at ratio s;
- ablation: the compression stage with the authors' plain SVD and magnitude rows (no calibration whitening);
  with ``--ablations`` also HC-SMoE with cosine instead of Euclidean distance and D2-MoE with greedy delta ranks.

"unique expert params" is what the method keeps; for router='keep' the saved stock checkpoint still stores E
experts (members repeat their group's merged weights), see the "stored" column. Every row is also kept in a JSON
file (``--rows``), and ``--include`` adds the rows of earlier runs (other models) to the written tables. Usage:

    python benchmarks/merge_lowrank.py --threads 1 --out docs/results-merge.md        # both demo models
    python benchmarks/merge_lowrank.py --models tiny --out /tmp/m.md     # a tiny random Mixtral (develop the script)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
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

# The order of the rows within a model and share in the tables (label prefixes; anything else last).
ROW_ORDER = ("original", "prune enumerate", "prune reap", "merge hc-smoe, router keep", "merge mc-smoe, router keep",
             "merge hc-smoe, router fit", "merge mc-smoe, router fit", "merge mc-smoe to", "low-rank svd-llm",
             "low-rank d2moe", "low-rank mobe", "ablation", "")
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


def variants(keep: int, experts: int, share: float, ablations: bool) -> list[Variant]:
    merged = round(0.75 * experts)  # MC-SMoE with compression: merge to 3E/4, compress to share / (3/4)
    ratio = share * experts / merged
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
        Variant(f"merge mc-smoe to {merged}/{experts} + compression (MC-SMoE), router keep", plan_merge,
                MergeConfig(keep=merged, method="mc-smoe", compress_ratio=ratio)),
        Variant("low-rank svd-llm (per expert)", plan_lowrank, LowRankConfig(ratio=share, method="svd-llm")),
        Variant("low-rank d2moe (shared base + deltas)", plan_lowrank, LowRankConfig(ratio=share, method="d2moe")),
        Variant("low-rank mobe (E/4 shared bases)", plan_lowrank, LowRankConfig(ratio=share, method="mobe")),
        # ablations: one setting changed from the row named
        Variant("ablation: MC-SMoE compression, plain SVD + magnitude rows (authors')", plan_merge,
                MergeConfig(keep=merged, method="mc-smoe", compress_ratio=ratio, compress_whiten=False)),
    ]
    if ablations:
        rows += [
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
        if plan.kind == "merge" and not plan.summary.get("compress"):
            groups = sum(len(entry["groups"]) for entry in plan.layers.values())
            return groups / (self.experts * self.layers)
        return expert_params(model) / self.base_params


def run_model(bench: Bench, shares: list[float], rows: list[dict[str, Any]], write: Callable[[], None]) -> None:
    def row(label: str, share: str, unique: float, stored: float, values: dict[str, float], seconds: str) -> None:
        rows.append({"model": bench.name, "method": label, "share": share, "unique": unique, "stored": stored,
                     "scores": values, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
        write()

    row("original", "1.00", 1.0, 1.0, bench.evaluate(bench.model), "")
    for share in shares:
        keep = round(share * bench.experts)
        for v in variants(keep, bench.experts, share, bench.args.ablations):
            if bench.args.methods and not any(m in v.label for m in bench.args.methods):
                continue
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
    parser.add_argument("--models", nargs="*", default=["demo", "demo-fine"],
                        help="'tiny' for a tiny random Mixtral; none: only write the tables of --include")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5],
                        help="shares of the expert parameters kept")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows per domain")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--task-items", type=int, default=0,
                        help="items per bundled offline task (lm-eval); 0: perplexity and KL only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--ablations", action="store_true",
                        help="also HC-SMoE with cosine distance and D2-MoE with greedy delta ranks")
    parser.add_argument("--methods", nargs="*", default=[],
                        help="run only the rows whose label contains one of these strings (the original always)")
    parser.add_argument("--rows", default=None, help="JSON file the rows are kept in (default: --out with .json)")
    parser.add_argument("--include", nargs="*", default=[],
                        help="JSON row files of earlier runs whose models this run does not measure")
    parser.add_argument("--out", default="docs/results-merge.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    command = f"python benchmarks/merge_lowrank.py {shlex.join(sys.argv[1:])}"
    earlier = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.include]
    runs: list[dict[str, Any]] = list(earlier)
    rows: list[dict[str, Any]] = []
    this = {"command": command, "seconds": 0.0, "models": args.models, "rows": rows}
    if args.models:
        runs.append(this)

    def write() -> None:
        this["seconds"] = time.perf_counter() - start
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.models:
            Path(args.rows or Path(args.out).with_suffix(".json")).write_text(json.dumps(this, indent=1),
                                                                              encoding="utf-8")
        latest: dict[tuple[str, str, str], dict[str, Any]] = {}
        for run in runs:  # this run last: a row measured again replaces the earlier one
            latest.update({(r["model"], r["method"], r["share"]): r for r in run["rows"]})
        every = list(latest.values())
        order = list(dict.fromkeys(r["model"] for r in every))
        every.sort(key=lambda r: (order.index(r["model"]), r["method"] != "original", r["share"],
                                  next(i for i, p in enumerate(ROW_ORDER) if r["method"].startswith(p))))
        columns = [c for c in dict.fromkeys(k for r in every for k in r["scores"]) if not c.endswith("acc")]
        accs = [c for c in dict.fromkeys(k for r in every for k in r["scores"]) if c.endswith("acc")]

        def cell(r: dict[str, Any], c: str) -> str:
            v = r["scores"].get(c)
            if v is None:
                return ""
            return f"{max(v, 0.0):.4f}" if c.startswith("KL") else f"{v:.3f}" if c.endswith("acc") else f"{v:.2f}"

        header = ["model", "method", "share", "unique expert params", "stored expert params", *columns, "plan+apply"]
        produced = "; ".join(f"`{run['command']}` ({', '.join(run['models'])}, {run['seconds']:.0f} s)"
                             for run in runs)
        lines = [
            "# Pruning vs merging vs low-rank experts at 25 % and 50 % of the expert parameters",
            "",
            f"Produced by `benchmarks/merge_lowrank.py`: {produced}. Calibration: {args.samples} windows x "
            f"{args.seq_len} tokens (demo code + prose); evaluation: {args.eval_windows} held-out windows of "
            f"{args.seq_len} tokens per domain (fewer than the other results files: shared 2-core machine). "
            "KL: mean KL(original || compressed) per predicted token over the full vocabulary.",
            "",
            "unique expert params: the expert weights the method keeps, relative to the original (merged experts "
            "counted once; low-rank: factors + shared bases + matrices left dense; compressed merges: factors + "
            "kept residual rows, row indices not counted). stored expert params: what the saved checkpoint holds. "
            "Merging with router keep writes every group's merged expert into each member's slot so that stock "
            "transformers runs it: the checkpoint keeps all E experts and the original bytes. Compressed merges "
            "and low-rank rows are saved in moeslim's low-rank form (`moeslim.load`): one stored copy per merged "
            "expert, every router slot pointing at its group's.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *["| " + " | ".join([f"`{r['model']}`", r["method"], r["share"], f"{r['unique']:.3f}",
                                 f"{r['stored']:.3f}", *[cell(r, c) for c in columns], r["seconds"]]) + " |"
              for r in every],
            "",
        ]
        with_acc = [r for r in every if any(c in r["scores"] for c in accs)]
        if with_acc:
            lines += [
                "## Task accuracy",
                "",
                "The bundled offline tasks (one standard error is about 5 points at 100 items: differences under "
                "~10 points are noise).",
                "",
                "| " + " | ".join(["model", "method", "share", *accs]) + " |",
                "|" + "---|" * (3 + len(accs)),
                *["| " + " | ".join([f"`{r['model']}`", r["method"], r["share"], *[cell(r, c) for c in accs]]) + " |"
                  for r in with_acc],
                "",
            ]
        out.write_text("\n".join(lines), encoding="utf-8")

    for name in args.models:
        run_model(Bench(name, args), args.shares, rows, write)
    if not args.models:
        write()
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
