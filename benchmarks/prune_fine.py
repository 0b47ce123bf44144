"""Expert pruning on the fine-grained demo model (Qwen3-MoE, 64 experts, top-8); writes docs/results-fine.md.

1. Methods x removal: at each removal share (default 25 % and 50 % of the experts of every layer) every method of
   ``moeslim plan prune`` that fits 64 experts (search = greedy removal + swaps on the enumerate objective,
   frequency, soft-count, reap, random over seeds; enumerate itself would score C(64, 48) ~ 5e14 sets per layer)
   is planned on the same calibration windows, applied, and evaluated on held-out test perplexity (both domains)
   and the bundled tasks. Every kept set is also scored with ONE common scorer (all calibration tokens), so the
   reconstruction-loss column compares methods on the objective search minimises.
2. Search gap to the exact optimum where it is computable, per layer, same objective and token sample:
   (a) the whole layer, removing 2 experts: all C(64, 2) kept sets;
   (b) pool subproblems: a seeded pool of ``--pool`` experts, all other experts always kept, removing 25 % / 50 %
       of the pool: all C(pool, keep) sets, vs search and the rank baselines restricted to the pool.
3. Non-uniform per-layer budgets vs uniform at equal total experts, when ``PruneConfig`` offers a per-layer
   budget method (checked at run time; the row says so when it does not).

Usage::

    python benchmarks/prune_fine.py --out docs/results-fine.md
    python benchmarks/prune_fine.py --tiny --out /tmp/fine.md    # tiny random Qwen3-MoE (develop the script)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim._package import assets_dir
from moeslim.appliers.prune import apply_prune
from moeslim.calibrate import ExpertOutputs, LayerDecision, run_layerwise
from moeslim.config import CalibrationConfig, EvalConfig
from moeslim.methods.prune import PruneConfig, plan_prune
from moeslim.methods.prune.enumerate import SubsetScorer
from moeslim.methods.prune.search import search_subset
from moeslim.models import MoELayer, find_moe_layers
from moeslim.plans import Plan

TASKS = ("moeslim_code_nextline", "moeslim_prose_continuation")
RANK_METHODS = ("frequency", "soft-count", "reap")
METHODS = ("search", *RANK_METHODS, "random", "non-uniform")


@dataclass
class Setup:
    """The model, its tokenizer, the calibration windows (N, L) and how to evaluate a model."""

    model: nn.Module
    tokenizer: Any
    name: str
    calibration: Any  # CalibrationSet or (N, L) ids
    input_ids: torch.Tensor
    evaluate: Callable[[nn.Module], dict[str, float]]


@dataclass
class Row:
    method: str
    keep: int
    plans: list[Plan]
    scores: list[dict[str, float]]  # one per plan (seeds): ppl per domain and task accuracy
    seconds: float
    losses: list[float] = field(default_factory=list)  # common-scorer loss summed over layers, per plan
    note: str = ""


def _demo_setup(args: argparse.Namespace) -> Setup:
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.evaluate import evaluate_model
    from moeslim.models import load_model

    model, tokenizer = load_model(args.model)
    calibration = build_calibration_set(CalibrationConfig(samples=args.samples, seq_len=args.seq_len), tokenizer)
    evaluation = EvalConfig(seq_len=args.seq_len, max_windows=args.eval_windows, tasks=TASKS,
                            task_limit=args.task_limit, batch_size=args.batch_size)

    def evaluate(m: nn.Module) -> dict[str, float]:
        r = evaluate_model(m, tokenizer, evaluation, name="variant")
        return {**{f"ppl {d}": v for d, v in r.perplexity.items()}, **r.tasks}

    return Setup(model, tokenizer, args.model, calibration, calibration.input_ids, evaluate)


def _tiny_setup(args: argparse.Namespace) -> Setup:
    """A tiny random Qwen3-MoE with 16 experts, random tokens: exercises every code path in seconds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import VOCAB, tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen3_moe", VOCAB)
    config.num_experts, config.num_experts_per_tok, config.mlp_only_layers = 16, 4, []
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()

    def ids(seed: int, n: int) -> torch.Tensor:
        return torch.randint(3, VOCAB, (n, args.seq_len), generator=torch.Generator().manual_seed(seed))

    calibration, held_out = ids(0, args.samples), {"code": ids(1, 4), "prose": ids(2, 4)}

    @torch.no_grad()
    def evaluate(m: nn.Module) -> dict[str, float]:
        out = {}
        for domain, x in held_out.items():
            logits = m(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            out[f"ppl {domain}"] = math.exp(nll.item())
        return out

    return Setup(model, None, "tiny-qwen3-moe", calibration, calibration, evaluate)


def _plan_and_eval(setup: Setup, config: PruneConfig, batch_size: int) -> tuple[Plan, dict[str, float]]:
    plan = plan_prune(setup.model, setup.calibration, config, model_name=setup.name, batch_size=batch_size)
    pruned = copy.deepcopy(setup.model)
    apply_prune(pruned, plan)
    return plan, setup.evaluate(pruned)


def method_rows(setup: Setup, keep: int, args: argparse.Namespace, emit: Callable[[list[Row]], None]) -> list[Row]:
    """One row per method; ``emit`` gets the rows so far after each one (the report is rewritten as rows finish)."""
    rows: list[Row] = []
    for method in [m for m in ("search", *RANK_METHODS) if m in args.methods]:
        # Search scores ~E^2 kept sets per layer; its token sample is capped (--search-tokens) to stay in budget.
        extra: dict[str, Any] = {"max_tokens": args.search_tokens} if method == "search" else {}
        if method == "search" and args.search_budget:
            extra["budget"] = args.search_budget
        start = time.perf_counter()
        plan, scores = _plan_and_eval(setup, PruneConfig(method=method, keep=keep, **extra), args.batch_size)
        note = ""
        if method == "search":
            layers = plan.summary["layers"].values()
            note = (f"{sum(int(e.get('subsets_scored', 0)) for e in layers)} sets scored, "
                    f"{sum(int(e.get('swaps', 0)) for e in layers)} swaps, {args.search_tokens} tokens"
                    + (", budget exhausted" if any(e.get("budget_exhausted") for e in layers) else ""))
        rows.append(Row(method, keep, [plan], [scores], time.perf_counter() - start, note=note))
        print(f"{method} keep {keep}: {scores} ({rows[-1].seconds:.0f} s)", flush=True)
        emit(rows)
    if "random" not in args.methods:
        return rows
    start = time.perf_counter()
    runs = [_plan_and_eval(setup, PruneConfig(method="random", keep=keep, seed=s), args.batch_size)
            for s in range(args.seeds)]
    rows.append(Row(f"random ({args.seeds} seeds)", keep, [p for p, _ in runs], [s for _, s in runs],
                    time.perf_counter() - start))
    print(f"random keep {keep}: {[s for _, s in runs]}", flush=True)
    return rows


def nonuniform_rows(setup: Setup, keep: int, args: argparse.Namespace) -> list[Row]:
    """Search with per-layer counts from a global allocation, at the same total experts as ``keep`` per layer.

    Only when ``PruneConfig`` has ``allocation="global"`` (another branch adds it); an error is reported in the row.
    """
    if "non-uniform" not in args.methods or "allocation" not in {f.name for f in dataclasses.fields(PruneConfig)}:
        return []
    start = time.perf_counter()
    try:
        config = PruneConfig(method="search", keep=keep, allocation="global", max_tokens=args.search_tokens,
                             **({"budget": args.search_budget} if args.search_budget else {}))
        plan, scores = _plan_and_eval(setup, config, args.batch_size)
    except Exception as error:  # reported in the table, never hidden
        print(f"non-uniform keep {keep} failed: {error!r}", flush=True)
        return [Row("search, global allocation (non-uniform)", keep, [], [], time.perf_counter() - start,
                    note=f"failed: {type(error).__name__}: {error}")]
    counts = [len(plan.layers[i]) for i in sorted(plan.layers)]
    print(f"non-uniform keep {keep}: {scores} counts {counts}", flush=True)
    return [Row("search, global allocation (non-uniform)", keep, [plan], [scores], time.perf_counter() - start,
                note=f"kept per layer {counts} (total {sum(counts)} = {keep} x {len(counts)})")]


# ----------------------------------------------------------------------------------------------- search gap


@dataclass
class Gap:
    """One subproblem: the exact optimum and what each method finds, as losses (same scorer)."""

    layer: int
    problem: str
    kind: str  # the problem without the pool index, for the summary
    sets: int
    exact: float
    found: dict[str, float]
    search_evaluations: int
    search_exact: bool


def _sub_loss(scorer: SubsetScorer, fixed: Sequence[int], pool: Sequence[int]) -> Callable[[Sequence[int]], float]:
    """Loss of keeping ``fixed`` plus the pool members at local positions ``local``."""
    return lambda local: scorer.loss(sorted((*fixed, *(pool[i] for i in local))))


def _rank_pick(scores: torch.Tensor, pool: Sequence[int], keep: int) -> tuple[int, ...]:
    """The ``keep`` pool members with the highest score (ties to lower ids): a rank method restricted to the pool."""
    order = sorted(range(len(pool)), key=lambda i: (-float(scores[pool[i]]), pool[i]))
    return tuple(sorted(order[:keep]))


def _subproblem(scorer: SubsetScorer, layer: int, fixed: list[int], pool: list[int], keep: int, label: str,
                kind: str, ranks: dict[str, torch.Tensor]) -> Gap:
    loss = _sub_loss(scorer, fixed, pool)
    subsets = list(itertools.combinations(range(len(pool)), keep))
    exact_kept, exact = min(((s, loss(s)) for s in subsets), key=lambda t: (t[1], t[0]))
    found = search_subset(loss, len(pool), keep)
    losses = {"search": found.loss, **{m: loss(_rank_pick(r, pool, keep)) for m, r in ranks.items()}}
    return Gap(layer, label, kind, len(subsets), exact, losses, found.evaluations, tuple(found.kept) == exact_kept)


def _rank_scores(sample: Any, layer: MoELayer) -> dict[str, torch.Tensor]:
    """Frequency, soft-count and REAP saliency of every expert on the token sample (as moeslim computes them)."""
    from moeslim.methods.prune.saliency import reap_scores

    weights, ids = layer.route(sample.logits, None)  # (T, k)
    probs = torch.softmax(sample.logits.double(), dim=-1)
    frequency = torch.bincount(ids.reshape(-1), minlength=layer.num_experts).double()
    return {"frequency": frequency, "soft-count": probs.sum(0), "reap": reap_scores(sample, layer.route)}


def score_and_gap(setup: Setup, rows: list[Row], args: argparse.Namespace) -> list[Gap]:
    """One calibration pass: score every row's kept sets with a common scorer, then solve the subproblems."""
    gaps: list[Gap] = []
    per_layer_losses: dict[tuple[int, int], float] = {}  # (row, plan) -> summed loss

    def on_layer(layer: MoELayer, observers: Sequence[Any]) -> LayerDecision:
        full, small = (o.result() for o in observers)
        scorer = SubsetScorer(full, layer.route)
        for r, row in enumerate(rows):
            for p, plan in enumerate(row.plans):
                kept = plan.layers[layer.layer_idx]
                per_layer_losses[(r, p)] = per_layer_losses.get((r, p), 0.0) + scorer.loss(kept)
        del scorer
        if not args.gap:
            return LayerDecision(result=None)
        sub = SubsetScorer(small, layer.route)
        ranks = _rank_scores(small, layer)
        n = layer.num_experts
        everything = list(range(n))
        if args.full_gap:
            gaps.append(_subproblem(sub, layer.layer_idx, [], everything, n - 2, f"all {n}, remove 2",
                                    f"all {n}, remove 2", ranks))
        gen = torch.Generator().manual_seed(args.seed + layer.layer_idx)
        for pool_idx in range(args.pools):
            pool = sorted(torch.randperm(n, generator=gen)[: args.pool].tolist())
            fixed = [e for e in everything if e not in pool]
            for share in args.removal:
                remove = round(share * args.pool)
                gaps.append(_subproblem(sub, layer.layer_idx, fixed, pool, args.pool - remove,
                                        f"pool {pool_idx} of {args.pool}, remove {remove}",
                                        f"pool of {args.pool}, remove {remove}", ranks))
        print(f"layer {layer.layer_idx}: gap subproblems done", flush=True)
        return LayerDecision(result=None)

    run_layerwise(setup.model, setup.input_ids,
                  make_observers=lambda layer: [ExpertOutputs(max_tokens=None),
                                                ExpertOutputs(max_tokens=args.gap_tokens, seed=args.seed)],
                  on_layer=on_layer, batch_size=args.batch_size, progress=False)
    for r, row in enumerate(rows):
        row.losses = [per_layer_losses[(r, p)] for p in range(len(row.plans))]
    return gaps


# ----------------------------------------------------------------------------------------------- report


def _fmt(values: list[float], spec: str = ".2f") -> str:
    if not values:
        return "pending"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def method_table(rows: list[Row], original: dict[str, float], experts: int) -> list[str]:
    keys = list(original)
    head = ["method", "keep", *keys, "recon. loss (sum over layers)", "plan+eval s", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| original | " + str(experts) + " | " + " | ".join(_cell(k, [original[k]]) for k in keys)
                 + " | 0 | | |")
    for row in rows:
        if not row.scores:
            lines.append(f"| {row.method} | {row.keep} | " + " | ".join("-" for _ in keys) + f" | - | "
                         f"{row.seconds:.0f} | {row.note} |")
            continue
        cells = [_cell(k, [s[k] for s in row.scores if k in s]) for k in keys]
        lines.append(f"| {row.method} | {row.keep} | " + " | ".join(cells)
                     + f" | {_fmt(row.losses, '.4g')} | {row.seconds:.0f} | {row.note} |")
    return lines


def _cell(key: str, values: list[float]) -> str:
    if not values:
        return "-"
    if key.startswith("ppl"):
        return _fmt(values)
    return _fmt([100 * v for v in values], ".1f") + " %"


def gap_table(gaps: list[Gap]) -> list[str]:
    methods = list(gaps[0].found)
    head = ["layer", "subproblem", "sets", "exact loss", *[f"{m} gap" for m in methods], "search evals",
            "search = exact"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in gaps:
        cells = [f"{100 * (g.found[m] / g.exact - 1):+.2f} %" if g.exact > 0 else "-" for m in methods]
        lines.append(f"| {g.layer} | {g.problem} | {g.sets} | {g.exact:.3f} | " + " | ".join(cells)
                     + f" | {g.search_evaluations} | {'yes' if g.search_exact else 'no'} |")
    by_problem: dict[str, list[Gap]] = {}
    for g in gaps:
        by_problem.setdefault(g.kind, []).append(g)
    lines += ["", "| subproblem kind | cases | " + " | ".join(f"mean {m} gap" for m in methods)
              + " | search exact |", "|---|---|" + "---|" * (len(methods) + 1)]
    for kind, group in by_problem.items():
        means = [statistics.mean(g.found[m] / g.exact - 1 for g in group if g.exact > 0) for m in methods]
        hits = sum(g.search_exact for g in group)
        lines.append(f"| {kind} | {len(group)} | " + " | ".join(f"{100 * v:+.2f} %" for v in means)
                     + f" | {hits}/{len(group)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(assets_dir() / "demo-fine"), help="default: the fine demo model")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--removal", type=float, nargs="+", default=[0.25, 0.5], help="share of experts removed")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=24, help="held-out test windows per domain")
    parser.add_argument("--task-limit", type=int, default=100, help="examples per bundled task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3, help="random-subset seeds")
    parser.add_argument("--search-tokens", type=int, default=2048, help="token sample of the search objective")
    parser.add_argument("--search-budget", type=int, default=0, help="max loss evaluations per layer (0: none)")
    parser.add_argument("--gap-tokens", type=int, default=1024, help="token sample of the gap subproblems")
    parser.add_argument("--pool", type=int, default=12, help="experts in each pool subproblem")
    parser.add_argument("--pools", type=int, default=1, help="pool subproblems per layer")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="rows to run (split a long run over processes; each repeats the original row)")
    parser.add_argument("--gap", action=argparse.BooleanOptionalAction, default=True,
                        help="solve the search-gap subproblems")
    parser.add_argument("--full-gap", action=argparse.BooleanOptionalAction, default=True,
                        help="also solve the whole-layer remove-2 subproblem (C(E, 2) sets per layer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", default="docs/results-fine.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    setup = _tiny_setup(args) if args.tiny else _demo_setup(args)
    experts = find_moe_layers(setup.model)[0].num_experts
    original = setup.evaluate(setup.model)
    print(f"original: {original}", flush=True)
    rows: list[Row] = []

    def emit(new: list[Row]) -> None:
        write_report(args, setup, rows + new, original, [], time.perf_counter() - start, final=False)

    for share in args.removal:
        keep = experts - round(share * experts)
        rows += method_rows(setup, keep, args, emit)
        rows += nonuniform_rows(setup, keep, args)
        emit([])
    gaps = score_and_gap(setup, rows, args)
    write_report(args, setup, rows, original, gaps, time.perf_counter() - start, final=True)


def write_report(args: argparse.Namespace, setup: Setup, rows: list[Row], original: dict[str, float],
                 gaps: list[Gap], seconds: float, final: bool) -> None:
    """Write the markdown report; before the scoring pass (final=False) the loss and gap sections say pending."""
    layers = find_moe_layers(setup.model)
    experts, top_k = layers[0].num_experts, layers[0].top_k
    nonuniform = any("non-uniform" in r.method for r in rows)
    what = "tiny random Qwen3-MoE (random tokens)" if args.tiny else f"`{Path(args.model).name}`"
    status = "" if final else " PARTIAL (still running: rows so far; losses and gaps pending)"
    lines = [
        f"# Expert pruning on the fine-grained demo model {what}{status}",
        "",
        f"{len(layers)} MoE layers x {experts} experts, top-{top_k}. Calibration: {args.samples} windows x "
        f"{args.seq_len} tokens (code + prose, seed {args.seed}); evaluation: {args.eval_windows} held-out test "
        f"windows per domain and the bundled tasks ({args.task_limit} examples each, accuracy). Produced by "
        f"`python benchmarks/prune_fine.py` in {seconds:.0f} s on a shared 2-core CPU.",
        "",
        "## Methods x removal",
        "",
        f"`recon. loss` = ||F'(X; kept) - F(X)|| per layer summed over layers, all methods scored by one scorer on "
        f"all {int(setup.input_ids.numel())} calibration tokens (search itself optimises it on a "
        f"{args.search_tokens}-token sample). Random: mean ± standard deviation over seeds.",
        "",
        *method_table(rows, original, experts),
        "",
        "Non-uniform per-layer budgets: " + ("see the `non-uniform` rows (same total experts as the uniform rows)."
                                             if nonuniform else
                                             "no non-uniform row in this run (not asked for, or no per-layer "
                                             "budget option in `PruneConfig`)."),
        "",
        "## Search gap to the exact optimum",
        "",
        f"Same objective on a {args.gap_tokens}-token sample of the calibration set per layer. `all E, remove 2`: "
        f"every C({experts}, 2) kept set. `pool`: {args.pool} seeded experts are candidates, all others always "
        f"kept; every kept set of the pool is enumerated. Gap = loss / exact optimum - 1 (0 = optimal). The rank "
        f"methods (frequency, soft-count, REAP) keep the pool members they score highest.",
        "",
        *(gap_table(gaps) if gaps else ["(not run: --no-gap)" if final else "(pending)"]),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    if final:
        print("\n".join(lines))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
