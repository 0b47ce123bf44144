"""llm-compressor's GPTQ W4A16 of a model's experts on given calibration windows: the peer side of quant_quality.py.

Runs in llm-compressor's own virtual environment (it pins its own transformers and compressed-tensors), never in
moeslim's; ``benchmarks/quant_quality.py --llmcompressor-python PATH`` calls it with the windows moeslim calibrates
on and evaluates the folder it writes (a compressed-tensors checkpoint) with stock ``from_pretrained``.

    python benchmarks/llmcompressor_gptq.py --model DIR --calib windows.safetensors --group-size 64 --out DIR

Settings are llm-compressor's GPTQ defaults (damping 0.01, block 128, act-order "static", every expert calibrated
on all tokens) on a symmetric 4-bit int scheme with groups of ``--group-size``, targeting the expert projections
only (attention, router and lm_head stay as they are, as in moeslim's expert quantization).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

EXPERTS = r"re:.*experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)$"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="safetensors file with input_ids (N, L)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--actorder", default="static", help="act-order: static | group | weight | none")
    parser.add_argument("--routed-only", action="store_true", help="moe_calibrate_all_experts=False")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(args.calib)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=True, strategy="group",
                               group_size=args.group_size)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=[EXPERTS], weights=weights)},
                          ignore=["lm_head"], actorder=None if args.actorder == "none" else args.actorder)
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=int(ids.shape[0]),
            max_seq_length=int(ids.shape[1]), moe_calibrate_all_experts=not args.routed_only,
            shuffle_calibration_samples=False)
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    config = json.loads((Path(args.out) / "config.json").read_text())
    print(json.dumps(config.get("quantization_config", {}).get("config_groups", {})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
