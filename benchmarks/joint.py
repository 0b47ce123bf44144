"""The joint planner against the best single method, at 5 budgets per demo model; writes docs/results-joint.md.

For each demo model ("demo": 8 experts, Mixtral layout; "demo-fine": 64 experts, Qwen3-MoE layout) and each budget
(share of the original's held bytes, default 15 %, 25 %, 40 %, 60 %, 80 %):

- joint: ``moeslim plan joint --target-ratio R`` (kept experts per layer + a width per kept expert, GPTQ in apply);
  the layers' options are measured once and serve every budget (``measure_options``);
- the single methods, each at its largest setting whose held bytes fit the same budget:
  quantize-only uniform GPTQ (2/3/4/8 bits), quantize-only PMQ (global allocation over 2/3/4/8/16 bits, its
  average bits raised until the next step would not fit: the bytes closest to the budget), prune-only enumerate
  (demo-fine: the search's removal path) with global per-layer counts (the same loss curves the joint planner
  uses, all experts at 16 bits), prune-only REAP with a uniform count.

Every variant is applied and measured: held bytes (``param_bytes``, what the demo table reports), held-out
perplexity on both test domains (geometric mean), KL divergence to the original and top-1 agreement. The
best single method at a budget is the one with the lowest perplexity among those that fit it. The report checks
the planner's error estimate against measured KL over the budgets (Spearman rank correlation), gives the 25 %
ratio paired over the test windows with a 95 % interval (is the difference more than the windows resolve?), and
ends with one ``joint ppl ratio vs best single at 25%: X (model)`` line per model (goal: <= 1.0).

    python benchmarks/joint.py --out docs/results-joint.md
    python benchmarks/joint.py --plot-only --out docs/results-joint.md   # redraw the frontier plot from the table

The frontier plot (quality vs MiB held, one panel per model) is drawn from the written table into the PNG beside it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from moeslim.appliers import apply
from moeslim.calibrate import ExpertOutputs, ExpertOutputSample, LayerDecision, result_of, run_layerwise
from moeslim.config import CalibrationConfig, ConfigError
from moeslim.data import load_source, token_windows
from moeslim.data.calibration_set import build_calibration_set
from moeslim.evaluate.cost import param_bytes
from moeslim.evaluate.divergence import ReferenceTop, reference_top
from moeslim.evaluate.paired import paired_ratio
from moeslim.evaluate.perplexity import perplexity
from moeslim.methods.joint import JointConfig, measure_held, measure_options, plan_joint
from moeslim.methods.joint.config import JointTargets
from moeslim.methods.joint.solve import SizeOption, solve_joint
from moeslim.methods.prune.saliency import reap_scores, top_experts
from moeslim.methods.quant.driver import QuantizeConfig, plan_quantize, pmq_factors
from moeslim.models import find_moe_layers, load_model
from moeslim.plans import Plan, Provenance
from moeslim.workflows.joint_verify import kl_judge

MIB = 2**20
DOMAINS = ("code", "prose")
UNIFORM_WIDTHS = (2, 3, 4, 8)
PMQ_CANDIDATES = (2, 3, 4, 8, 16)


@dataclass
class Measured:
    name: str
    method: str
    held: int
    ppl: dict[str, float]
    kl: float
    top1: float
    seconds: float
    estimate: float | None = None
    window_nll: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # per domain, per test window
    tokens: dict[str, int] = dataclasses.field(default_factory=dict)  # predicted tokens per domain

    @property
    def ppl_geo(self) -> float:
        return math.exp(sum(math.log(v) for v in self.ppl.values()) / len(self.ppl))


def add_bench_arguments(parser: argparse.ArgumentParser, eval_windows: int = 8, max_tokens: int = 2048) -> None:
    """The calibration and evaluation flags ``Bench`` reads (the sibling joint_* benchmarks share them)."""
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=eval_windows)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--attention-widths", default="", help="JointConfig.attention_widths, e.g. 8,4 (empty: none)")
    parser.add_argument("--embedding-widths", default="", help="JointConfig.embedding_widths, e.g. 8,4 (empty: none)")


def nonexpert_widths(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """JointConfig's attention / embedding widths from ``add_bench_arguments``' flags."""
    return {name: tuple(int(b) for b in getattr(args, name).split(",") if b)
            for name in ("attention_widths", "embedding_widths")}


class Bench:
    """One model: its calibration windows, evaluation windows, KL reference, and variant cache."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.model, tok = load_model(name)
        self.calib = build_calibration_set(CalibrationConfig(samples=args.calib_samples, seq_len=args.seq_len), tok)
        self.windows = {d: token_windows(load_source(f"demo:{d}:test"), tok, args.seq_len, args.eval_windows)
                        for d in DOMAINS}
        self.refs: dict[str, ReferenceTop] = {d: reference_top(self.model, w) for d, w in self.windows.items()}
        self.cache: dict[str, Measured] = {}
        self.base = int(param_bytes(self.model)["total"])

    def measure(self, name: str, method: str, plans: Callable[[], list[Plan]], estimate: float | None = None
                ) -> Measured:
        if name in self.cache:
            return self.cache[name]
        start = time.perf_counter()
        model = copy.deepcopy(self.model)
        for plan in plans():
            apply(model, plan, calibration=self.calib)
        ppl, kl, top1, rows, tokens = {}, [], [], {}, {}
        for d, w in self.windows.items():
            r = perplexity(model, w, self.args.batch_size, progress=False, reference=self.refs[d], per_window=True)
            ppl[d], rows[d], tokens[d] = r["ppl"], r["window_nll"], r["tokens"]
            kl.append(r["kl"])
            top1.append(r["top1"])
        m = Measured(name, method, int(param_bytes(model)["total"]), ppl, float(np.mean(kl)), float(np.mean(top1)),
                     time.perf_counter() - start, estimate, rows, tokens)
        self.cache[name] = m
        print(f"  {self.name} {name}: {m.held / MIB:.2f} MiB, ppl {m.ppl_geo:.2f}, KL {m.kl:.4f} "
              f"({m.seconds:.0f} s)", flush=True)
        return m


def _provenance(bench: Bench, method: str) -> Provenance:
    return Provenance.of(bench.model, bench.name, method, {}, bench.calib.name, bench.calib.content_hash)


def _prune_plan(bench: Bench, kept: dict[int, list[int]], method: str) -> Plan:
    counts = {len(v) for v in kept.values()}
    summary = {"layout": "compact" if len(counts) > 1 else None, "groups": None}
    return Plan(kind="prune", layers={i: sorted(v) for i, v in kept.items()}, provenance=_provenance(bench, method),
                summary=summary)


def _reap_scores(bench: Bench, max_tokens: int) -> dict[int, torch.Tensor]:
    """(E,) REAP saliency of every layer from one layer-wise pass (its top experts are REAP's kept set at any count)."""
    return run_layerwise(
        bench.model, bench.calib.input_ids,
        make_observers=lambda _layer: [ExpertOutputs(max_tokens=max_tokens)],
        on_layer=lambda layer, obs: LayerDecision(result=reap_scores(result_of(obs[0], ExpertOutputSample),
                                                                     layer.route)),
        batch_size=bench.args.batch_size, progress=False)


def _singles(bench: Bench, targets: JointTargets, options: dict[int, list[SizeOption]], reap: dict[int, Any],
             factors: dict[int, Any], joint_held: int) -> list[Measured]:
    """Each single method at its smallest setting holding at least ``joint_held`` bytes (planned exactly, then
    measured): the comparison at equal or larger bytes."""
    sizes, base = targets.sizes, targets.base
    out = []
    uniform = [b for b in UNIFORM_WIDTHS if base - sum(lb.saving([b] * lb.num_experts) for lb in sizes.values())
               >= joint_held]
    if uniform:
        config = QuantizeConfig(method="uniform", bits=min(uniform), quantizer="gptq")
        out.append(bench.measure(f"uniform-{min(uniform)}", "quantize-only uniform",
                                 lambda: [plan_quantize(bench.model, bench.calib, config, bench.name)]))
    pmq = _pmq_at_least(bench, targets, factors, joint_held)
    out.append(bench.measure(f"pmq-{pmq.summary['target_bits']:.3f}", "quantize-only PMQ", lambda: [pmq]))
    layers = find_moe_layers(bench.model)
    experts, top_k = layers[0].num_experts, layers[0].top_k
    per_expert = {lb.row + lb.dense for lb in sizes.values()}
    if len(per_expert) == 1:  # every layer's experts alike: bytes move in steps of one expert
        step = per_expert.pop()
        dropped = min((base - joint_held) // step, (experts - top_k) * len(sizes))
        if dropped > 0:
            prune_options = {idx: [SizeOption(o.kept, o.prune_err, np.zeros((len(o.kept), 1)), o.freq) for o in opts]
                             for idx, opts in options.items()}
            # the solver counts the packed maps a quantized model holds (an upper bound): an unquantized plan
            # holds none, so the target gets them back as slack (far below one expert: the drop count is exact)
            slack = sum(lb.maps(lb.num_experts) for lb in sizes.values())
            choice = solve_joint(prune_options, (16,), sizes, base, base - dropped * step + slack)
            kept = {idx: list(c.kept) for idx, c in choice.layers.items()}
            tag = "-".join(str(len(v)) for _, v in sorted(kept.items()))
            out.append(bench.measure(f"{targets.prune.method}-global-{tag}", f"prune-only {targets.prune.method}",
                                     lambda: [_prune_plan(bench, kept, targets.prune.method)]))
        keeps = [k for k in range(top_k, experts) if base - (experts - k) * step * len(sizes) >= joint_held]
        if keeps:
            k = min(keeps)
            kept_reap = {idx: [int(e) for e in top_experts(scores, k)] for idx, scores in reap.items()}
            out.append(bench.measure(f"reap-{k}", "prune-only REAP",
                                     lambda: [_prune_plan(bench, kept_reap, "reap")]))
    return out


def _pmq_at_least(bench: Bench, targets: JointTargets, factors: dict[int, Any], joint_held: int) -> Plan:
    """The PMQ plan (global scope) of the smallest average bits whose planned bytes are >= ``joint_held``
    (bisection; at 16 bits every expert is kept, so it always exists)."""
    def plan_at(bits: float) -> tuple[Plan, int]:
        config = QuantizeConfig(method="pmq", bits=bits, candidates=PMQ_CANDIDATES, scope="global", quantizer="gptq")
        plan = plan_quantize(bench.model, bench.calib, config, bench.name, factors=factors)
        held = targets.base - sum(targets.sizes[i].saving(e["bits"]) for i, e in plan.layers.items())
        return plan, held

    lo, hi = float(min(PMQ_CANDIDATES)), float(max(PMQ_CANDIDATES))
    best, held = plan_at(lo)
    if held >= joint_held:
        return best
    best, _ = plan_at(hi)
    for _ in range(14):
        mid = (lo + hi) / 2
        plan, held = plan_at(mid)
        if held >= joint_held:
            best, hi = plan, mid
        else:
            lo = mid
    return best


def run_model(name: str, args: argparse.Namespace, budgets: list[float]) -> tuple[list[str], dict[str, Any]]:
    start = time.perf_counter()
    bench = Bench(name, args)
    print(f"{name}: {bench.base / MIB:.2f} MiB held, calibration {args.calib_samples} x {args.seq_len}", flush=True)
    step = args.size_step_fine if find_moe_layers(bench.model)[0].num_experts > 16 else 1
    widths = tuple(int(b) for b in args.widths.split(","))
    base_config = JointConfig(target_ratio=0.99, max_tokens=args.max_tokens, size_step=step, widths=widths,
                              gptq_folds=args.gptq_folds, **nonexpert_widths(args))
    targets: JointTargets = base_config.check_model(bench.model)  # the single methods' bytes: the model's dtype
    t0 = time.perf_counter()
    dtypes = _hold_dtypes(args)
    held_config = dataclasses.replace(base_config, verify_windows=args.verify_windows,
                                      **({"hold_dtypes": dtypes} if len(dtypes) > 1 else {"hold_dtype": dtypes[0]}))
    measured = measure_held(bench.model, bench.calib.input_ids, held_config)
    # the prune-only baselines' loss curves: the model's dtype (the joint plans' when they hold it)
    options = measured["auto"].options if "auto" in measured else measure_options(
        bench.model, bench.calib.input_ids, base_config, targets)
    measure_s = time.perf_counter() - t0
    judge = kl_judge(bench.model, args.batch_size) if args.verify_windows else None
    factors = pmq_factors(bench.model, bench.calib.input_ids,
                          QuantizeConfig(method="pmq", candidates=PMQ_CANDIDATES, max_tokens=args.max_tokens))
    reap = _reap_scores(bench, args.max_tokens)
    original = bench.measure("original", "original", lambda: [])
    rows: list[tuple[float, Measured | str, list[Measured]]] = []
    for share in budgets:
        config = dataclasses.replace(held_config, target_ratio=share)
        try:
            plan = plan_joint(bench.model, bench.calib, config, name, measured=measured, judge=judge)
        except ConfigError as err:
            rows.append((share, str(err).split(":")[1].strip() if ":" in str(err) else str(err), []))
            continue
        joint = bench.measure(f"joint-{share:g}", "joint", lambda plan=plan: [plan], plan.summary["estimated_error"])
        joint.method = "joint: " + _describe(plan)
        verified = plan.summary.get("verification")
        if verified:
            print(f"  {name} {share:g}: verification kept {verified['chosen']} of " + ", ".join(
                f"{c['name']} (est. {c['estimated_error']:.4g}, KL {c['measured_kl']:.5f})"
                for c in verified["candidates"]) + f" ({verified['seconds']:.0f} s)", flush=True)
            joint.method += f" [verified: {verified['chosen']}]"
        rows.append((share, joint, _singles(bench, targets, options, reap, factors, joint.held)))
    lines = _table(name, bench, original, rows)
    joints = [(s, j) for s, j, _ in rows if isinstance(j, Measured)]
    rho = float(spearmanr([j.estimate for _, j in joints], [j.kl for _, j in joints]).statistic) \
        if len(joints) > 2 else float("nan")
    at25 = next(((j, singles) for s, j, singles in rows if abs(s - 0.25) < 1e-9 and isinstance(j, Measured)), None)
    ratio = (at25[0].ppl_geo / min(m.ppl_geo for m in at25[1])) if at25 and at25[1] else float("nan")
    paired = None
    if at25 and at25[1]:
        best = min(at25[1], key=lambda m: m.ppl_geo)
        paired = paired_ratio(at25[0].window_nll, best.window_nll, at25[0].tokens)
    elapsed = time.perf_counter() - start
    dtype = str(next(bench.model.parameters()).dtype).removeprefix("torch.")
    held = " or ".join(dtype if d == "auto" else d for d in dtypes)
    lines += ["", f"{name}: the joint plans hold every float weight in {held} (hold dtypes {','.join(dtypes)}: "
              f"{'the planner chooses per budget' if len(dtypes) > 1 else 'one'}); "
              f"the single-method baselines keep the model's {dtype}."]
    lines += [f"{name}: joint options measured once in {measure_s:.0f} s ({len(options)} MoE layers, kept-set "
              f"sizes {list(targets.kept_sizes)}, prune method {targets.prune.method}); whole model {elapsed:.0f} s."]
    return lines, {"rho": rho, "ratio": ratio, "paired": paired, "budgets": len(joints), "held": held,
                   "dtype": dtype, "windows": sum(len(w) for w in bench.windows.values())}


def _hold_dtypes(args: argparse.Namespace) -> tuple[str, ...]:
    """The joint plans' hold dtype candidates: ``--hold-dtypes`` (several: the planner chooses), else
    ``--hold-dtype``."""
    if args.hold_dtypes is None:
        return (args.hold_dtype,)
    if args.hold_dtype != "auto":
        raise SystemExit("give --hold-dtype or --hold-dtypes, not both")
    return tuple(d for d in args.hold_dtypes.split(",") if d)


def _describe(plan: Plan) -> str:
    parts = []
    for idx in sorted(plan.layers):
        e = plan.layers[idx]
        widths = sorted(set(e["bits"]))
        parts.append(f"{len(e['kept'])}@{'/'.join(map(str, widths))}")
    attention = plan.summary.get("attention_bits")
    if attention:  # the packed attention and embedding choices (plan joint --attention-widths / --embedding-widths)
        parts.append("attn " + "/".join(str(attention[k]) for k in sorted(attention, key=int)))
    if plan.summary.get("embedding_bits") is not None:
        parts.append(f"emb {plan.summary['embedding_bits']}")
    if plan.summary.get("hold_dtype"):
        parts.append(f"held {plan.summary['hold_dtype']}")
    return " ".join(parts)


def _table(name: str, bench: Bench, original: Measured, rows: list[Any]) -> list[str]:
    head = (f"### {name} (original: {original.held / MIB:.2f} MiB held, ppl code {original.ppl['code']:.2f}, "
            f"prose {original.ppl['prose']:.2f})")
    lines = [head, "", "| budget | variant | method | MiB held | % of original | ppl code | ppl prose | ppl (geo) | "
             "vs original | KL | top-1 | est. error |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for share, joint, singles in rows:
        label = f"{share:.0%} ({share * bench.base / MIB:.2f} MiB)"
        if not isinstance(joint, Measured):
            lines.append(f"| {label} | - | no plan fits: {joint} | | | | | | | | | |")
            continue
        best = min(singles, key=lambda m: m.ppl_geo) if singles else None
        for m in [joint, *singles]:
            star = " (best single)" if m is best else ""
            est = f"{m.estimate:.4g}" if m.estimate is not None and m is joint else ""
            lines.append(f"| {label} | {m.name}{star} | {m.method} | {m.held / MIB:.2f} | {m.held / bench.base:.1%} | "
                         f"{m.ppl['code']:.2f} | {m.ppl['prose']:.2f} | {m.ppl_geo:.2f} | "
                         f"{m.ppl_geo / original.ppl_geo - 1:+.1%} | {m.kl:.4f} | {m.top1:.1%} | {est} |")
        if best is not None:
            ratio = joint.ppl_geo / best.ppl_geo
            lines.append(f"| {label} | **joint / best single** | | | | | | **{ratio:.3f}** | | | | |")
    return lines


PLOT_LINK = "![perplexity vs MiB held](results-joint.png)"


def _parse_tables(text: str) -> dict[str, list[tuple[str, str, float, float]]]:
    """{model: [(variant, method, MiB held, ppl geo)]} from the written report's tables."""
    out: dict[str, list[tuple[str, str, float, float]]] = {}
    model = None
    for line in text.splitlines():
        if line.startswith("### "):
            model = line[4:].split(" (")[0]
            out[model] = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if model is None or len(cells) < 8 or not cells[3] or cells[1] in ("variant", "-") or cells[0] == "---":
            continue
        try:
            out[model].append((cells[1].replace(" (best single)", ""), cells[2], float(cells[3]), float(cells[7])))
        except ValueError:
            continue
    return out


def plot_frontier(md_path: Path) -> Path:
    """Perplexity (geometric mean over domains) vs MiB held: the joint plans' frontier and the single methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = _parse_tables(md_path.read_text(encoding="utf-8"))
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), squeeze=False)
    kinds = {"joint": ("joint", "o-"), "quantize-only uniform": ("uniform", "s"), "quantize-only PMQ": ("PMQ", "^"),
             "prune-only REAP": ("REAP", "x")}
    for ax, (model, rows) in zip(axes[0], tables.items(), strict=True):
        groups: dict[str, list[tuple[float, float]]] = {}
        for _name, method, mib, ppl in rows:
            key = "joint" if method.startswith("joint") else ("prune-only" if method.startswith("prune-only")
                                                              and "REAP" not in method else method)
            groups.setdefault(key, []).append((mib, ppl))
        for key, points in groups.items():
            label, style = kinds.get(key, ("prune-only enumerate/search (global)" if key == "prune-only" else key, "d"))
            pts = sorted(set(points))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, alpha=0.8)
        ax.set_xlabel("MiB held (measured)")
        ax.set_ylabel("perplexity (geometric mean, code + prose)")
        ax.set_yscale("log")
        ax.set_title(model)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = md_path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,demo-fine")
    parser.add_argument("--budgets", default="0.15,0.25,0.4,0.6,0.8")
    add_bench_arguments(parser, eval_windows=16, max_tokens=4096)
    parser.add_argument("--size-step-fine", type=int, default=4,
                        help="kept-set size step on models with more than 16 experts (a smaller MILP)")
    parser.add_argument("--widths", default="2,3,4,8,16", help="the joint planner's candidate widths")
    parser.add_argument("--hold-dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="the joint plans' hold_dtype (auto: the model's); the single methods keep the model's")
    parser.add_argument("--hold-dtypes", default=None,
                        help="JointConfig.hold_dtypes: the joint planner chooses among these per budget, its estimate "
                             "pricing each cast (e.g. auto,float16); instead of --hold-dtype")
    parser.add_argument("--gptq-folds", type=int, default=JointConfig.gptq_folds,
                        help="JointConfig.gptq_folds: cross-fitted GPTQ errors of the joint options (1: in sample)")
    parser.add_argument("--verify-windows", type=int, default=0,
                        help="JointConfig.verify_windows: calibration windows held out to judge the candidate plans "
                             "by measured KL (0: the estimated optimum)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the table in --out")
    args = parser.parse_args()
    if args.plot_only:
        md = Path(args.out)
        text = md.read_text(encoding="utf-8")
        if PLOT_LINK not in text:  # a table written before the plot existed
            head, _, rest = text.partition("\n\n")
            md.write_text(f"{head}\n\n{PLOT_LINK}\n\n{rest}", encoding="utf-8")
        print(f"wrote {plot_frontier(md)}")
        return
    torch.manual_seed(0)
    budgets = [float(b) for b in args.budgets.split(",")]
    start = time.perf_counter()
    body: list[str] = []
    summary: dict[str, dict[str, Any]] = {}
    for name in args.models.split(","):
        lines, summary[name] = run_model(name, args, budgets)
        body += [*lines, ""]
    total = time.perf_counter() - start
    text = [
        "# Joint planner vs the best single method",
        "",
        "Generated by `python benchmarks/joint.py` (" + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                              vars(args).items() if k != "out") + ").",
        f"Calibration: {args.calib_samples} windows x {args.seq_len} tokens (fewer than the demo's 64, to keep the "
        f"run short on 2 CPU cores; joint options and PMQ factors on at most {args.max_tokens} tokens per layer); "
        f"evaluation: {args.eval_windows} held-out test windows per domain. Every quantized variant is GPTQ'd in "
        "apply on the same calibration windows. Single methods hold at least the joint plan's measured bytes, "
        "each at its smallest such setting (PMQ's average bits bisected to the bytes closest to the joint's; the "
        "original itself is not a single method); the best single method is the one of lowest perplexity among "
        "them. 'est. error' is the planner's estimate (summed squared block-output errors; each width's error that of "
        f"GPTQ as apply runs it, on the sample: {args.gptq_folds}-fold cross-fitted, 1: in sample). Total run time "
        f"{total / 60:.1f} min.",
        "",
        PLOT_LINK,
        "",
        *body,
    ]
    for name, s in summary.items():
        text.append(f"spearman(estimated error, KL) over {s['budgets']} budgets: {s['rho']:.3f} ({name})")
    for name, s in summary.items():
        text.append(f"joint plans held in: {s['held']} (hold dtypes {','.join(_hold_dtypes(args))}); single-method "
                    "baselines: "
                    f"the model's {s['dtype']} ({name})")
    for name, s in summary.items():
        if s["paired"] is not None:  # is the 25 % difference more than the test windows resolve?
            p = s["paired"]
            text.append(f"joint / best single at 25%, paired over {s['windows']} test windows: "
                        f"{p.ratio:.5f} (95% interval {p.low:.5f}-{p.high:.5f}) ({name})")
    for name, s in summary.items():
        text.append(f"joint ppl ratio vs best single at 25%: {s['ratio']:.3f} ({name})")
    output = "\n".join(text) + "\n"
    print(output)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(output, encoding="utf-8")
        plot_frontier(Path(args.out))


if __name__ == "__main__":
    main()
