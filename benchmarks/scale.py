"""Peak memory of moeslim on a checkpoint much larger than one layer, and 1 vs 2 torch.distributed processes.

Writes a random-weight Mixtral-layout checkpoint (legacy per-expert keys, bfloat16, several shards, >= --gb GB)
into a temp dir, then runs, each in a fresh process while sampling the resident set size of the process and
its children every 20 ms:

    moeslim plan prune CKPT --method enumerate --stream --dtype bfloat16   (layers streamed from the shards)
    moeslim apply CKPT prune.json --stream --dtype bfloat16     (read, pruned and written layer by layer)
    moeslim plan quantize CKPT --method uniform --bits 4 --quantizer rtn --stream
    moeslim apply CKPT quantize.json --stream --dtype bfloat16  (read, packed and written layer by layer)
    moeslim export CKPT --format gguf --type F16 --stream     (each layer read, converted and written in turn)
    moeslim export QUANTIZED --format compressed-tensors --stream   (the checkpoint apply wrote, layer by layer)
    torchrun --nproc-per-node 2 moeslim plan prune ... (gloo)  vs the one-process plan prune

and, on a separate checkpoint of the same layer shape with --gptq-layers layers (GPTQ takes ~4 min per layer
of this shape on one core, too long for the big one), a GPTQ plan applied --stream by 1 and by 2 gloo
processes (windows and per-expert GPTQ split; the two checkpoints are compared tensor by tensor).

Plans compute in bfloat16 (``--dtype bfloat16``: the checkpoint's dtype; on this CPU bfloat16 matmuls are 4x
faster than float32, and a layer takes half the memory). Ratios are peak RSS / checkpoint bytes.
Every process runs with OMP_NUM_THREADS=1, so 2 processes use the
2 cores that one process with 1 thread leaves idle (the speedup is data parallelism, not more threads each).
The temp dir is removed at the end (also on failure).

    python benchmarks/scale.py                 # >= 6 GB checkpoint (~15 min on 2 CPU cores; ~2x that free disk)
    python benchmarks/scale.py --gb 0.3 --gptq-layers 0    # mechanics only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, HEADS, KV_HEADS = 2048, 4096, 8, 2, 16, 8


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_rss: int  # bytes, the process and its children together


def _layer_tensors(index: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One decoder layer in the legacy Mixtral layout (what Mixtral checkpoints on the hub store)."""
    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (std * torch.randn(*shape, generator=gen)).to(torch.bfloat16)

    head = HIDDEN // HEADS
    p = f"model.layers.{index}."
    out = {
        p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        p + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": rand(KV_HEADS * head, HIDDEN),
        p + "self_attn.v_proj.weight": rand(KV_HEADS * head, HIDDEN),
        p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
        p + "block_sparse_moe.gate.weight": rand(EXPERTS, HIDDEN, std=3.0 / math.sqrt(HIDDEN)),
    }
    for e in range(EXPERTS):
        q = f"{p}block_sparse_moe.experts.{e}."
        out[q + "w1.weight"] = rand(INTERMEDIATE, HIDDEN)
        out[q + "w3.weight"] = rand(INTERMEDIATE, HIDDEN)
        out[q + "w2.weight"] = rand(HIDDEN, INTERMEDIATE)
    return out


def write_checkpoint(folder: Path, gigabytes: float, tokenizer_dir: Path, min_layers: int = 2) -> int:
    """A random Mixtral checkpoint of >= ``gigabytes`` GB (>= ``min_layers`` layers), one layer per shard;
    returns its bytes."""
    from transformers import AutoTokenizer, MixtralConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    attention = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN * KV_HEADS // HEADS
    per_layer = 2 * (attention + EXPERTS * 3 * HIDDEN * INTERMEDIATE)  # bytes in bfloat16
    layers = max(min_layers, math.ceil((gigabytes * 1e9 - 4 * vocab * HIDDEN) / per_layer))
    folder.mkdir(parents=True)
    MixtralConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dtype="bfloat16",
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shards = [("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")] + [(i,) for i in range(layers)]
    total = 0
    for number, shard in enumerate(shards):
        name = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        if isinstance(shard[0], str):
            tensors = {"model.embed_tokens.weight": (0.02 * torch.randn(vocab, HIDDEN, generator=gen)).bfloat16(),
                       "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                       "lm_head.weight": (0.02 * torch.randn(vocab, HIDDEN, generator=gen)).bfloat16()}
        else:
            tensors = _layer_tensors(int(shard[0]), gen)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(command: list[str], label: str) -> Measured:
    """Run ``command`` in a fresh process; peak RSS of it and its children (sampled every 20 ms)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()
    output: list[str] = []

    def drain() -> None:
        assert proc.stdout is not None
        output.extend(proc.stdout)
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    done.wait(10)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write("".join(output[-40:]))
        raise SystemExit(f"{label} failed with exit code {proc.returncode}: {' '.join(command)}")
    print(f"{label}: {seconds:.1f} s, peak RSS {peak / 2**30:.2f} GiB", flush=True)
    return Measured(seconds, peak)


def _same_plan(a: Path, b: Path, rel_tol: float) -> bool:
    one, two = json.loads(a.read_text()), json.loads(b.read_text())
    if one["layers"] != two["layers"]:
        return False
    return all(math.isclose(two["summary"]["layers"][k]["loss"], v["loss"], rel_tol=rel_tol)
               for k, v in one["summary"]["layers"].items())


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    for file in sorted(p.name for p in a.glob("*.safetensors")):
        ta, tb = load_file(a / file), load_file(b / file)
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def gptq_section(tmp: Path, args: argparse.Namespace, moeslim: str, torchrun: str, reference_size: int) -> None:
    """GPTQ apply, streamed, on a checkpoint of ``--gptq-layers`` layers of the same shape: 1 vs 2 processes.

    Its peak memory is one layer + activations + one layer's Hessians whatever the layer count, so it is
    also given as a share of the big checkpoint. (GPTQ on all its layers would take ~4 min per layer here.)
    """
    from moeslim.models import resolve_model_path

    ckpt = tmp / "gptq-source"
    size = write_checkpoint(ckpt, 0.0, Path(resolve_model_path("demo")), min_layers=args.gptq_layers)
    layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    plan = tmp / "gptq.json"
    calib = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    measure([moeslim, "plan", "quantize", str(ckpt), *args.quantize.split(), "--quantizer", "gptq", "--stream",
             "--dtype", "bfloat16", *calib, "--out", str(plan)], f"GPTQ checkpoint ({layers} layers): plan quantize")
    apply = ["apply", str(ckpt), str(plan), "--stream", "--dtype", "bfloat16"]
    one = measure([moeslim, *apply, "--out", str(tmp / "gptq1")], "  apply quantize (gptq, streamed)")
    two = measure([torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", moeslim, *apply,
                   "--out", str(tmp / "gptq2")], "  apply quantize (gptq, streamed), 2 gloo processes")
    same = _same_tensors(tmp / "gptq1", tmp / "gptq2")
    print(f"  GPTQ per layer: {one.seconds / layers:.0f} s (1 process), {two.seconds / layers:.0f} s (2); "
          f"speedup {one.seconds / two.seconds:.2f}; 1- and 2-process checkpoints identical: "
          f"{'yes' if same else 'no'}; peak RSS {one.peak_rss / 2**30:.2f} GiB = {one.peak_rss / size:.2f} of this "
          f"{size / 1e9:.2f} GB checkpoint, {one.peak_rss / reference_size:.2f} of the big one", flush=True)
    for name in ("gptq1", "gptq2", "gptq-source"):
        shutil.rmtree(tmp / name, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=6.0, help="checkpoint size in GB (default 6.0)")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (default 32: 4 batches)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--keep", type=int, default=6)
    parser.add_argument("--quantize", default="--method uniform --bits 4",
                        help="plan quantize options (default: uniform 4-bit; e.g. '--method pmq --bits 3 "
                             "--candidates 2,4' also streams the PMQ calibration)")
    parser.add_argument("--quantizer", default="rtn", choices=("gptq", "rtn"),
                        help="quantizer of the big checkpoint's quantize line (default rtn: GPTQ takes ~4 min per "
                             "layer of this shape on one CPU core; its numbers come from --gptq-layers)")
    parser.add_argument("--gptq-layers", type=int, default=1,
                        help="layers of the separate GPTQ checkpoint (1 vs 2 processes; 0 skips it)")
    parser.add_argument("--workdir", default=None, help="parent of the temp dir (default: the system temp)")
    args = parser.parse_args()
    from moeslim.models import resolve_model_path

    bin_dir = Path(sys.executable).parent
    moeslim, torchrun = str(bin_dir / "moeslim"), str(bin_dir / "torchrun")
    calib = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    tmp = Path(tempfile.mkdtemp(prefix="moeslim-scale-", dir=args.workdir))
    try:
        ckpt = tmp / "mixtral-random"
        start = time.perf_counter()
        size = write_checkpoint(ckpt, args.gb, Path(resolve_model_path("demo")))
        print(f"checkpoint: {size / 1e9:.2f} GB in {len(list(ckpt.glob('*.safetensors')))} shards, "
              f"{json.loads((ckpt / 'config.json').read_text())['num_hidden_layers']} layers "
              f"({time.perf_counter() - start:.0f} s to write)", flush=True)
        prune_plan, prune_plan2 = tmp / "prune.json", tmp / "prune-2procs.json"
        streamed = ["--stream", "--dtype", "bfloat16", *calib]
        prune = ["plan", "prune", str(ckpt), "--method", "enumerate", "--keep", str(args.keep), *streamed]
        plan_prune = measure([moeslim, *prune, "--out", str(prune_plan)], "plan prune (streamed)")
        apply_prune = measure([moeslim, "apply", str(ckpt), str(prune_plan), "--stream", "--dtype", "bfloat16",
                               "--out", str(tmp / "pruned")], "apply prune (streamed)")
        shutil.rmtree(tmp / "pruned", ignore_errors=True)
        quant_plan = tmp / "quantize.json"
        plan_quant = measure([moeslim, "plan", "quantize", str(ckpt), *args.quantize.split(), "--quantizer",
                              args.quantizer, *streamed, "--out", str(quant_plan)], "plan quantize (streamed)")
        # Each layer is read, quantized (GPTQ: on the plan's windows), packed and written in turn.
        apply_quant = measure([moeslim, "apply", str(ckpt), str(quant_plan), "--stream", "--dtype", "bfloat16",
                               "--out", str(tmp / "quantized")], f"apply quantize ({args.quantizer}, streamed)")
        quantized_bytes = _bytes(tmp / "quantized")
        # The exports read one layer at a time: GGUF of the original checkpoint, compressed-tensors of the
        # quantized one (its experts re-packed); each output is removed once measured.
        export_gguf = measure([moeslim, "export", str(ckpt), "--format", "gguf", "--type", "F16", "--stream",
                               "--out", str(tmp / "model.gguf")], "export gguf F16 (streamed)")
        gguf_bytes = (tmp / "model.gguf").stat().st_size
        (tmp / "model.gguf").unlink()
        export_ct = measure([moeslim, "export", str(tmp / "quantized"), "--format", "compressed-tensors", "--stream",
                             "--out", str(tmp / "ct")], "export compressed-tensors (streamed, of the quantized)")
        ct_bytes = _bytes(tmp / "ct")
        shutil.rmtree(tmp / "ct", ignore_errors=True)
        shutil.rmtree(tmp / "quantized", ignore_errors=True)
        two = measure([torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", moeslim, *prune,
                       "--out", str(prune_plan2)], "plan prune, 2 gloo processes")
        layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
        print(f"per layer (streamed, 1 process): plan prune {plan_prune.seconds / layers:.2f} s, "
              f"plan quantize {plan_quant.seconds / layers:.2f} s, apply quantize {apply_quant.seconds / layers:.2f} s;"
              f" layer bytes {size / layers / 1e6:.0f} MB; quantized checkpoint {quantized_bytes / 1e9:.2f} GB;"
              f" export gguf {export_gguf.seconds / layers:.2f} s ({gguf_bytes / 1e9:.2f} GB F16 file), export"
              f" compressed-tensors {export_ct.seconds / layers:.2f} s ({ct_bytes / 1e9:.2f} GB)", flush=True)
        if args.gptq_layers > 0:
            gptq_section(tmp, args, moeslim, torchrun, size)
        identical = _same_plan(prune_plan, prune_plan2, rel_tol=1e-9)
        quantize = max(plan_quant.peak_rss, apply_quant.peak_rss)
        print(f"(the quantize line: {args.quantizer} on the {size / 1e9:.2f} GB checkpoint; the speedup line: "
              "plan prune --method enumerate, 1 vs 2 gloo processes)")
        print(f"scale peak-rss ratio plan-prune: {plan_prune.peak_rss / size:.2f}")
        print(f"scale peak-rss ratio apply-prune: {apply_prune.peak_rss / size:.2f}")
        print(f"scale peak-rss ratio quantize: {quantize / size:.2f}")
        print(f"scale peak-rss ratio export-gguf: {export_gguf.peak_rss / size:.2f}")
        print(f"scale peak-rss ratio export-ct: {export_ct.peak_rss / size:.2f}")
        print(f"scale distributed plans identical: {'yes' if identical else 'no'}")
        print(f"scale distributed speedup 2 procs: {plan_prune.seconds / two.seconds:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
