"""Decode / prefill speed and resident bytes of packed low-bit experts vs the bf16 original, in one run.

Speed model: a random-weight Mixtral layout (hidden 2048, intermediate 5632, 8 experts, top-2, 4 layers,
16 heads / 4 KV heads, vocab 8192, bfloat16): 1.16 B parameters, 1.11 B of them routed experts (2.2 GB in
bf16), so the time is dominated by the expert matmuls, as in the real models. Random weights make the
quality meaningless and the speed representative, so experts are quantized with round-to-nearest (GPTQ
produces the same packed format and widths, hence the same speed), group 128.

Variants (each its own model, timed interleaved: every round runs each variant once, in a shuffled order;
medians over repeats):
original bf16; uniform 4-bit (int4pack kernel); uniform 8-bit (fused int8 decode kernel); PMQ 2.5-bit (in each
layer a random half of the experts at 3 bits, half at 2: the 2.5-bit average a PMQ allocation has; bit-plane
storage, fused decode kernel); PMQ 2.5-bit + skipping and bf16 + skipping, both with per-layer median beta (NAEE
top-2 rule, beta = median ratio of second to first routing weight on random tokens); pruned to 6 experts per
layer (bf16);
torchao int4 / int8 weight-only as peers where torchao is installed (they replace nn.Linear modules only:
attention and lm_head, the fused experts stay bf16).

Decode: greedy generation of 128 new tokens at batch 1 from an 8-token prompt, minus the 1-token run;
prefill: one forward over 512 tokens. Resident bytes: ``moeslim.evaluate.cost.param_bytes`` (every tensor
the model holds, each storage once). Fresh RSS: after timing, each variant is saved with ``moeslim.save``
(then dropped from memory) and loaded with ``moeslim.load`` in a fresh ``python -c`` interpreter, which prints
its peak RSS (``VmHWM`` of /proc/self/status, else ``ru_maxrss``: interpreter + imports + load peak) and
the loaded model's resident tensor bytes; the bare interpreter's RSS (same imports, no model) is printed for reference.

Demo shapes: the embedded demo model (8-expert Mixtral layout, hidden 256, intermediate 448: down_proj's 448
inputs are not a multiple of the group size 128) in bfloat16, against its own PMQ 2.5-bit (RTN, group 128, in
each layer a random half of the experts at 3 bits and half at 2) and its skipping variant (bf16, per-layer
median beta), timed the same way in its own interleaved rounds.

Load: the fresh-process peak RSS of loading PMQ 2.5-bit against the goal (its tensor bytes x 1.3 + the bare
interpreter); ``--load-only`` runs just that check (no timing).

The run ends with the summary lines of issue 23 (ratios against the bf16 original from this one run), and
``lowbit skip decode ratio over same model: X``: decode of bf16 + skipping over bf16 on the speed model (with
``pmq-2.5bit+skip`` timed, also over PMQ 2.5-bit: NAEE skipping against the same model without it).
``--variants`` limits the speed model's variants (the original is always timed; ``--variants
uniform-4bit pmq-2.5bit`` is the short run that still prints every summary line). ``--skip-only`` times just
the original and bf16 + skipping (plus pmq-2.5bit and pmq-2.5bit+skip when ``--variants`` names
``pmq-2.5bit+skip``) and the demo model's bf16 and skipping variants in one interleaved run, with no fresh loads,
and prints the skip lines only.

``--demo-only`` times just the demo model's three variants (a few minutes) and prints its table and the two
``lowbit demo decode ratio`` lines.

``--model demo-fine`` times just the embedded fine-grained demo model (Qwen3-MoE, 64 experts of 256 x 80, top-8)
against its demo row rtn-3 (uniform 3-bit, round-to-nearest, group 128: down_proj's 80 inputs are one group of
80), in the demo's dtype (float32; ``--dtype bfloat16`` for bf16), from a prompt of 8 tokens (``--prompt-tokens
128``: the demo table's), interleaved, and prints its table, the cold ``torch.compile`` graphs the timed runs made,
and ``lowbit demo-fine decode ratio rtn-3bit: X``.

Run: OMP_NUM_THREADS=2 python benchmarks/lowbit_speed.py [--repeats 5] [--layers 4] [--variants ...]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.evaluate.cost import param_bytes
from moeslim.methods.quant.fused import KEEP_BITS, LowBitTensor
from moeslim.methods.quant.gptq import rtn_quantize
from moeslim.methods.skip.thresholds import calibrate_beta, sorted_desc
from moeslim.models import find_moe_layers, select_experts
from moeslim.models.expert_math import expert_weight_views
from moeslim.models.loading import load_model
from moeslim.runtime.lowbit_io import install_lowbit
from moeslim.runtime.packed import fast_pack
from moeslim.runtime.skipping import install_skipping, reset_counters


def speed_model(layers: int, seed: int = 0) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=2048, intermediate_size=5632, num_local_experts=8, num_experts_per_tok=2,
                           num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                           vocab_size=8192, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = MixtralForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # bf16 directly: no float32 copy of 1 B parameters
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02))
        model.model.rotary_emb.to_empty(device="cpu")
        model._init_weights(model.model.rotary_emb)
    return model.to(torch.bfloat16).eval()


def rtn_fused(w: torch.Tensor, bits: list[int], transposed: bool) -> LowBitTensor:
    """``quantize_fused(..., method="rtn")`` with the fast byte packer (same format; saves minutes here)."""
    n = w.shape[0]
    out = LowBitTensor((n, w.shape[1], w.shape[2]), bits, 128, transposed, w.dtype, [None] * n, [None] * n,
                       [None] * n, [None] * n)
    for e, b in enumerate(bits):
        if b == KEEP_BITS:
            out.dense[e] = w[e].detach().clone()
            continue
        W = w[e].detach().float()
        q = rtn_quantize(W.T if transposed else W, b, 128, scale_dtype=torch.float16)
        out.codes[e], out.scales[e], out.zeros[e] = fast_pack(q.codes, b), q.scales.half(), fast_pack(q.zeros, b)
    return out


def quantize_experts(model: nn.Module, widths: Callable[[int, int], int]) -> nn.Module:
    """RTN-quantize every expert at widths(layer, expert), group 128, into packed storage."""
    for layer in find_moe_layers(model):
        views = expert_weight_views(layer)
        bits = [widths(layer.layer_idx, e) for e in range(layer.num_experts)]
        for name, w in ((views.up_name, views.up), (views.down_name, views.down)):
            install_lowbit(layer.experts, name, rtn_fused(w, bits, views.transposed))
    model.config.moeslim = {"quantize": {"group_size": 128}}  # what moeslim.load needs to rebuild the experts
    return model


def median_betas(model: nn.Module, ids: torch.Tensor) -> dict[int, float]:
    """Per-layer median of w2 / w1 (NAEE's beta at quantile 0.5) from the routing of ``ids``."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for layer in find_moe_layers(model):
        def hook(_m: nn.Module, args: tuple[Any, ...], idx: int = layer.layer_idx) -> None:
            seen.setdefault(idx, []).append(args[2].detach().float())

        handles.append(layer.experts.register_forward_pre_hook(hook))
    with torch.inference_mode():
        model(ids)
    for h in handles:
        h.remove()
    return {idx: calibrate_beta(sorted_desc(torch.cat(w)), "top2", 0.5) for idx, w in seen.items()}


def torchao_variant(model: nn.Module, kind: str) -> nn.Module | str:
    """A torchao weight-only copy, or the reason it is not available."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as exc:  # noqa: BLE001 - not installed / incompatible build: report and go on
        return f"torchao not available ({type(exc).__name__}: {exc})"
    try:
        out = copy.deepcopy(model)
        if kind == "int4":  # the CPU packing ("opaque": torch's int4pack kernel), group 128 like ours
            quantize_(out, Int4WeightOnlyConfig(group_size=128, int4_packing_format="opaque"))
        else:
            quantize_(out, Int8WeightOnlyConfig())
        with torch.inference_mode():
            out(torch.zeros(1, 4, dtype=torch.long))
        return out
    except Exception as exc:  # noqa: BLE001 - a config this torchao/torch pair does not run
        return f"torchao {kind} failed ({type(exc).__name__}: {str(exc)[:160]})"


def demo_variants(seed: int = 0, quantized: bool = True) -> dict[str, nn.Module]:
    """The embedded demo model in bf16, its PMQ 2.5-bit (RTN, group 128; unless not ``quantized``) and its
    skipping variant."""
    base, _ = load_model("demo", dtype=torch.bfloat16)
    base.eval()
    n_experts = find_moe_layers(base)[0].num_experts
    rng = random.Random(seed)
    half = {layer.layer_idx: set(rng.sample(range(n_experts), n_experts // 2)) for layer in find_moe_layers(base)}
    out = {"demo-bf16": base}
    if quantized:
        out["demo-pmq-2.5bit"] = quantize_experts(copy.deepcopy(base), lambda idx, e: 3 if e in half[idx] else 2)
    skip = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    install_skipping(skip, median_betas(base, torch.randint(3, base.config.vocab_size, (1, 256), generator=gen)),
                     "top2")
    out["demo-skip"] = skip
    return out


_FRESH_LOAD = textwrap.dedent("""
    import json, resource, sys, torch
    import moeslim
    from moeslim.evaluate.cost import param_bytes
    held = 0
    if sys.argv[1]:
        model, _ = moeslim.load(sys.argv[1], dtype=torch.bfloat16)
        held = param_bytes(model)["total"]
    # VmHWM: this interpreter's own peak (ru_maxrss also counts the forked parent's pages before exec)
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    peak = int(hwm[0]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rss": peak, "bytes": held}))
""")


def fresh_load(path: str) -> dict[str, int]:
    """{"rss": peak RSS bytes, "bytes": resident tensor bytes} of ``moeslim.load(path)`` in a fresh interpreter
    (path "" = the interpreter with the same imports and no model)."""
    proc = subprocess.run([sys.executable, "-c", _FRESH_LOAD, path], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-400:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fresh_rss(models: dict[str, nn.Module]) -> dict[str, dict[str, int] | str]:
    """Save each variant, drop it from ``models`` (freeing its memory), load it in a fresh process."""
    import moeslim

    out: dict[str, dict[str, int] | str] = {}
    for name in list(models):
        model = models.pop(name)
        with tempfile.TemporaryDirectory(prefix="lowbit_speed_") as tmp:
            try:
                moeslim.save(model, Path(tmp) / "ckpt")
            except Exception as exc:  # noqa: BLE001 - a peer format moeslim cannot save: report it
                out[name] = f"not saved ({type(exc).__name__})"
                continue
            finally:
                del model
                gc.collect()
            try:
                out[name] = fresh_load(str(Path(tmp) / "ckpt"))
            except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
                out[name] = f"load failed ({str(exc)[-120:]})"
            shutil.rmtree(Path(tmp) / "ckpt", ignore_errors=True)
    return out


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _generate(model: nn.Module, ids: torch.Tensor, n: int) -> Any:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, use_cache=True, pad_token_id=0)


def _summary(samples: dict[str, list[tuple[float, float]]], models: dict[str, nn.Module], long: torch.Tensor,
             new_tokens: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, s in samples.items():
        prefill_s, decode_s = statistics.median(x[0] for x in s), statistics.median(x[1] for x in s)
        out[name] = {"prefill_tps": long.numel() / prefill_s, "decode_tps": (new_tokens - 1) / decode_s,
                     "bytes": param_bytes(models[name])["total"]}
    return out


@torch.inference_mode()
def measure_both(models: dict[str, nn.Module], prompt: torch.Tensor, long: torch.Tensor, demo: dict[str, nn.Module],
                 demo_prompt: torch.Tensor, demo_long: torch.Tensor, new_tokens: int, repeats: int
                 ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Both model sets timed in the same rounds: each round runs every variant once, in a shuffled order."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in [*models, *demo]}
    jobs = [(name, m, prompt, long) for name, m in models.items()]
    jobs += [(name, m, demo_prompt, demo_long) for name, m in demo.items()]
    rng = random.Random(0)
    for rnd in range(repeats + 1):  # round 0 warms up (and compiles the decode kernels)
        rng.shuffle(jobs)  # a burst of load from elsewhere on the machine does not always hit the same variant
        for name, model, ids, full in jobs:
            prefill = _timed(lambda m=model, f=full: m(input_ids=f, use_cache=False))
            decode = _timed(lambda m=model, i=ids: _generate(m, i, new_tokens)) - _timed(
                lambda m=model, i=ids: _generate(m, i, 1))
            if rnd:
                samples[name].append((prefill, max(decode, 1e-9)))
    return (_summary({n: samples[n] for n in models}, models, long, new_tokens),
            _summary({n: samples[n] for n in demo}, demo, demo_long, new_tokens))


SPEED_VARIANTS = ("uniform-4bit", "uniform-8bit", "pmq-2.5bit", "pmq-2.5bit+skip", "bf16+skip", "pruned-keep6",
                  "torchao")


def build_speed_variants(base: nn.Module, layers: int, which: list[str], long: torch.Tensor
                         ) -> tuple[dict[str, nn.Module], dict[int, float]]:
    rng = random.Random(0)
    half = {idx: set(rng.sample(range(8), 4)) for idx in range(layers)}
    models: dict[str, nn.Module] = {"original-bf16": base}
    if "uniform-4bit" in which:
        models["uniform-4bit"] = quantize_experts(copy.deepcopy(base), lambda _l, _e: 4)
    if "uniform-8bit" in which:
        models["uniform-8bit"] = quantize_experts(copy.deepcopy(base), lambda _l, _e: 8)
    betas: dict[int, float] = {}
    if "pmq-2.5bit" in which or "pmq-2.5bit+skip" in which:
        models["pmq-2.5bit"] = quantize_experts(copy.deepcopy(base), lambda idx, e: 3 if e in half[idx] else 2)
    if "pmq-2.5bit+skip" in which or "bf16+skip" in which:
        betas = median_betas(base, long)
    if "pmq-2.5bit+skip" in which:
        skip = copy.deepcopy(models["pmq-2.5bit"])
        install_skipping(skip, betas, "top2")
        models["pmq-2.5bit+skip"] = skip
    if "bf16+skip" in which:
        skip = copy.deepcopy(base)
        install_skipping(skip, betas, "top2")
        models["bf16+skip"] = skip
    if "pruned-keep6" in which:
        pruned = copy.deepcopy(base)
        select_experts(pruned, {layer.layer_idx: list(range(6)) for layer in find_moe_layers(pruned)})
        models["pruned-keep6"] = pruned
    if "torchao" in which:
        for kind in ("int4", "int8"):
            peer = torchao_variant(base, kind)
            if isinstance(peer, str):
                print(peer)
            else:
                models[f"torchao-{kind}-weight-only"] = peer
    return models, betas


def load_line(fresh: dict[str, int] | str | None, bare: dict[str, int]) -> str:
    """The load goal of issue 23: fresh-process peak RSS <= tensor bytes x 1.3 + the bare interpreter."""
    if not isinstance(fresh, dict):
        return f"pmq-2.5bit fresh load: {fresh}"
    goal = fresh["bytes"] * 1.3 + bare["rss"]
    return (f"pmq-2.5bit fresh load peak RSS {fresh['rss'] / 2**20:.0f} MiB for {fresh['bytes'] / 2**20:.0f} MiB of "
            f"tensors; goal <= tensor bytes x 1.3 + bare interpreter ({bare['rss'] / 2**20:.0f} MiB) = "
            f"{goal / 2**20:.0f} MiB: {'met' if fresh['rss'] <= goal else 'missed'}")


def load_check(layers: int) -> None:
    base = speed_model(layers)
    rng = random.Random(0)
    half = {idx: set(rng.sample(range(8), 4)) for idx in range(layers)}
    models = {"pmq-2.5bit": quantize_experts(base, lambda idx, e: 3 if e in half[idx] else 2)}
    del base
    gc.collect()
    fresh = fresh_rss(models)
    print(load_line(fresh.get("pmq-2.5bit"), fresh_load("")))


def print_table(results: dict[str, dict[str, float]], demo_results: dict[str, dict[str, float]],
                fresh: dict[str, dict[str, int] | str], ref_name: str) -> None:
    """The speed model's and the demo model's tables, ratios against ``ref_name`` / demo-bf16 (fresh RSS columns
    where ``fresh`` has them)."""
    ref = results[ref_name]
    ref_fresh = fresh.get(ref_name)
    ref_rss = ref_fresh["rss"] if isinstance(ref_fresh, dict) else None
    head = f"{'decode tok/s':>12} {'x':>6} {'prefill tok/s':>14} {'x':>6} {'resident MiB':>13} {'x':>6}"
    if fresh:
        head += f" {'fresh RSS MiB':>14} {'x':>6}"
    print(f"\n{'variant':28} {head}")
    for name, r in results.items():
        f = fresh.get(name)
        rss = ""
        if fresh:
            rss = (f" {f['rss'] / 2**20:14.0f} {f['rss'] / ref_rss if ref_rss else float('nan'):6.2f}"
                   if isinstance(f, dict) else f"   {f}")
        print(f"{name:28} {r['decode_tps']:12.2f} {r['decode_tps'] / ref['decode_tps']:6.2f} "
              f"{r['prefill_tps']:14.1f} {r['prefill_tps'] / ref['prefill_tps']:6.2f} "
              f"{r['bytes'] / 2**20:13.1f} {r['bytes'] / ref['bytes']:6.2f}{rss}")
    print()
    print_ratio_table("demo model variant", demo_results, "demo-bf16")


def print_ratio_table(title: str, results: dict[str, dict[str, float]], ref_name: str) -> None:
    """One table of a model's variants: decode / prefill tok/s and resident MiB, each with its ratio to
    ``ref_name``'s."""
    ref = results[ref_name]
    print(f"{title:28} {'decode tok/s':>12} {'x':>6} {'prefill tok/s':>14} {'x':>6} {'resident MiB':>13} {'x':>6}")
    for name, r in results.items():
        print(f"{name:28} {r['decode_tps']:12.2f} {r['decode_tps'] / ref['decode_tps']:6.2f} "
              f"{r['prefill_tps']:14.1f} {r['prefill_tps'] / ref['prefill_tps']:6.2f} "
              f"{r['bytes'] / 2**20:13.2f} {r['bytes'] / ref['bytes']:6.2f}")


def print_skip_lines(results: dict[str, dict[str, float]], demo_results: dict[str, dict[str, float]],
                     demo_line: bool = True) -> None:
    """Skipping against the same model without it: bf16 + skip / bf16 (and PMQ 2.5-bit + skip / PMQ 2.5-bit)."""
    def ratio(a: str, b: str) -> float:
        return results[a]["decode_tps"] / results[b]["decode_tps"]

    if demo_line:
        print(f"lowbit demo decode ratio skip: "
              f"{demo_results['demo-skip']['decode_tps'] / demo_results['demo-bf16']['decode_tps']:.2f}")
    if "bf16+skip" in results:
        print(f"lowbit skip decode ratio over same model: {ratio('bf16+skip', 'original-bf16'):.2f}")
    if "pmq-2.5bit+skip" in results:
        print(f"lowbit skip decode ratio over same model pmq-2.5bit: {ratio('pmq-2.5bit+skip', 'pmq-2.5bit'):.2f}")


def demo_check(new_tokens: int, prefill_tokens: int, repeats: int) -> None:
    """The demo model's table and its two summary lines alone (no speed model: a run of a few minutes)."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(1)
    demo = demo_variants()
    demo_ids = torch.randint(3, 8192, (1, 8), generator=gen)
    demo_long = torch.randint(3, 8192, (1, min(prefill_tokens, 256)), generator=gen)
    _, demo_results = measure_both({}, demo_ids, demo_long, demo, demo_ids, demo_long, new_tokens, repeats)
    ref = demo_results["demo-bf16"]
    print(f"{'demo model variant':28} {'decode tok/s':>12} {'x':>6} {'prefill tok/s':>14} {'x':>6} "
          f"{'resident MiB':>13} {'x':>6}")
    for name, r in demo_results.items():
        print(f"{name:28} {r['decode_tps']:12.2f} {r['decode_tps'] / ref['decode_tps']:6.2f} "
              f"{r['prefill_tps']:14.1f} {r['prefill_tps'] / ref['prefill_tps']:6.2f} "
              f"{r['bytes'] / 2**20:13.2f} {r['bytes'] / ref['bytes']:6.2f}")
    print(f"total time {time.perf_counter() - t0:.0f} s; threads {torch.get_num_threads()}\n")
    for name in ("pmq-2.5bit", "skip"):
        print(f"lowbit demo decode ratio {name}: {demo_results[f'demo-{name}']['decode_tps'] / ref['decode_tps']:.2f}")


def fine_check(new_tokens: int, prefill_tokens: int, repeats: int, dtype: torch.dtype, prompt_tokens: int) -> None:
    """demo-fine against its rtn-3 row (the demo's plan: uniform 3-bit, quantizer rtn), timed interleaved."""
    from torch._dynamo.utils import counters

    import moeslim
    from moeslim.methods.quant.driver import QuantizeConfig, plan_quantize

    t0 = time.perf_counter()
    base, _ = load_model("demo-fine", dtype=dtype)
    rtn3 = copy.deepcopy(base)
    moeslim.apply(rtn3, plan_quantize(rtn3, None, QuantizeConfig(method="uniform", bits=3, quantizer="rtn"),
                                      "demo-fine"))
    models = {"demo-fine": base, "demo-fine-rtn-3bit": rtn3}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, base.config.vocab_size, (1, prompt_tokens), generator=gen)
    long = torch.randint(3, base.config.vocab_size, (1, min(prefill_tokens, 256)), generator=gen)
    graphs = counters["stats"]["unique_graphs"]
    _, results = measure_both({}, ids, long, models, ids, long, new_tokens, repeats)
    graphs = counters["stats"]["unique_graphs"] - graphs
    ref = results["demo-fine"]
    print_ratio_table("demo-fine variant", results, "demo-fine")
    print(f"{dtype}, prompt {prompt_tokens} tokens; compiled graphs (cold, timed runs incl. warm-up): {graphs}; "
          f"total time {time.perf_counter() - t0:.0f} s; threads {torch.get_num_threads()}\n")
    print(f"lowbit demo-fine decode ratio rtn-3bit: "
          f"{results['demo-fine-rtn-3bit']['decode_tps'] / ref['decode_tps']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--variants", nargs="+", choices=SPEED_VARIANTS, default=None,
                        help="the speed model's variants besides the original (default: all)")
    parser.add_argument("--skip-only", action="store_true",
                        help="only the original and bf16 + skipping (and PMQ 2.5-bit with and without skipping "
                             "when --variants names pmq-2.5bit+skip), on both models; no fresh loads")
    parser.add_argument("--load-only", action="store_true",
                        help="only the PMQ 2.5-bit fresh-load peak RSS against its goal (no timing)")
    parser.add_argument("--demo-only", action="store_true",
                        help="only the demo model's variants (bf16, PMQ 2.5-bit, skipping), timed interleaved; "
                             "prints the demo table and the two demo lines")
    parser.add_argument("--model", choices=("speed", "demo-fine"), default="speed",
                        help="demo-fine: only the fine-grained demo model against its rtn-3 row")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="with --model demo-fine: the dtype both models run in (the demo's: float32)")
    parser.add_argument("--prompt-tokens", type=int, default=8,
                        help="with --model demo-fine: the decode prompt's length (the demo's table: 128)")
    args = parser.parse_args()
    if args.model == "demo-fine":
        fine_check(args.new_tokens, args.prefill_tokens, args.repeats, getattr(torch, args.dtype), args.prompt_tokens)
        return
    if args.load_only:
        load_check(args.layers)
        return
    if args.demo_only:
        demo_check(args.new_tokens, args.prefill_tokens, args.repeats)
        return
    if args.skip_only:
        which = ["bf16+skip"] + (["pmq-2.5bit", "pmq-2.5bit+skip"]
                                 if args.variants and "pmq-2.5bit+skip" in args.variants else [])
    else:  # every summary line needs uniform-4bit and pmq-2.5bit
        which = sorted(set(args.variants or SPEED_VARIANTS) | {"uniform-4bit", "pmq-2.5bit"},
                       key=SPEED_VARIANTS.index)
    t0 = time.perf_counter()
    base = speed_model(args.layers)
    n_params = sum(p.numel() for p in base.parameters())
    n_expert = sum(p.numel() for layer in find_moe_layers(base) for p in layer.experts.parameters())
    print(f"speed model: Mixtral layout, {args.layers} layers, {n_params / 1e9:.2f} B params "
          f"({n_expert / 1e9:.2f} B routed experts), bf16 {param_bytes(base)['total'] / 2**20:.0f} MiB; "
          f"threads {torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 8192, (1, 8), generator=gen)
    long = torch.randint(3, 8192, (1, args.prefill_tokens), generator=gen)
    models, betas = build_speed_variants(base, args.layers, which, long)
    print(f"built {len(models)} variants in {time.perf_counter() - t0:.0f} s"
          + ("; median betas " + ", ".join(f"{b:.2f}" for b in betas.values()) if betas else ""))
    demo = demo_variants(quantized=not args.skip_only)
    demo_ids = torch.randint(3, 8192, (1, 8), generator=gen)
    demo_long = torch.randint(3, 8192, (1, min(args.prefill_tokens, 256)), generator=gen)
    # one interleaved run: every round times the speed model's variants and the demo's, in shuffled orders
    results, demo_results = measure_both(models, prompt, long, demo, demo_ids, demo_long, args.new_tokens,
                                         args.repeats)
    calls: list[float] = []
    skip_name = next((n for n in ("bf16+skip", "pmq-2.5bit+skip") if n in models), None)
    if skip_name is not None:
        skip = models[skip_name]
        reset_counters(skip)
        with torch.inference_mode():
            skip(long)
        calls = [c["expert_calls"] / c["tokens"] for c in
                 (layer.experts.moeslim_counters for layer in find_moe_layers(skip))]
        del skip
    if args.skip_only:
        print_table(results, demo_results, {}, "original-bf16")
        if calls:
            print(f"expert calls per token per layer with skipping: {statistics.mean(calls):.2f} (top-2 = 2.00)")
        print(f"total time {time.perf_counter() - t0:.0f} s\n")
        print_skip_lines(results, demo_results)
        return
    del base, demo  # only `models` holds the variants now: fresh_rss frees each in turn
    gc.collect()
    t1 = time.perf_counter()
    fresh = fresh_rss(models)
    bare = fresh_load("")
    print_table(results, demo_results, fresh, "original-bf16")
    ref, demo_ref = results["original-bf16"], demo_results["demo-bf16"]
    expert_bf16 = 2 * n_expert
    loaded = {n: f["bytes"] for n, f in fresh.items() if isinstance(f, dict)}
    print(f"\nfresh interpreter with the same imports and no model: RSS {bare['rss'] / 2**20:.0f} MiB; tensor bytes "
          "held after a fresh moeslim.load (MiB): " + ", ".join(f"{n} {b / 2**20:.1f}" for n, b in loaded.items())
          + f"; save + fresh loads took {time.perf_counter() - t1:.0f} s")
    if "pmq-2.5bit+skip" in loaded:
        print("(the fresh load of pmq-2.5bit+skip holds pmq-2.5bit's tensors: skipping adds no tensors)")
    print(load_line(fresh.get("pmq-2.5bit"), bare))
    bound = (0.25 * expert_bf16 + (ref["bytes"] - expert_bf16)) / ref["bytes"]
    if calls:
        print(f"expert calls per token per layer with skipping: {statistics.mean(calls):.2f} (top-2 = 2.00)")
    print(f"resident goal for pmq-2.5bit: <= {bound:.2f} of bf16 (0.25 x expert bytes + non-expert bytes)")
    print(f"total time {time.perf_counter() - t0:.0f} s\n")
    pmq = results["pmq-2.5bit"]
    u4 = results["uniform-4bit"]
    print(f"lowbit decode ratio uniform-4bit: {u4['decode_tps'] / ref['decode_tps']:.2f}")
    print(f"lowbit decode ratio pmq-2.5bit: {pmq['decode_tps'] / ref['decode_tps']:.2f}")
    print(f"lowbit prefill ratio uniform-4bit: {u4['prefill_tps'] / ref['prefill_tps']:.2f}")
    print(f"lowbit demo decode ratio pmq-2.5bit: "
          f"{demo_results['demo-pmq-2.5bit']['decode_tps'] / demo_ref['decode_tps']:.2f}")
    print(f"lowbit demo decode ratio skip: {demo_results['demo-skip']['decode_tps'] / demo_ref['decode_tps']:.2f}")
    if "pmq-2.5bit+skip" in results:
        print(f"lowbit decode ratio pmq-2.5bit+skip: "
              f"{results['pmq-2.5bit+skip']['decode_tps'] / ref['decode_tps']:.2f}")
    print_skip_lines(results, demo_results, demo_line=False)
    print(f"lowbit resident ratio pmq-2.5bit: {pmq['bytes'] / ref['bytes']:.2f}")


if __name__ == "__main__":
    main()
