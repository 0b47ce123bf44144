"""A plan in a few lines a person reads: what ``moeslim plan`` prints instead of the plan itself.

The plan file holds every decision (one integer per kept expert, per-expert widths, ...); the console gets
the method, the decision per layer with runs of alike layers folded into one line, and the loss the method
minimised when the plan records it. Pure functions of the plan (no model needed), one per plan kind.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from moeslim.plans import Plan

MAX_LISTED = 8  # per-layer lists longer than this (many layers) are cut, the rest is in the plan file


def summarize(plan: Plan) -> list[str]:
    """Lines describing ``plan``: a header, then the per-layer decision and losses."""
    return _SUMMARIES[plan.kind](plan)


def layer_runs(values: dict[int, Any]) -> list[tuple[list[int], Any]]:
    """Consecutive layers with equal values folded: {0: a, 1: a, 2: b} -> [([0, 1], a), ([2], b)]."""
    runs: list[tuple[list[int], Any]] = []
    for idx in sorted(values):
        if runs and runs[-1][1] == values[idx] and runs[-1][0][-1] == idx - 1:
            runs[-1][0].append(idx)
        else:
            runs.append(([idx], values[idx]))
    return runs


def layer_span(layers: Sequence[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"


def _listed(items: Sequence[str], sep: str = " | ") -> str:
    shown = sep.join(items[:MAX_LISTED])
    return shown if len(items) <= MAX_LISTED else f"{shown}{sep}... ({len(items) - MAX_LISTED} more in the plan file)"


def _ids(ids: Sequence[int]) -> str:
    return ",".join(map(str, ids)) or "-"


def _per_layer(summary: dict[str, Any], key: str) -> dict[int, float]:
    layers = summary.get("layers") or {}
    return {int(k): float(v[key]) for k, v in layers.items() if isinstance(v, dict) and v.get(key) is not None}


def _loss_line(losses: dict[int, float], what: str = "loss") -> list[str]:
    if not losses:
        return []
    values = [_num(losses[i]) for i in sorted(losses)]
    return [f"{what} per layer: {_listed(values, ', ')} (sum {_num(sum(losses.values()))})"]


def _num(value: float) -> str:
    # one decimal for losses of 1 and more (the demo's are 10-1000); 3 significant digits below 1
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


def _header(plan: Plan, detail: str) -> str:
    what = plan.provenance.method + (f", {detail}" if detail else "")
    return f"plan {plan.kind} ({what}): {len(plan.layers)} MoE layers"


def _prune(plan: Plan) -> list[str]:
    s = plan.summary
    total = s.get("num_experts")
    detail = ", ".join(x for x in (s.get("mode"), f"{s['allocation']} allocation" if s.get("allocation") else None)
                       if x)
    lines = [_header(plan, detail)]
    kept = {idx: len(ids) for idx, ids in plan.layers.items()}
    of = f" of {total}" if total else ""
    for layers, count in layer_runs(kept):
        removed = [_ids(sorted(set(range(total)) - set(plan.layers[i]))) for i in layers] if total else []
        what = f"{layer_span(layers)}: keep {count}{of}"
        lines.append(f"{what}, removed {_listed(removed)}" if removed else what)
    lines += _loss_line(_per_layer(s, "loss"))
    lines += _router_fit(s)
    return lines


def _router_fit(summary: dict[str, Any]) -> list[str]:
    fits = summary.get("router_fit") or {}
    pairs = [(int(k), v) for k, v in fits.items() if isinstance(v, dict) and "loss_before" in v]
    if not pairs:
        return []
    shown = [f"{_num(v['loss_before'])} -> {_num(v['loss_after'])}" for _, v in sorted(pairs)]
    return [f"router refit, loss per layer: {_listed(shown, ', ')}"]


def _skip(plan: Plan) -> list[str]:
    s = plan.summary
    detail = ", ".join(str(x) for x in (s.get("rule"), f"quantile {s['quantile']}" if "quantile" in s else None,
                                         f"protect {s['protect']}" if s.get("protect") else None) if x)
    lines = [_header(plan, detail)]
    betas = [f"{plan.layers[i]['beta']:.3f}" for i in sorted(plan.layers)]
    lines.append(f"beta per layer: {_listed(betas, ', ')}")
    rates = _per_layer(s, "call_skip_rate")
    if rates:
        shown = [f"{100 * rates[i]:.1f} %" for i in sorted(rates)]
        lines.append(f"expert calls skipped on the calibration text, per layer: {_listed(shown, ', ')}")
    return lines


def _quantize(plan: Plan) -> list[str]:
    s = plan.summary
    if s.get("scope") == "gguf":
        return _quantize_gguf(plan)
    detail = ", ".join(x for x in (f"{s['target_bits']} bits target" if "target_bits" in s else None,
                                   s.get("quantizer"), f"group {s['group_size']}" if s.get("group_size") else None)
                       if x)
    lines = [_header(plan, detail)]
    hist = {idx: tuple(sorted(Counter(int(b) for b in d["bits"]).items())) for idx, d in plan.layers.items()}
    for layers, counts in layer_runs(hist):
        lines.append(f"{layer_span(layers)}: " + ", ".join(f"{n} experts at {b} bits" for b, n in counts))
    overall = Counter(int(b) for d in plan.layers.values() for b in d["bits"])
    lines.append("bits histogram: " + ", ".join(f"{b} bits x{n}" for b, n in sorted(overall.items())))
    if "avg_bits" in s:
        lines.append(f"average {s['avg_bits']:.3g} bits per expert weight"
                     + (f" ({s['avg_bits_with_overhead']:.3g} with group scales)" if "avg_bits_with_overhead" in s
                        else ""))
    lines += _loss_line(_per_layer(s, "objective"), "allocation cost")
    return lines


def _quantize_gguf(plan: Plan) -> list[str]:
    s = plan.summary
    lines = [_header(plan, f"GGUF types, {s.get('target_bits')} bits target")]
    types = {idx: tuple(sorted(d["gguf_types"].items())) for idx, d in plan.layers.items()}
    for layers, by_proj in layer_runs(types):
        lines.append(f"{layer_span(layers)}: " + ", ".join(f"{proj} {qtype}" for proj, qtype in by_proj))
    overall = Counter(q for d in plan.layers.values() for q in d["gguf_types"].values())
    lines.append("types: " + ", ".join(f"{q} x{n}" for q, n in sorted(overall.items())))
    if "avg_bits_with_overhead" in s:
        lines.append(f"average {s['avg_bits_with_overhead']:.3g} bits per expert weight (scales included)")
    return lines


def _merge(plan: Plan) -> list[str]:
    s = plan.summary
    total = s.get("num_experts")
    lines = [_header(plan, f"router {s['router']}" if s.get("router") else "")]
    counts = {idx: len(d["groups"]) for idx, d in plan.layers.items()}
    for layers, count in layer_runs(counts):
        groups = [" ".join("+".join(map(str, g)) for g in plan.layers[i]["groups"]) for i in layers]
        kept = f"{count} merged experts in {total} slots" if s.get("router") == "keep" else f"{count} experts"
        lines.append(f"{layer_span(layers)}: {total or '?'} -> {kept}, groups {_listed(groups)}")
    shares = [float(v["compress"]["param_ratio"]) for v in (s.get("layers") or {}).values()
              if isinstance(v, dict) and isinstance(v.get("compress"), dict)]
    if shares:
        lines.append(f"compressed (low-rank + residual rows): {min(shares):.1%}-{max(shares):.1%} of each merged "
                     "expert's weights")
    lines += _loss_line(_per_layer(s, "loss"))
    lines += _router_fit(s)
    return lines


def _lowrank(plan: Plan) -> list[str]:
    s = plan.summary
    detail = f"{s['param_ratio']:.1%} of the expert weights" if "param_ratio" in s else ""
    bases = {int(b) for b in _per_layer(s, "bases").values()}
    if bases:
        detail += f", {'/'.join(map(str, sorted(bases)))} shared bases per layer"
    lines = [_header(plan, detail)]
    for idx in sorted(plan.layers)[:MAX_LISTED]:
        d = plan.layers[idx]
        lines.append(f"layer {idx}: up ranks {_range(d['up_ranks'])}, down ranks {_range(d['down_ranks'])}")
    if len(plan.layers) > MAX_LISTED:
        lines.append(f"... ({len(plan.layers) - MAX_LISTED} more layers in the plan file)")
    lines += _loss_line(_per_layer(s, "loss"))
    lines += _router_fit(s)
    return lines


def _range(ranks: Sequence[int]) -> str:
    ordered = sorted(int(r) for r in ranks)
    return f"{ordered[0]}-{ordered[-1]} (median {ordered[len(ordered) // 2]})" if ordered else "-"


def _joint_formats(entry: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """(format, experts) of one joint layer: widths, or (low-rank layers) (up/down) ranks and dense experts."""
    if entry.get("ranks") is not None:
        counts = Counter(tuple(r) if r is not None else None for r in entry["ranks"])
        return tuple(("16 (untouched)" if r is None else f"low-rank {r[0]}/{r[1]}", n)
                     for r, n in sorted(counts.items(), key=lambda item: (item[0] is None, item[0] or ())))
    widths = sorted(Counter(int(b) for b in entry["bits"]).items())
    return tuple(("16 (untouched)" if b == 16 else f"{b} bits", n) for b, n in widths)


def _joint(plan: Plan) -> list[str]:
    s = plan.summary
    mib = 2**20
    detail = f"{s['held_mib']:.3f} MiB held, {s['held_ratio']:.1%} of the original" if "held_mib" in s else ""
    lines = [_header(plan, detail)]
    decided = {idx: (len(d["kept"]), _joint_formats(d)) for idx, d in plan.layers.items()}
    for layers, (count, formats) in layer_runs(decided):
        shown = ", ".join(f"{n} at {f}" for f, n in formats)
        lines.append(f"{layer_span(layers)}: keep {count}: {shown}")
    if s.get("hold_dtype"):
        lines.append(f"every float weight held in {s['hold_dtype']}")
    if s.get("hold_candidates"):  # why this dtype: each candidate's estimate, the cast's price included
        lines.append("hold dtype estimates: " + hold_estimates(s["hold_candidates"]))
    skips = {idx: float(d["skip_beta"]) for idx, d in plan.layers.items() if "skip_beta" in d}
    if skips:
        for layers, beta in layer_runs(skips):
            lines.append(f"{layer_span(layers)}: " + (f"skip by {s.get('skip_rule') or 'top2'} at beta {beta:.3g}"
                                                       if beta > 0 else "no skipping"))
        lines.append(f"expected expert MiB read per token {s['active_bytes'] / mib:.4f}")
    if s.get("target_bytes") is not None:
        lines.append(f"target {s['target_bytes'] / mib:.3f} MiB; estimated error {_num(s['estimated_error'])} "
                     f"(summed squared block-output errors; HiGHS gap {s.get('mip_gap', 0):.2g})")
    return lines


_SUMMARIES: dict[str, Callable[[Plan], list[str]]] = {
    "prune": _prune, "skip": _skip, "quantize": _quantize, "merge": _merge, "lowrank": _lowrank, "joint": _joint,
}


def hold_estimates(candidates: dict[str, Any]) -> str:
    """A joint plan's ``hold_candidates`` in one line: "auto 1.2e-03 (cast 0), bfloat16 9.8e-04 (cast 2.1e-04)",
    "float16 refused (...)" for a cast that overflows, "... does not fit" for one whose bytes cannot meet the
    target."""
    def one(dtype: str, c: dict[str, Any]) -> str:
        if not c.get("fits"):
            return f"{dtype} does not fit"
        if c.get("refused"):
            return f"{dtype} refused ({c['refused'].split(' (')[0]})"
        return f"{dtype} {c['estimated_error']:.3g} (cast {c['cast_error']:.3g})"
    return ", ".join(one(d, c) for d, c in candidates.items())
