"""moeslim's GGUF exports inside llama.cpp: perplexity and decode speed against llama.cpp's own quantizer.

    python benchmarks/engines.py [--work runs/engines] [--models demo] [--threads 2] [--families all]
        [--top-k K] [--presets Q3_K_M|'']

1. Makes its OWN virtual environment (``WORK/venv``) and pip-installs llama-cpp-python there, built from source
   (its sdist's CMake project, configured with llama.cpp's tools; only the library, ``llama-quantize`` and
   ``llama-imatrix`` are compiled, in ``WORK/build``); an existing working one is reused. llama-cpp-python is not
   a moeslim dependency. A failed build stops with its exact error lines.
2. Per model: moeslim writes the original as F16 GGUF (and checks llama.cpp's logits against transformers'),
   an importance matrix is computed by ``llama-imatrix`` on moeslim's calibration text, and ``llama-quantize``
   makes the presets Q2_K, Q3_K_M, Q4_K_M without and with it. moeslim's per-tensor PMQ (``--scope gguf``) gets
   each preset's expert bytes as its budget (the rest of the file as the preset has it, so both files have the
   same size up to rounding) and is quantized by the same ``llama-quantize`` with one type per expert tensor.
   A moeslim-pruned model (exact enumeration, keeping half the experts) is exported as F16.
3. Every file runs in llama.cpp (llama-cpp-python, in a worker process of that venv): perplexity on the
   bundled test splits with moeslim's own token windows (so tokenisation is identical), and decode tokens/s.

4. ``--families all`` (or a comma list of model types): per exported family a tiny model's original, pruned
   (frequency, half the experts) and PMQ-typed (``--scope gguf``) files in llama.cpp (logits against transformers,
   perplexity, decode ratios), the F32 logits lines of gguf_logits.py (also non-uniformly pruned, padded, for the
   routers that hold padding) and the real vocabularies' tokenization lines of gguf_tokenization.py (``.inp`` ->
   ``.out`` through our file; ``--llama-cpp DIR``, default the source vendored in WORK/src).
5. ``--top-k K``: each model also written with a reduced top-k (expert_used_count K) and run against its own file:
   its logits against transformers at top-K, perplexity and decode in alternating rounds. ``--presets ""`` skips
   step 2.

Ends with:
    engines gguf ppl ratio pmq-vs-preset at Q3_K_M size: X.XX   (both with the importance matrix)
    engines gguf decode ratio pruned-vs-original: X.XX
    engines family FAM (ARCH): logits max |diff| ...; ppl ...; decode ...     (--families, one per family)
    gguf logits [nonuniform ]FAM: max |diff| ...   /   gguf tokenization VOCAB: N/M texts equal ...
    engines gguf decode ratio topK-vs-topk0 MODEL: X.XX   /   engines gguf ppl ratio topK-vs-topk0 MODEL: X.XXXX
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llama_env import ensure_llama_env

PRESETS = ("Q2_K", "Q3_K_M", "Q4_K_M")
PMQ_CANDIDATES = (2, 3, 4, 5, 6, 8)

# -- the worker: runs in the llama.cpp venv (llama_cpp + numpy only) ----------------------------------------

def worker(job_path: str) -> None:
    """Perplexity over token windows and decode tokens/s of one GGUF file; writes JSON beside the job."""
    import numpy as np
    from llama_cpp import Llama

    job = json.loads(Path(job_path).read_text())
    if "paired" in job:
        Path(job["result"]).write_text(json.dumps(_paired_decode(job)))
        return
    windows: list[list[int]] = job["windows"]
    n_ctx = len(windows[0])
    llm = Llama(model_path=job["model"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_threads=job["threads"], verbose=False, seed=0)
    nll, count, first_logits = 0.0, 0, None
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)  # (L, V)
        if first_logits is None:
            first_logits = logits[: job.get("compare_tokens", 8)].tolist()
        shifted = logits[:-1]
        logz = np.log(np.exp(shifted - shifted.max(axis=1, keepdims=True)).sum(axis=1)) + shifted.max(axis=1)
        nll += float((logz - shifted[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    del llm
    dec = Llama(model_path=job["model"], n_ctx=n_ctx, n_threads=job["threads"], verbose=False, seed=0)
    prompt = windows[0][: job["prompt_tokens"]]
    steps = job["decode_tokens"]
    rates = []
    for _ in range(job["repeats"]):
        dec.reset()
        dec.eval(prompt)
        token = int(np.argmax(dec.eval_logits[-1]))
        start = time.perf_counter()
        for _ in range(steps):
            dec.eval([token])
            token = int(np.argmax(dec.eval_logits[-1]))
        rates.append(steps / (time.perf_counter() - start))
    # best of the repeats: the machine is shared, and other processes only ever slow a run down
    result = {"ppl": float(np.exp(nll / count)), "tokens": count, "decode_tok_s": float(max(rates)),
              "decode_tok_s_median": float(np.median(rates)), "first_logits": first_logits}
    Path(job["result"]).write_text(json.dumps(result))


def _paired_decode(job: dict[str, Any]) -> dict[str, float]:
    """Decode tokens/s of several GGUF files timed in alternating rounds (best round each): on a shared machine
    a slow spell then hits every file alike instead of whichever happened to run during it."""
    import numpy as np
    from llama_cpp import Llama

    models = {path: Llama(model_path=path, n_ctx=len(job["prompt"]) + job["decode_tokens"] + 8,
                          n_threads=job["threads"], verbose=False, seed=0) for path in job["paired"]}
    best = dict.fromkeys(models, 0.0)
    for _ in range(job["rounds"]):
        for path, llm in models.items():
            llm.reset()
            llm.eval(job["prompt"])
            token = int(np.argmax(llm.eval_logits[-1]))
            start = time.perf_counter()
            for _ in range(job["decode_tokens"]):
                llm.eval([token])
                token = int(np.argmax(llm.eval_logits[-1]))
            best[path] = max(best[path], job["decode_tokens"] / (time.perf_counter() - start))
    return best


def paired_decode(python: Path, files: list[Path], prompt: list[int], work: Path, args: argparse.Namespace
                  ) -> dict[str, float]:
    job, result = work / "paired.job.json", work / "paired.result.json"
    job.write_text(json.dumps({"paired": [str(f) for f in files], "prompt": prompt, "threads": args.threads,
                               "decode_tokens": args.decode_tokens, "rounds": args.rounds, "result": str(result)}))
    proc = subprocess.run([str(python), __file__, "--worker", str(job)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp paired decode failed:\n{proc.stderr[-3000:]}")
    return {Path(k).name: v for k, v in json.loads(result.read_text()).items()}


def run_llama(python: Path, model: Path, windows: list[list[int]], work: Path, args: argparse.Namespace,
              compare_tokens: int = 0) -> dict[str, Any]:
    job = work / f"{model.stem}.job.json"
    result = work / f"{model.stem}.result.json"
    job.write_text(json.dumps({"model": str(model), "windows": windows, "threads": args.threads,
                               "prompt_tokens": 16, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
                               "compare_tokens": compare_tokens, "result": str(result)}))
    proc = subprocess.run([str(python), __file__, "--worker", str(job)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp worker failed on {model}:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


# -- quantizing -------------------------------------------------------------------------------------------

def _quantize(binary: Path, src: Path, dst: Path, ftype: str, imatrix: Path | None) -> None:
    cmd = [str(binary)] + (["--imatrix", str(imatrix)] if imatrix else []) + [str(src), str(dst), ftype]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def _imatrix(binary: Path, f16: Path, text: Path, out: Path, seq_len: int, threads: int) -> None:
    cmd = [str(binary), "-m", str(f16), "-f", str(text), "-o", str(out), "-c", str(seq_len), "-t", str(threads),
           "--no-ppl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stderr or proc.stdout)[-2000:]}")


def _expert_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the ffn_*_exps tensors, bytes of all tensors) of a GGUF file."""
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    return sum(int(t.n_bytes) for t in tensors if "_exps." in t.name), sum(int(t.n_bytes) for t in tensors)


def _types(path: Path) -> dict[str, int]:
    from moeslim.export import read_gguf_types

    counts: dict[str, int] = {}
    for name, qtype in read_gguf_types(path).items():
        if "_exps." in name:
            counts[qtype] = counts.get(qtype, 0) + 1
    return dict(sorted(counts.items()))


# -- one model ----------------------------------------------------------------------------------------------

def bench_model(name: str, tools: tuple[Path, Path, Path], work: Path, args: argparse.Namespace
                ) -> list[dict[str, Any]]:
    import torch

    from moeslim.config import DEFAULT_CALIBRATION_DATA, CalibrationConfig
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.data.sources import load_source
    from moeslim.data.windows import token_windows
    from moeslim.export import export_gguf
    from moeslim.methods.prune.config import PruneConfig
    from moeslim.methods.prune.driver import plan_prune
    from moeslim.methods.quant.config import QuantizeConfig
    from moeslim.methods.quant.gguf_types import gguf_tensor_factors, plan_gguf_types
    from moeslim.models import find_moe_layers, load_model, select_experts

    python, quantize, imatrix_bin = tools
    out = work / name.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(name)
    seq_len = min(args.seq_len, int(model.config.max_position_embeddings))
    windows = torch.cat([token_windows(load_source(src), tokenizer, seq_len, num_samples=args.windows, seed=0)
                         for src in ("demo:code:test", "demo:prose:test")])
    win = windows.tolist()
    calib = build_calibration_set(CalibrationConfig(data=DEFAULT_CALIBRATION_DATA, samples=args.calib_samples,
                                                    seq_len=seq_len), tokenizer)
    rows: list[dict[str, Any]] = []

    def measure(label: str, path: Path, compare: int = 0) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = run_llama(python, path, win, out, args, compare)
        row = {"model": name, "variant": label, "file_mib": path.stat().st_size / 2**20, "ppl": res["ppl"],
               "decode_tok_s": res["decode_tok_s"], "expert_types": _types(path), "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"  {label:28s} {row['file_mib']:7.2f} MiB  ppl {row['ppl']:8.3f}  decode {row['decode_tok_s']:7.1f} "
              f"tok/s  experts {row['expert_types']}", flush=True)
        return res

    f16 = out / "f16.gguf"
    export_gguf(model, tokenizer, f16, qtype="F16")
    res = measure("original F16", f16, compare=8)
    with torch.no_grad():
        ref = model(windows[:1]).logits[0, :8].double()
    diff = float((torch.tensor(res["first_logits"], dtype=torch.float64) - ref).abs().max())
    rows[-1]["max_logit_diff_vs_transformers"] = diff
    print(f"  llama.cpp F16 vs transformers logits: max |diff| {diff:.4f} (F16 weights)", flush=True)

    text = out / "calibration.txt"
    text.write_text("\n".join(tokenizer.decode(w) for w in calib.input_ids.tolist()))
    imat = out / "imatrix.gguf"
    if not imat.is_file():  # depends only on the model and the calibration text (rerun: delete the file)
        _imatrix(imatrix_bin, f16, text, imat, seq_len, args.threads)

    n_weights = sum(3 * int(layer.experts.down_proj.numel()) for layer in find_moe_layers(model))
    factors = None
    for preset in args.presets.split(","):
        for use_imatrix in (False, True):
            tag = f"{preset}{' +imatrix' if use_imatrix else ''}"
            preset_file = out / f"{preset}{'-imat' if use_imatrix else ''}.gguf"
            _quantize(quantize, f16, preset_file, preset, imat if use_imatrix else None)
            measure(f"llama.cpp {tag}", preset_file)
            expert_bytes, _ = _expert_bytes(preset_file)
            bits = expert_bytes * 8 / n_weights
            config = QuantizeConfig(scope="gguf", bits=bits, candidates=PMQ_CANDIDATES, batch_size=4)
            if factors is None:  # the factors do not depend on the budget: measured once per model
                factors = gguf_tensor_factors(model, calib.input_ids, config)
            plan = plan_gguf_types(model, calib, config, model_name=name, factors=factors)
            pmq_file = out / f"pmq-{preset}{'-imat' if use_imatrix else ''}.gguf"
            export_gguf(model, tokenizer, pmq_file, qtype=preset, plan=plan, llama_quantize=quantize,
                        imatrix=imat if use_imatrix else None)
            measure(f"moeslim PMQ @{tag} size", pmq_file)
            rows[-1]["target_bits"] = bits

    layer = find_moe_layers(model)[0]
    keep = max(layer.top_k, layer.num_experts // 2)
    method = "enumerate" if math.comb(layer.num_experts, keep) <= 20_000 else "search"  # exact where affordable
    plan = plan_prune(model, calib, PruneConfig(keep=keep, method=method), model_name=name)
    pruned, _ = load_model(name)
    select_experts(pruned, {idx: list(kept) for idx, kept in plan.layers.items()})
    pruned_file = out / f"pruned-keep{keep}-f16.gguf"
    export_gguf(pruned, tokenizer, pruned_file, qtype="F16")
    measure(f"moeslim pruned keep {keep} ({method}) F16", pruned_file)
    paired = paired_decode(python, [f16, pruned_file], win[0][:16], out, args)
    for row, file in ((rows[0], f16), (rows[-1], pruned_file)):
        row["paired_decode_tok_s"] = paired[file.name]
    print(f"  paired decode (alternating rounds, best): original {paired[f16.name]:.1f} tok/s, pruned "
          f"{paired[pruned_file.name]:.1f} tok/s", flush=True)
    return rows


# -- every exported family: tiny models, real vocabularies ---------------------------------------------------

def _tiny_family(family: str, vocab: int) -> Any:
    """A tiny seeded model of ``family`` llama.cpp runs (the changes gguf_logits.RUNNABLE names)."""
    import torch
    from gguf_logits import RUNNABLE
    from tiny_models import _reinit, tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, vocab)
    for key, value in RUNNABLE.get(family, {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _reinit(model, 0)
    return model.eval()


def bench_family(family: str, tools: tuple[Path, Path, Path], work: Path, args: argparse.Namespace) -> str:
    """Original, pruned and PMQ-typed files of one family's tiny model in llama.cpp: logits against transformers
    (F16 files), perplexity over byte-level BPE windows of the bundled test text, decode ratios (alternating
    rounds). Random weights: the perplexities show the files run, not quality."""
    import torch
    from tiny_tokenizers import byte_level_bpe

    from moeslim.data.sources import load_source
    from moeslim.data.windows import token_windows
    from moeslim.export import GGUF_FAMILIES, export_gguf
    from moeslim.methods.prune.config import PruneConfig
    from moeslim.methods.prune.driver import plan_prune
    from moeslim.methods.quant.config import QuantizeConfig
    from moeslim.methods.quant.gguf_types import plan_gguf_types
    from moeslim.models import find_moe_layers, select_experts

    python = tools[0]
    out = work / "families" / family
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_bpe("gpt2")
    model = _tiny_family(family, len(tokenizer))
    seq = 64
    windows = torch.cat([token_windows(load_source(src), tokenizer, seq, num_samples=args.family_windows, seed=0)
                         for src in ("demo:code:test", "demo:prose:test")])
    calib = token_windows(load_source("demo:code:calibration"), tokenizer, seq, num_samples=8, seed=0)
    layer = find_moe_layers(model)[0]
    keep = max(layer.top_k, layer.num_experts // 2)
    plan = plan_prune(model, calib, PruneConfig(keep=keep, method="frequency"), model_name=family)
    pruned = _tiny_family(family, len(tokenizer))
    select_experts(pruned, {idx: list(kept) for idx, kept in plan.layers.items()})
    types = plan_gguf_types(model, calib, QuantizeConfig(scope="gguf", bits=args.family_bits,
                                                         candidates=PMQ_CANDIDATES, batch_size=4),
                            model_name=family)
    files = {"original": out / "f16.gguf", "pruned": out / f"pruned-keep{keep}-f16.gguf", "pmq": out / "pmq.gguf"}
    for f in files.values():
        f.unlink(missing_ok=True)
    export_gguf(model, tokenizer, files["original"], qtype="F16")
    export_gguf(pruned, tokenizer, files["pruned"], qtype="F16")
    export_gguf(model, tokenizer, files["pmq"], qtype="Q8_0", plan=types)
    win = windows.tolist()
    res = {label: run_llama(python, f, win, out, args, compare_tokens=8) for label, f in files.items()}
    diffs = {}
    for label, m in (("original", model), ("pruned", pruned)):
        with torch.no_grad():
            ref = m(windows[:1]).logits[0, :8].double()
        diffs[label] = float((torch.tensor(res[label]["first_logits"], dtype=torch.float64) - ref).abs().max())
    paired = paired_decode(python, list(files.values()), win[0][:16], out, args)
    rate = {label: paired[f.name] for label, f in files.items()}
    pmq_types = _types(files["pmq"])
    return (f"engines family {family} ({GGUF_FAMILIES[family].name}): logits max |diff| F16 {diffs['original']:.1e}, "
            f"pruned keep {keep}/{layer.num_experts} {diffs['pruned']:.1e}; ppl original {res['original']['ppl']:.1f} "
            f"pruned {res['pruned']['ppl']:.1f} pmq {res['pmq']['ppl']:.1f} ({pmq_types}); decode "
            f"{rate['original']:.0f} tok/s, ratio pruned {rate['pruned'] / rate['original']:.2f} pmq "
            f"{rate['pmq'] / rate['original']:.2f}")


def bench_families(families: list[str], tools: tuple[Path, Path, Path], work: Path, args: argparse.Namespace
                   ) -> list[str]:
    """Per family: the tiny-model line of ``bench_family``, llama.cpp's F32 logits against transformers (original
    and, where the router holds padding, non-uniformly pruned), and per real vocabulary llama.cpp's tokenization of
    its ``.inp`` fixture through moeslim's file against the ``.out`` ids."""
    from gguf_logits import NONUNIFORM, logit_lines
    from gguf_tokenization import VOCABS, tokenization_lines

    lines = []
    for family in families:
        try:
            lines.append(bench_family(family, tools, work, args))
        except Exception as err:  # one family's failure is a result line, not the end of the run
            lines.append(f"engines family {family}: failed: {type(err).__name__}: {err}")
        print(lines[-1], flush=True)
    lines += logit_lines(tools[0], families, work / "logits")
    lines += logit_lines(tools[0], [f for f in families if f in NONUNIFORM], work / "logits", nonuniform=True)
    models = Path(args.llama_cpp or work / "src" / "vendor" / "llama.cpp") / "models"
    lines += tokenization_lines(tools[0], models, list(VOCABS), work / "tokenization")
    return lines


def bench_top_k(name: str, top_k: int, tools: tuple[Path, Path, Path], work: Path, args: argparse.Namespace
                ) -> list[str]:
    """A reduced top-k (``export_gguf(top_k=K)``: expert_used_count) against the model's own in llama.cpp:
    perplexity on the bundled test windows and decode in alternating rounds."""
    import torch

    from moeslim.data.sources import load_source
    from moeslim.data.windows import token_windows
    from moeslim.export import export_gguf
    from moeslim.models import find_moe_layers, load_model

    python = tools[0]
    out = work / name.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(name)
    seq_len = min(args.seq_len, int(model.config.max_position_embeddings))
    win = torch.cat([token_windows(load_source(src), tokenizer, seq_len, num_samples=args.windows, seed=0)
                     for src in ("demo:code:test", "demo:prose:test")]).tolist()
    full, reduced = out / "f16.gguf", out / f"top{top_k}-f16.gguf"
    for path, k in ((full, None), (reduced, top_k)):
        path.unlink(missing_ok=True)
        export_gguf(model, tokenizer, path, qtype="F16", top_k=k)
    k0 = int(find_moe_layers(model)[0].top_k)
    res = {path.name: run_llama(python, path, win, out, args, compare_tokens=8) for path in (full, reduced)}
    ppl = {name: r["ppl"] for name, r in res.items()}
    # the reference: transformers running the same model at top-K (config and every router's own top_k setting)
    model.config.num_experts_per_tok = top_k
    for layer in find_moe_layers(model):
        for owner in layer.routing_owners():
            if isinstance(getattr(owner, "top_k", None), int):
                owner.top_k = top_k
        assert layer.top_k == top_k, f"layer {layer.layer_idx} still routes top-{layer.top_k}"
    with torch.no_grad():
        ref = model(torch.tensor(win[:1])).logits[0, :8].double()
    diff = float((torch.tensor(res[reduced.name]["first_logits"], dtype=torch.float64) - ref).abs().max())
    print(f"  llama.cpp top-{top_k} file vs transformers at top-{top_k}: logits max |diff| {diff:.4f} (F16 weights)",
          flush=True)
    paired = paired_decode(python, [full, reduced], win[0][:16], out, args)
    label = Path(name).name
    print(f"  {label} top-{k0}: ppl {ppl[full.name]:.3f}, decode {paired[full.name]:.1f} tok/s; top-{top_k}: ppl "
          f"{ppl[reduced.name]:.3f}, decode {paired[reduced.name]:.1f} tok/s", flush=True)
    return [f"engines gguf decode ratio top{top_k}-vs-top{k0} {label}: {paired[reduced.name] / paired[full.name]:.2f}",
            f"engines gguf ppl ratio top{top_k}-vs-top{k0} {label}: {ppl[reduced.name] / ppl[full.name]:.4f}"]


def _value(rows: list[dict[str, Any]], variant: str, key: str) -> float:
    return next(float(r[key]) for r in rows if r["variant"] == variant)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", default="runs/engines", help="venv, build and outputs (default runs/engines)")
    parser.add_argument("--models", default="demo", help="comma-separated models (default demo)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help="llama.cpp presets ('' skips the presets, PMQ and pruning rows of --models)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=32, help="test windows per domain (code, prose)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps per timing")
    parser.add_argument("--repeats", type=int, default=5, help="decode timings per file (the best one counts)")
    parser.add_argument("--rounds", type=int, default=9, help="alternating decode rounds, original vs pruned")
    parser.add_argument("--families", default="", help="comma-separated model types (or 'all'): tiny models of "
                        "those families, original / pruned / PMQ-typed in llama.cpp, logits and real vocabularies")
    parser.add_argument("--family-windows", type=int, default=4, help="64-token test windows per domain (families)")
    parser.add_argument("--family-bits", type=float, default=5.0, help="PMQ budget of the families' expert tensors")
    parser.add_argument("--llama-cpp", default=None, help="llama.cpp source tree with models/ggml-vocab-*.gguf "
                        "(default: the one vendored in WORK/src)")
    parser.add_argument("--top-k", type=int, default=None, help="also run each model at this reduced top-k "
                        "(expert_used_count) against its own")
    parser.add_argument("--paired-decode", nargs="+", default=None, metavar="GGUF",
                        help="only time these files' decode in alternating rounds (needs the built venv)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    tools = ensure_llama_env(work)
    if args.paired_decode:
        from moeslim.data.sources import load_source
        from moeslim.data.windows import token_windows
        from moeslim.models import load_model

        _, tokenizer = load_model(args.models.split(",")[0])
        prompt = token_windows(load_source("demo:code:test"), tokenizer, 16, num_samples=1, seed=0)[0].tolist()
        rates = paired_decode(tools[0], [Path(f).resolve() for f in args.paired_decode], prompt, work, args)
        for name, rate in rates.items():
            print(f"{name}: {rate:.1f} tok/s (best of {args.rounds} alternating rounds)")
        return 0
    sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).resolve().parent)]
    summary: list[str] = []
    if args.families:
        from moeslim.export import GGUF_FAMILIES

        families = sorted(GGUF_FAMILIES) if args.families == "all" else args.families.split(",")
        summary += bench_families(families, tools, work, args)
    rows: list[dict[str, Any]] = []
    models = [m for m in args.models.split(",") if m]
    for name in models:
        print(f"model {name}", flush=True)
        if args.presets:
            rows += bench_model(name, tools, work, args)
        if args.top_k is not None:
            summary += bench_top_k(name, args.top_k, tools, work, args)
    if rows:
        names = "+".join(Path(m).name for m in models)
        (work / f"engines-{names}.json").write_text(json.dumps(rows, indent=1))
        first = [r for r in rows if r["model"] == rows[0]["model"]]
        if any(r["variant"] == "llama.cpp Q3_K_M +imatrix" for r in first):
            ppl = (_value(first, "moeslim PMQ @Q3_K_M +imatrix size", "ppl")
                   / _value(first, "llama.cpp Q3_K_M +imatrix", "ppl"))
            print(f"engines gguf ppl ratio pmq-vs-preset at Q3_K_M size: {ppl:.2f}")
        pruned = next(r for r in first if r["variant"].startswith("moeslim pruned"))
        decode = float(pruned["paired_decode_tok_s"]) / _value(first, "original F16", "paired_decode_tok_s")
        print(f"engines gguf decode ratio pruned-vs-original: {decode:.2f}")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
