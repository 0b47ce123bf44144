"""What a variant costs: parameter bytes, bytes on disk, peak memory, activated parameters and expert calls
per token, prefill / decode throughput (models timed interleaved in one process)."""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.evaluate._logits import model_device
from moeslim.models.attrs import generating, hf_config
from moeslim.models.held_bytes import held_storages, storage_key

# ---------------------------------------------------------------- sizes


def param_bytes(model: nn.Module) -> dict[str, Any]:
    """Resident bytes of the weights: measured from the tensors the model holds, not from any accounting.

    Walks every parameter and buffer (packed low-bit storage included, runtime/packed.py), counting each
    underlying storage once (tied or shared tensors, views) at its full size; meta-device placeholders hold
    nothing and count 0. Returns {"total", "by_dtype": {dtype: bytes} of the float/int tensors outside packed
    storage, "quantized": bytes of packed low-bit storage, "method": "tensors"}.
    """
    from moeslim.runtime.packed import PackedExperts
    from moeslim.runtime.packed_rows import PackedRows

    packed_ptrs: set[tuple[str, int]] = set()
    for module in model.modules():
        if isinstance(module, (PackedExperts, PackedRows)):
            packed_ptrs.update(storage_key(b) for b in module.buffers())
    by_dtype: dict[str, int] = {}
    quantized = 0
    for key, t, nbytes in held_storages(model):
        if key in packed_ptrs:
            quantized += nbytes
        else:
            name = str(t.dtype).removeprefix("torch.")
            by_dtype[name] = by_dtype.get(name, 0) + nbytes
    return {"total": sum(by_dtype.values()) + quantized, "by_dtype": by_dtype, "quantized": quantized,
            "method": "tensors"}


resident_bytes = param_bytes


def disk_bytes(path: str | Path) -> int:
    """Bytes of every file under a folder (or of one file); symlinks are not followed."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------- peak memory


def _current_rss() -> int | None:
    try:  # Linux: resident pages of this process, cheap to read from a thread
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def peak_memory(
    fn: Callable[..., Any],
    *args: Any,
    device: torch.device | str | None = None,
    interval_s: float = 0.002,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """Run fn(*args, **kwargs) and measure the memory it needed on top of what was already held.

    Method (tracemalloc does not see torch's allocator, so it is not used):
    - CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory allocated
      before the call ("cuda_allocated").
    - CPU on Linux: a thread samples the process RSS (/proc/self/statm) every `interval_s`; peak minus
      the RSS before the call ("rss_sampled"), raised to the process high-water mark when that grew
      during the call (so short allocations are not missed).
    - Elsewhere: increase of the process high-water mark ru_maxrss ("ru_maxrss_delta"), a lower bound
      that reads 0 when an earlier step of the process already peaked higher.
    Returns (fn's result, {"method", "peak_bytes", "baseline_bytes"}).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        allocated = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(dev)
        peak_allocated = torch.cuda.max_memory_allocated(dev)
        return result, {"method": "cuda_allocated", "peak_bytes": peak_allocated - allocated,
                        "baseline_bytes": allocated}
    base = _current_rss()
    if base is None:
        before = _max_rss()
        result = fn(*args, **kwargs)
        return result, {
            "method": "ru_maxrss_delta",
            "peak_bytes": max(0, _max_rss() - before),
            "baseline_bytes": before,
        }
    peak: list[int] = [base]
    high_water = _max_rss()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            peak[0] = max(peak[0], _current_rss() or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn(*args, **kwargs)
    finally:
        peak[0] = max(peak[0], _current_rss() or 0)
        done.set()
        sampler.join()
    if _max_rss() > high_water:
        # The process high-water mark rose during the call, so it is the call's exact peak: this catches
        # allocations too short for the sampler (a loaded machine can starve the sampling thread).
        peak[0] = max(peak[0], _max_rss())
    return result, {"method": "rss_sampled", "peak_bytes": peak[0] - base, "baseline_bytes": base}


# ---------------------------------------------------------------- activated parameters, expert calls

def _weights_of(module: nn.Module) -> int:
    """Weights a module computes with: its float parameters plus the weights its packed experts stand for."""
    from moeslim.runtime.packed import PackedExperts

    dense = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    packed = sum(math.prod(m.shape) for m in module.modules() if isinstance(m, PackedExperts))
    return dense + packed


def activated_params(model: nn.Module) -> dict[str, Any]:
    """Parameters one token uses: non-expert + shared experts + top_k / E of each MoE layer's routed experts.

    MoE layers come from ``moeslim.models`` (per layer E and top_k, so a model pruned unevenly across layers
    is counted right); packed low-bit experts count the weights they stand for.
    """
    from moeslim.models import find_moe_layers

    total = _weights_of(model)
    routed = active = 0
    for layer in find_moe_layers(model):
        n = _weights_of(layer.experts)
        routed += n
        active += round(n * min(layer.top_k, layer.num_experts) / layer.num_experts)
    return {"total": total, "expert": routed, "activated": total - routed + active, "source": "moe layers"}


@torch.inference_mode()
def expert_calls_per_token(model: nn.Module, input_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Routed expert calls per token, summed over MoE layers.

    With a skipping runtime installed (``runtime.skipping`` counts calls per MoE layer), the counters are
    reset, ``input_ids`` (B, L) is run, and calls / tokens is summed over layers ("counted"). Otherwise every
    token calls top_k experts in every MoE layer ("static": top_k x MoE layers).
    """
    from moeslim.runtime.skipping import counters, has_counters, reset_counters

    counting = has_counters(model)
    if counting and input_ids is not None:
        reset_counters(model)
        model(input_ids=input_ids.to(model_device(model)), use_cache=False)
    per_layer = [c["expert_calls"] / c["tokens"] for c in counters(model).values() if c["tokens"]] if counting else []
    if per_layer:
        return {"per_token": sum(per_layer), "per_layer": per_layer, "source": "counted"}
    # Without counters every token calls top_k experts in every MoE layer (models/ discovers the layers, so
    # packed experts, which hold no float parameters, are found too).
    from moeslim.models import find_moe_layers

    per_layer_static = [float(layer.top_k) for layer in find_moe_layers(model)]
    return {"per_token": sum(per_layer_static), "per_layer": per_layer_static, "source": "static"}


# ---------------------------------------------------------------- speed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _generate(model: nn.Module, ids: torch.Tensor, n: int) -> Any:
    # min_new_tokens pins the length: an early EOS would otherwise make a variant look faster
    return generating(model).generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        use_cache=True,
        pad_token_id=getattr(hf_config(model), "eos_token_id", None) or 0,
    )


def _one_round(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 tokens)."""
    device = ids.device
    prefill = _timed(lambda: model(input_ids=ids, use_cache=True), device)
    # decode = generate(n) - generate(1): both include one prefill and the first sampled token
    gen1 = _timed(lambda: _generate(model, ids, 1), device)
    gen_n = _timed(lambda: _generate(model, ids, new_tokens), device)
    return prefill, max(gen_n - gen1, 1e-9)


@torch.inference_mode()
def compare_speed(
    models: Mapping[str, nn.Module],
    input_ids: torch.Tensor,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    show: bool = True,
) -> dict[str, dict[str, float]]:
    """Prefill and decode tokens/s of several models, timed interleaved (model A, B, ..., A, B, ...) so
    that machine noise and thermal drift hit all of them alike; medians over `repeats`.

    input_ids (B, L) prompt. Prefill = one forward over the prompt; decode = greedy generation of
    `new_tokens` (min_new_tokens = max_new_tokens, no sampling, KV cache on) minus the 1-token run.
    Returns {name: {"prefill_tps", "decode_tps", "prefill_s", "decode_s", "prefill_ratio",
    "decode_ratio"}}, ratios relative to the first model (>1 = faster).
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 to separate decode from prefill")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for rnd in range(warmup + repeats):
        for name, model in models.items():
            model.eval()
            sample = _one_round(model, input_ids.to(model_device(model)), new_tokens)
            if rnd >= warmup:
                times[name].append(sample)
    b, n_prompt = input_ids.shape
    out: dict[str, dict[str, float]] = {}
    for name, samples in times.items():
        prefill_s = statistics.median(s[0] for s in samples)
        decode_s = statistics.median(s[1] for s in samples)
        out[name] = {
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "prefill_tps": b * n_prompt / prefill_s,
            "decode_tps": b * (new_tokens - 1) / decode_s,
        }
    first = next(iter(out.values()))
    for res in out.values():
        res["prefill_ratio"] = res["prefill_tps"] / first["prefill_tps"]
        res["decode_ratio"] = res["decode_tps"] / first["decode_tps"]
    if show:
        print_speed(out)
    return out


def print_speed(results: Mapping[str, Mapping[str, float]]) -> None:
    """Rich table of compare_speed results, ratios vs the first row."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="speed (median, interleaved)")
    for col in ("model", "prefill tok/s", "x", "decode tok/s", "x"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['prefill_tps']:.1f}",
            f"{r['prefill_ratio']:.2f}",
            f"{r['decode_tps']:.1f}",
            f"{r['decode_ratio']:.2f}",
        )
    Console().print(table)
