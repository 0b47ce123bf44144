"""Held-out perplexity and bytes on disk of PMQ vs uniform vs random bit allocation (MC-MoE section 3).

Rows: FP32, BF16, uniform GPTQ at 2/3/4 bits, PMQ at 2.0/2.5/3.0 average bits, random allocation at the
same budgets (the control: PMQ must beat it to show that its factors matter). Every quantized row is
saved with ``save_quantized`` and its folder size reported. The verdict lines at the end state plainly
whether PMQ beat uniform / random at equal budget, whatever the answer.

    python benchmarks/quant_quality.py                  # the bundled demo model
    python benchmarks/quant_quality.py --tiny           # a random tiny Mixtral (mechanics only)

Symmetric 4-bit side by side with llm-compressor (``--sym4``; issue 22): moeslim's symmetric GPTQ W4A16 (group 64)
and llm-compressor's GPTQ W4A16 on the same calibration windows, llm-compressor run in its own venv
(``--llmcompressor-python``, benchmarks/llmcompressor_gptq.py) and its folder evaluated here, experts decompressed
by compressed-tensors. Ends with one ``quant sym4 ppl ratio moeslim-vs-llmcompressor: X`` line per model.

    python benchmarks/quant_quality.py --sym4 --model demo,fine --llmcompressor-python VENV/bin/python \
        --out docs/results-quant-sym4.md

What the engine scope costs (``--granularity``; issue 22): symmetric GPTQ with PMQ at one average width, per expert
(the paper: a budget per layer; and the same model-wide budget as the engine scope) against one width per MoE layer
(``--granularity layer --scope global``, the mixed widths compressed-tensors/vLLM serve). Ends with one
``quant granularity ppl ratio layer-vs-expert: X`` line per model (the tied program over the untied one, equal bits).

    python benchmarks/quant_quality.py --granularity --model demo,fine --budgets 3,2.5 --candidates 2,3,4 \
        --group-size 16 --out docs/results-quant-granularity.md
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moeslim.appliers import apply
from moeslim.config import CalibrationConfig
from moeslim.data import load_source, token_windows
from moeslim.data.calibration_set import CalibrationSet, build_calibration_set
from moeslim.evaluate.perplexity import perplexity
from moeslim.methods.quant.driver import QuantizeConfig, plan_quantize, pmq_factors
from moeslim.runtime.lowbit_io import save_quantized


@dataclass
class Row:
    name: str
    avg_bits: float
    avg_bits_overhead: float
    ppl: dict[str, float]
    disk_bytes: int
    seconds: float


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _ppl(model: nn.Module, windows: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    return {name: perplexity(model, w, batch_size, progress=False)["ppl"] for name, w in windows.items()}


def _float_row(name: str, model: nn.Module, windows: dict[str, torch.Tensor], batch_size: int) -> Row:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = _dir_bytes(Path(tmp))
    bits = 32.0 if next(model.parameters()).dtype == torch.float32 else 16.0
    ppl = _ppl(model, windows, batch_size)
    return Row(name, bits, bits, ppl, size, time.perf_counter() - start)


def _quant_row(name: str, base: nn.Module, calib: CalibrationSet, config: QuantizeConfig,
               windows: dict[str, torch.Tensor], batch_size: int, factors: dict | None = None) -> Row:
    start = time.perf_counter()
    model = copy.deepcopy(base)
    apply(model, plan_quantize(model, calib, config, "bench", factors=factors), calibration=calib)
    section = model.config.moeslim["quantize"]
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(model, tmp)
        size = _dir_bytes(Path(tmp))
    ppl = _ppl(model, windows, batch_size)
    return Row(name, section["avg_bits"], section["avg_bits_with_overhead"], ppl, size, time.perf_counter() - start)


def _load(args: argparse.Namespace) -> tuple[nn.Module, CalibrationSet, dict[str, torch.Tensor]]:
    return _load_model(args, args.model)


def _model_path(name: str) -> str:
    """A folder or hub id: 'fine' is the bundled 64-expert demo model, 'demo' the 8-expert one."""
    from moeslim._package import assets_dir
    from moeslim.models import resolve_model_path

    return str(assets_dir() / "demo-fine") if name == "fine" else str(resolve_model_path(name))


def _load_model(args: argparse.Namespace, name: str) -> tuple[nn.Module, CalibrationSet, dict[str, torch.Tensor]]:
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import VOCAB, tiny_model

        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, VOCAB, (args.calib_samples, args.seq_len), generator=gen)
        windows = {"random": torch.randint(3, VOCAB, (args.windows, args.seq_len), generator=gen)}
        return tiny_model("mixtral"), CalibrationSet(ids, "random", "tiny"), windows
    from moeslim.models import load_model

    model, tok = load_model(_model_path(name))
    calib = build_calibration_set(CalibrationConfig(samples=args.calib_samples, seq_len=args.seq_len), tok)
    windows = {
        domain: token_windows(load_source(f"demo:{domain}:test"), tok, args.seq_len, args.windows)
        for domain in ("code", "prose")
    }
    return model, calib, windows


def _table(rows: list[Row], domains: list[str]) -> str:
    head = "| model | code bits | bits incl. scales/zeros | " + " | ".join(f"ppl {d}" for d in domains)
    head += " | disk MiB | s |"
    lines = [head, "|" + "---|" * (5 + len(domains))]
    for r in rows:
        ppl = " | ".join(f"{r.ppl[d]:.3f}" for d in domains)
        lines.append(f"| {r.name} | {r.avg_bits:.2f} | {r.avg_bits_overhead:.2f} | {ppl} | "
                     f"{r.disk_bytes / 2**20:.2f} | {r.seconds:.0f} |")
    return "\n".join(lines)


def _mean_log_ppl(row: Row) -> float:
    return sum(math.log(v) for v in row.ppl.values()) / len(row.ppl)


def _verdicts(rows: dict[str, Row], budgets: list[float]) -> list[str]:
    """One line per comparison at equal budget, winner named whatever it is."""
    out = []
    for b in budgets:
        pmq = rows[f"pmq {b:g}"]
        rivals = [rows[f"random {b:g}"]]
        if float(b).is_integer() and f"uniform {int(b)}" in rows:
            rivals.append(rows[f"uniform {int(b)}"])
        for rival in rivals:
            gap = math.exp(_mean_log_ppl(pmq)) / math.exp(_mean_log_ppl(rival))
            verdict = "PMQ better" if gap < 1 else "PMQ NOT better"
            out.append(f"- {b:g} bits: {pmq.name} vs {rival.name}: geometric-mean ppl ratio {gap:.3f} -> {verdict}")
    return out


# -- symmetric 4-bit vs llm-compressor (--sym4) ---------------------------------------------------------------

def _ct_experts_into(model: nn.Module, folder: Path) -> int:
    """Write the experts of a compressed-tensors folder (per-expert Linear names, as llm-compressor saves them)
    into ``model``'s fused expert tensors, decompressed by compressed-tensors itself; returns how many matrices.

    transformers 5.24 does not load llm-compressor's Mixtral folder (it saves linearized ``gate_proj``/``up_proj``
    names where Mixtral's loader expects ``w1``/``w3``), so the experts are read here; every other tensor is the
    base model's (llm-compressor quantized the experts only).
    """
    import re

    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from moeslim.models import find_moe_layers
    from moeslim.models.expert_math import expert_weight_views

    config = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config.format)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    key = re.compile(r"^model\.layers\.(\d+)\..*experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight_packed$")
    found: dict[tuple[int, int, str], torch.Tensor] = {}
    for name in tensors:
        m = key.match(name)
        if m:
            prefix = name.removesuffix("weight_packed")
            local = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(m.group(3), m.group(3))
            found[(int(m.group(1)), int(m.group(2)), proj)] = compressor.decompress(local, scheme)["weight"]
    with torch.no_grad():
        for layer in find_moe_layers(model):
            views = expert_weight_views(layer)
            for e in range(layer.num_experts):
                gate, up, down = (found.pop((layer.layer_idx, e, p)) for p in ("gate_proj", "up_proj", "down_proj"))
                views.up[e].copy_(torch.cat([gate, up]).to(views.up.dtype))
                views.down[e].copy_(down.to(views.down.dtype))
    if found:
        raise RuntimeError(f"experts left over: {sorted(found)[:4]}")
    return sum(1 for k in tensors if k.endswith("weight_packed"))


def _llmcompressor_row(python: str, name: str, base: nn.Module, calib: CalibrationSet, group: int,
                       windows: dict[str, torch.Tensor], batch_size: int, work: Path, done: Path | None) -> Row:
    """llm-compressor's folder for these windows: made by its venv's ``python``, or ``done`` (made earlier by
    benchmarks/llmcompressor_gptq.py on the same windows, checked by their hash)."""
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    if done is not None:
        if not torch.equal(load_file(str(done / "calib.safetensors"))["input_ids"], calib.input_ids):
            raise SystemExit(f"{done} was calibrated on other windows")
        out = done
    else:
        work.mkdir(parents=True, exist_ok=True)
        ids = work / "calib.safetensors"
        save_file({"input_ids": calib.input_ids.contiguous()}, str(ids))
        out = work / "llmcompressor"
        script = Path(__file__).resolve().parent / "llmcompressor_gptq.py"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own venv, not moeslim's packages
        subprocess.run([python, str(script), "--model", _model_path(name), "--calib", str(ids), "--group-size",
                        str(group), "--out", str(out)], check=True, env=env)
    model = copy.deepcopy(base)
    count = _ct_experts_into(model, out)
    size = _dir_bytes(out)
    ppl = _ppl(model, windows, batch_size)
    print(f"llm-compressor: {count} packed expert matrices, {size / 2**20:.2f} MiB", flush=True)
    return Row("llm-compressor GPTQ W4A16", 4.0, 4.0 + 16 / group, ppl, size, time.perf_counter() - start)


MATCHED = "moeslim GPTQ W4A16 symmetric, act-order, all experts"  # llm-compressor's GPTQ defaults


def _ratio(a: Row, b: Row) -> float:
    return math.exp(_mean_log_ppl(a) - _mean_log_ppl(b))


def _write_sym4(args: argparse.Namespace, group: int, sections: list[str], finals: list[str]) -> None:
    text = "\n".join([
        "# Symmetric 4-bit expert GPTQ: moeslim vs llm-compressor",
        "",
        f"Experts only, uniform 4 bits, groups of {group}, damping 0.01, calibration {args.calib_samples} x "
        f"{args.seq_len} tokens (the same windows for both tools), held-out ppl on {args.windows} windows of "
        f"{args.seq_len} tokens per domain, all evaluated by moeslim.evaluate.perplexity in float32. "
        "llm-compressor: GPTQModifier defaults (act-order static, every expert calibrated on all tokens) with a "
        "symmetric int4 group scheme on the expert projections, run in its own venv; bits incl. scales count "
        "float16 scales.",
        "",
        *sections,
        "",
        *finals,
        "",
    ])
    print(text, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", flush=True)


def _sym4(args: argparse.Namespace) -> int:
    group = args.group_size
    sections, finals = [], []
    for name in args.model.split(","):
        base, calib, windows = _load_model(args, name)
        rows: dict[str, Row] = {"FP32": _float_row("FP32", base, windows, args.batch_size)}
        common = {"method": "uniform", "bits": 4, "group_size": group, "batch_size": args.batch_size}
        variants = {
            "moeslim GPTQ 4-bit asymmetric (5 bits stored)": {},
            "moeslim GPTQ W4A16 symmetric": {"symmetric": True},
            MATCHED: {"symmetric": True, "act_order": True, "calibrate_all_experts": True},
        }
        for label, extra in variants.items():
            if args.sym4_rows != "all" and extra != variants[MATCHED]:
                continue
            rows[label] = _quant_row(label, base, calib, QuantizeConfig(**common, **extra), windows, args.batch_size)
            print(f"done {name}: {label}", flush=True)
        done = dict(item.split("=", 1) for item in args.llmcompressor_done).get(name)
        if args.llmcompressor_python or done:
            with tempfile.TemporaryDirectory() as tmp:
                rows["llmc"] = _llmcompressor_row(args.llmcompressor_python, name, base, calib, group, windows,
                                                  args.batch_size, Path(tmp), Path(done) if done else None)
        domains = list(windows)
        lines = [f"## {name}", "", _table(list(rows.values()), domains), ""]
        if "llmc" in rows:
            ours = rows[MATCHED]
            for label, row in rows.items():
                if label.startswith("moeslim"):
                    ratio = _ratio(row, rows["llmc"])
                    lines.append(f"- {label} / llm-compressor: geometric-mean ppl ratio {ratio:.4f}")
            finals.append(f"quant sym4 ppl ratio moeslim-vs-llmcompressor: {_ratio(ours, rows['llmc']):.4f} ({name})")
        else:
            finals.append(f"quant sym4 ppl ratio moeslim-vs-llmcompressor: not measured ({name}: no "
                          "--llmcompressor-python)")
        sections.append("\n".join(lines))
        _write_sym4(args, group, sections, finals)  # after each model: a long run keeps what it measured
    for line in finals:
        print(line)
    return 0


# -- engine scope: one width per layer vs per expert (--granularity) -------------------------------------------

def _granularity(args: argparse.Namespace) -> int:
    candidates = tuple(int(c) for c in args.candidates.split(","))
    budgets = [float(b) for b in args.budgets.split(",")]
    common = {"group_size": args.group_size, "batch_size": args.batch_size, "symmetric": True}
    variants = {
        "expert": ("pmq per expert, budget per layer (paper)", {"scope": "layer"}),
        "expert-global": ("pmq per expert, model budget", {"scope": "global"}),
        "layer": ("pmq one width per layer, model budget (engine scope)", {"scope": "global", "granularity": "layer"}),
    }
    sections, finals = [], []
    for name in args.model.split(","):
        base, calib, windows = _load_model(args, name)
        rows: dict[str, Row] = {"FP32": _float_row("FP32", base, windows, args.batch_size)}
        # One factor pass serves every PMQ row (the factors do not depend on budget, scope or granularity).
        factors = pmq_factors(base, calib.input_ids, QuantizeConfig(candidates=candidates, **common))
        notes = []
        for budget in budgets:
            if budget.is_integer():
                config = QuantizeConfig(method="uniform", bits=int(budget), **common)
                rows[f"uniform {budget:g}"] = _quant_row(f"uniform {int(budget)}", base, calib, config, windows,
                                                         args.batch_size)
            for key, (label, extra) in variants.items():
                config = QuantizeConfig(method="pmq", bits=budget, candidates=candidates, **common, **extra)
                rows[f"{key} {budget:g}"] = _quant_row(f"{label} {budget:g}", base, calib, config, windows,
                                                       args.batch_size, factors)
                print(f"done {name}: {label} {budget:g}", flush=True)
            tied = plan_quantize(base, calib, QuantizeConfig(method="pmq", bits=budget, candidates=candidates,
                                                             **common, **variants["layer"][1]), factors=factors)
            layer = rows[f"layer {budget:g}"]
            notes.append(f"- {budget:g} bits, engine scope widths per layer: "
                         f"{[tied.layers[i]['bits'][0] for i in sorted(tied.layers)]}")
            for rival in (f"expert-global {budget:g}", f"expert {budget:g}", f"uniform {budget:g}"):
                if rival in rows:
                    notes.append(f"- {layer.name} / {rows[rival].name}: geometric-mean ppl ratio "
                                 f"{_ratio(layer, rows[rival]):.4f}")
            finals.append(f"quant granularity ppl ratio layer-vs-expert: "
                          f"{_ratio(layer, rows[f'expert-global {budget:g}']):.4f} ({name}, {budget:g} bits)")
        sections.append("\n".join([f"## {name}", "", _table(list(rows.values()), list(windows)), "", *notes, ""]))
        text = "\n".join([
            "# What the engine scope costs: PMQ one width per MoE layer vs per expert, equal bits",
            "",
            f"Symmetric GPTQ of the experts, groups of {args.group_size}, damping 0.01, PMQ candidates "
            f"{list(candidates)}, calibration {args.calib_samples} x {args.seq_len} tokens, held-out ppl on "
            f"{args.windows} windows of {args.seq_len} tokens per domain. The engine-scope rows are what "
            "compressed-tensors export writes as one config group per width (vLLM: one scheme per fused-MoE layer); "
            "per-expert rows run in moeslim's own runtime only. The ratio lines compare the engine scope with "
            "per-expert PMQ under the same model-wide budget (the same program, untied).",
            "",
            *sections,
            *finals,
            "",
        ])
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)  # after each model: a long run keeps what it measured
    print(text, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tiny", action="store_true", help="random tiny Mixtral, random tokens (mechanics only)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=32, help="held-out windows per domain")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--candidates", default="1,2,3,4", help="PMQ/random widths (paper: 1,2,3)")
    parser.add_argument("--budgets", default="2.0,2.5,3.0")
    parser.add_argument("--uniform", default="2,3,4")
    parser.add_argument("--cost", default="paper", choices=["paper", "authors"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="docs/results-quant.md")
    parser.add_argument("--sym4", action="store_true",
                        help="only the symmetric 4-bit comparison with llm-compressor (--model may list several, "
                             "'fine' = the 64-expert demo model); group size 64 unless --group-size")
    parser.add_argument("--llmcompressor-python", default=None,
                        help="python of a venv with llmcompressor installed (runs benchmarks/llmcompressor_gptq.py)")
    parser.add_argument("--llmcompressor-done", action="append", default=[], metavar="MODEL=DIR",
                        help="reuse llm-compressor's folder for MODEL (its calib.safetensors must be these windows)")
    parser.add_argument("--sym4-rows", default="all", choices=["all", "matched"],
                        help="matched: only moeslim with llm-compressor's settings (act-order, all experts)")
    parser.add_argument("--granularity", action="store_true",
                        help="only PMQ per expert vs one width per layer at each of --budgets (symmetric grids)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sym4:
        if "--group-size" not in (argv if argv is not None else sys.argv):
            args.group_size = 64
        return _sym4(args)
    if args.tiny:
        args.seq_len, args.calib_samples, args.windows = min(args.seq_len, 32), min(args.calib_samples, 8), 4
        args.group_size = min(args.group_size, 16)
    if args.granularity:
        return _granularity(args)
    candidates = tuple(int(c) for c in args.candidates.split(","))
    budgets = [float(b) for b in args.budgets.split(",")]
    common = {"group_size": args.group_size, "batch_size": args.batch_size}

    base, calib, windows = _load(args)
    rows: dict[str, Row] = {}
    rows["FP32"] = _float_row("FP32", base, windows, args.batch_size)
    rows["BF16"] = _float_row("BF16", copy.deepcopy(base).to(torch.bfloat16), windows, args.batch_size)
    for b in (int(u) for u in args.uniform.split(",")):
        rows[f"uniform {b}"] = _quant_row(f"uniform {b}", base, calib,
                                          QuantizeConfig(method="uniform", bits=b, **common), windows, args.batch_size)
        print(f"done uniform {b}", flush=True)
    # The PMQ factors do not depend on the budget: one calibration pass serves every PMQ row.
    factors = pmq_factors(base, calib.input_ids, QuantizeConfig(candidates=candidates, **common))
    for b in budgets:
        for method in ("pmq", "random"):
            config = QuantizeConfig(method=method, bits=b, candidates=candidates, cost=args.cost, **common)
            rows[f"{method} {b:g}"] = _quant_row(f"{method} {b:g}", base, calib, config, windows, args.batch_size,
                                                 factors if method == "pmq" else None)
            print(f"done {method} {b:g}", flush=True)

    domains = list(windows)
    text = "\n".join([
        f"# Expert quantization quality ({'tiny random model' if args.tiny else args.model})",
        "",
        f"GPTQ (group {args.group_size}, asymmetric, damp 0.01), calibration {calib.input_ids.shape[0]} x "
        f"{calib.input_ids.shape[1]} tokens of {calib.name}; PMQ/random candidates {list(candidates)}, "
        f"cost {args.cost}; held-out ppl on {args.windows} windows of {args.seq_len} tokens per domain. "
        "Bits are per expert weight; attention, router and embeddings stay at the checkpoint's precision "
        "(disk size includes them, FP32 here).",
        "",
        _table(list(rows.values()), domains),
        "",
        "Equal-budget comparisons:",
        *_verdicts(rows, budgets),
        "",
    ])
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
