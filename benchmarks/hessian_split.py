"""Peak memory of GPTQ with and without the expert-group Hessian split, at DeepSeek-V3's per-expert shape.

Writes a one-decoder-layer random Mixtral-layout checkpoint whose experts have DeepSeek-V3's shape (hidden 7168,
expert intermediate 2048) but only ``--experts`` of them, plans a uniform GPTQ quantization, and applies it
streamed in a fresh process (1 thread) three ways, sampling the resident set size every 20 ms
(``benchmarks/scale.py``'s ``measure``): every expert's gate_up Hessian at once (the default) and ``--hessian-experts
1`` (``--hessian-memory`` picks the same group from a GiB limit; unit-tested). The packed checkpoints must be
identical. The per-expert
Hessian term of the memory model (docs/scale.md) is the measured difference divided by the experts it removes,
then extrapolated to 256 experts.

    python benchmarks/hessian_split.py --experts 3         # ~10-20 min on a shared 2-core machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import _same_tensors, measure  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 7168, 2048, 56, 8


def write_one_layer(folder: Path, experts: int, tokenizer_dir: Path) -> int:
    """A random one-layer Mixtral checkpoint (bfloat16) with ``experts`` experts of DeepSeek-V3's shape."""
    from transformers import AutoTokenizer, MixtralConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab, head = len(tokenizer), HIDDEN // HEADS
    folder.mkdir(parents=True)
    MixtralConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, num_local_experts=experts,
                  num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  dtype="bfloat16").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (std * torch.randn(*shape, generator=gen)).to(torch.bfloat16)

    p = "model.layers.0."
    tensors = {"model.embed_tokens.weight": rand(vocab, HIDDEN), "model.norm.weight": torch.ones(HIDDEN).bfloat16(),
               "lm_head.weight": rand(vocab, HIDDEN), p + "input_layernorm.weight": torch.ones(HIDDEN).bfloat16(),
               p + "post_attention_layernorm.weight": torch.ones(HIDDEN).bfloat16(),
               p + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
               p + "self_attn.k_proj.weight": rand(KV_HEADS * head, HIDDEN),
               p + "self_attn.v_proj.weight": rand(KV_HEADS * head, HIDDEN),
               p + "block_sparse_moe.gate.weight": rand(experts, HIDDEN, std=0.5 / HIDDEN ** 0.5)}
    for e in range(experts):
        q = f"{p}block_sparse_moe.experts.{e}."
        tensors.update({q + "w1.weight": rand(INTERMEDIATE, HIDDEN), q + "w3.weight": rand(INTERMEDIATE, HIDDEN),
                        q + "w2.weight": rand(HIDDEN, INTERMEDIATE)})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return (folder / "model.safetensors").stat().st_size


def hessian_phase(ckpt: str, group: int, tokens: int) -> None:
    """In this process: the GPTQ pass's Hessians of the checkpoint's one layer on ``tokens`` random block inputs,
    made as ``quantize_layer_experts`` makes them (group 0: every expert's by the observer at once; otherwise
    ``group`` experts at a time from the kept inputs), without the GPTQ solves (their memory does not depend on the
    split: one expert's working copies). Prints the Hessians made."""
    from moeslim.calibrate.hessians import up_hessians
    from moeslim.methods.quant.config import QuantizeConfig
    from moeslim.methods.quant.transform import gptq_observer
    from moeslim.models import find_moe_layers, load_model

    model, _ = load_model(ckpt, dtype=torch.bfloat16)
    layer = find_moe_layers(model)[0]
    config = QuantizeConfig(method="uniform", bits=4, starved="rtn", **({"hessian_experts": group} if group else {}))
    observer = gptq_observer(layer, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(tokens // 512):
            observer.observe(layer, torch.randn(512, HIDDEN, generator=gen).to(torch.bfloat16))
    summary = observer.result()
    made = sum(h is not None for h in summary.up)
    if group:
        experts = list(range(layer.num_experts))
        for start in range(0, len(experts), group):
            sums = up_hessians(layer, summary.inputs, set(experts[start:start + group]), batches=summary.batch_tokens)
            hessians = {e: h.float() for e, h in sums.items()}
            made += len(hessians)
            del sums, hessians
    print(f"{made} gate_up Hessians of {HIDDEN} x {HIDDEN}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--hessians-only", action="store_true",
                        help="measure the Hessian phase alone (no GPTQ solves: minutes instead of ~1.5 min/expert)")
    parser.add_argument("--phase", nargs=2, metavar=("CKPT", "GROUP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        hessian_phase(args.phase[0], int(args.phase[1]), args.samples * args.seq_len)
        return 0
    from moeslim.models import resolve_model_path

    moeslim = str(Path(sys.executable).parent / "moeslim")
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1] / ".scratch") as tmp_name:
        tmp = Path(tmp_name)
        ckpt = tmp / "one-layer"
        size = write_one_layer(ckpt, args.experts, Path(resolve_model_path("demo")))
        calib = ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        if args.hessians_only:
            me = [sys.executable, __file__, *calib, "--phase", str(ckpt)]
            whole = measure([*me, "0"], "Hessians, all experts at once")
            one = measure([*me, "1"], "Hessians, --hessian-experts 1")
            saved = (whole.peak_rss - one.peak_rss) / (args.experts - 1)
            print(f"\none layer, {args.experts} experts of 7168 x 2048 ({size / 1e9:.2f} GB bfloat16 checkpoint), "
                  f"{args.samples * args.seq_len} tokens: peak RSS {whole.peak_rss / 2**30:.2f} GiB all at once, "
                  f"{one.peak_rss / 2**30:.2f} GiB one expert at a time")
            print(f"measured per-expert Hessian term: {saved / 2**30:.2f} GiB (model: H^2 x 12 B = "
                  f"{HIDDEN * HIDDEN * 12 / 2**30:.2f} GiB: the float64 sum + its float32 rounding)")
            print(f"extrapolated to 256 experts: + {(256 - args.experts) * saved / 2**30:.0f} GiB of Hessians without "
                  "the split, + 0 with --hessian-experts 1")
            return 0
        runs = {"all experts at once": [], "--hessian-experts 1": ["--hessian-experts", "1"]}
        measured = {}
        for i, (label, extra) in enumerate(runs.items()):
            plan = tmp / f"plan{i}.json"  # the split is a GPTQ setting of the plan
            measure([moeslim, "plan", "quantize", str(ckpt), "--method", "uniform", "--bits", "4", *extra,
                     "--stream", "--dtype", "bfloat16", *calib, "--out", str(plan)], f"plan quantize {label}")
            measured[label] = measure([moeslim, "apply", str(ckpt), str(plan), "--stream", "--dtype", "bfloat16",
                                       "--out", str(tmp / f"q{i}")], f"apply GPTQ, {label}")
        same = all(_same_tensors(tmp / "q0", tmp / f"q{i}") for i in range(1, len(runs)))
        base, split = measured["all experts at once"].peak_rss, measured["--hessian-experts 1"].peak_rss
        saved = (base - split) / (args.experts - 1)
        print(f"\none layer, {args.experts} experts of 7168 x 2048 ({size / 1e9:.2f} GB bfloat16 checkpoint)")
        for label, m in measured.items():
            print(f"- {label}: {m.seconds:.0f} s, peak RSS {m.peak_rss / 2**30:.2f} GiB")
        print(f"packed checkpoints identical: {'yes' if same else 'NO'}")
        print(f"measured per-expert Hessian term: {saved / 2**30:.2f} GiB (model: H^2 x 12 B = "
              f"{HIDDEN * HIDDEN * 12 / 2**30:.2f} GiB: the float64 sum + its float32 rounding)")
        print(f"extrapolated to 256 experts: + {(256 - args.experts) * saved / 2**30:.0f} GiB of Hessians without the "
              "split, + 0 with --hessian-experts 1 (both + the layer's larger weights: 23 GB bfloat16 for DeepSeek-V3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
