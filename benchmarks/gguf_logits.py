"""llama.cpp's logits through moeslim's GGUF files against transformers', per exported family (tiny models).

    python benchmarks/gguf_logits.py [--families mixtral qwen2_moe ...] [--keep K] [--bits B] [--nonuniform]
        [--nonexpert W] [--work runs/gguf-logits]

Each family's tiny model (tests/tiny_models.py, with the tiny changes llama.cpp needs: every layer MoE where its
graph wants that, V3-style group scores) carries a tiny byte-level BPE tokenizer (tests/tiny_tokenizers.py), is
written as F32 by ``export_gguf`` and run by llama.cpp (llama-cpp-python from the venv that
benchmarks/llama_env.py builds) on the same 12 token ids as transformers (eager attention, float32). ``--keep K``
first prunes every MoE layer to its experts 0..K-1 (moeslim's ``select_experts``), so the pruned layout is what
both run; ``--bits B`` then quantizes
the experts with moeslim (uniform B-bit GPTQ, groups of 16, on sample ids): the file holds them dequantized in F32,
and transformers runs moeslim's quantized model. ``--nonexpert W`` packs every decoder layer's attention
projections and the token embedding / output head at W bits (a joint plan's ``--attention-widths`` /
``--embedding-widths``, groups of 16) before the export: the file holds them dequantized.

``--nonuniform`` prunes the families whose routers hold padding to unequal per-layer counts (compact layout);
their files pad every layer to the largest count (export/gguf_pad.py).

Ends with, per family:
    gguf logits [nonuniform |nonexpert-W ]FAMILY: max |diff| X.XXe-XX (logits' max |value| Y.YY)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_WORKER = """
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["model"], n_ctx=64, logits_all=True, verbose=False, n_threads=2)
llm.eval(job["ids"])
json.dump(np.asarray(llm.scores[: len(job["ids"])], dtype=np.float64).tolist(), open(job["out"], "w"))
"""


# Tiny-config changes that give a model llama.cpp runs (as tests/test_export_gguf.py's _RUNNABLE).
# Mixtral's expert rows of 64 (not the tiny 48) fit llama.cpp's 32-weight blocks, so its PMQ file can mix types.
RUNNABLE = {"mixtral": {"intermediate_size": 64}, "qwen2_moe": {"mlp_only_layers": []},
            "qwen3_moe": {"mlp_only_layers": []},
            "deepseek_v2": {"n_group": 1, "topk_group": 1, "q_lora_rank": 16}, "deepseek_v3": {"q_lora_rank": 16},
            "olmoe": {"num_key_value_heads": 4}}
# Non-uniform pruning of the families whose routers can hold padding (export/gguf_pad.py): kept experts per MoE
# layer, unequal counts (deepseek_v3: 2 groups of 4, balanced per group).
NONUNIFORM = {"gpt_oss": {0: [0, 2, 3, 5, 7], 1: [1, 4, 6]},
              "deepseek_v3": {1: [0, 1, 4, 5], 2: [0, 1, 3, 4, 6, 7]},
              "glm4_moe": {1: [0, 2, 5], 2: [1, 2, 3, 4, 6]}}


def logit_lines(python: Path, families: list[str], work: Path, keep: int | None = None, bits: int | None = None,
                nonuniform: bool = False, nonexpert: int | None = None) -> list[str]:
    """One ``gguf logits FAMILY: max |diff| ...`` line per family: llama.cpp (``python``: the engines venv) on
    moeslim's F32 file against transformers on the same 12 ids. ``nonuniform``: each family pruned to its
    ``NONUNIFORM`` kept sets in the compact layout (the file pads every layer to the largest count)."""
    root = Path(__file__).resolve().parents[1]
    if str(root / "tests") not in sys.path:
        sys.path.insert(0, str(root / "tests"))
    import numpy as np
    import torch
    from tiny_models import _reinit, sample_ids, tiny_config
    from tiny_tokenizers import byte_level_bpe
    from transformers import AutoModelForCausalLM

    import moeslim
    from moeslim.appliers.nonexpert import pack_nonexpert
    from moeslim.export import export_gguf
    from moeslim.methods.quant.config import QuantizeConfig
    from moeslim.methods.quant.driver import plan_quantize
    from moeslim.models import find_moe_layers, select_experts

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_bpe("gpt2")
    ids = sample_ids(0, 1, 12)[0].tolist()
    tag = ("nonuniform " if nonuniform else "") + (f"nonexpert-{nonexpert} " if nonexpert is not None else "")
    summary = []
    for family in families:
        config = tiny_config(family, len(tokenizer))
        for key, value in RUNNABLE.get(family, {}).items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        _reinit(model, 0)
        model.eval()
        if nonuniform:
            select_experts(model, NONUNIFORM[family], layout="compact")
        if keep is not None:
            select_experts(model, {layer.layer_idx: list(range(keep)) for layer in find_moe_layers(model)})
        if bits is not None:
            calib = sample_ids(1, 4, 16) % len(tokenizer)
            plan = plan_quantize(model, calib, QuantizeConfig(method="uniform", bits=bits, group_size=16))
            moeslim.apply(model, plan, calibration=calib)
        if nonexpert is not None:
            pack_nonexpert(model, dict.fromkeys(range(config.num_hidden_layers), nonexpert), nonexpert, 16)
        name = f"{family}{'-nonuniform' if nonuniform else ''}{f'-nonexpert{nonexpert}' if nonexpert else ''}"
        path = work / f"{name}.gguf"
        path.unlink(missing_ok=True)
        export_gguf(model, tokenizer, path, qtype="F32")
        job, out = work / f"{name}.job.json", work / f"{name}.logits.json"
        job.write_text(json.dumps({"model": str(path), "ids": ids, "out": str(out)}))
        run = subprocess.run([str(python), "-c", _WORKER, str(job)], capture_output=True, text=True, check=False)
        if run.returncode != 0:
            summary.append(f"gguf logits {tag}{family}: llama.cpp failed: {run.stderr.strip().splitlines()[-1]}")
            continue
        theirs = np.asarray(json.loads(out.read_text()))
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].double().numpy()
        summary.append(f"gguf logits {tag}{family}: max |diff| {np.abs(theirs - ours).max():.2e} "
                       f"(logits' max |value| {np.abs(ours).max():.2f})")
    return summary


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llama_env import ensure_llama_env

    from moeslim.export import GGUF_FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=sorted(GGUF_FAMILIES))
    parser.add_argument("--work", type=Path, default=Path("runs/gguf-logits"))
    parser.add_argument("--keep", type=int, default=None, help="prune every MoE layer to experts 0..K-1 first")
    parser.add_argument("--bits", type=int, default=None, help="quantize the experts with moeslim first")
    parser.add_argument("--nonuniform", action="store_true",
                        help="prune the paddable families non-uniformly first (compact layout, padded in the file)")
    parser.add_argument("--nonexpert", type=int, default=None,
                        help="pack attention and the token embedding / head at these bits first")
    parser.add_argument("--engines-work", type=Path, default=Path("runs/engines"))
    args = parser.parse_args()
    python, _, _ = ensure_llama_env(args.engines_work)
    families = [f for f in args.families if f in NONUNIFORM] if args.nonuniform else args.families
    print("\n".join(logit_lines(python, families, args.work, args.keep, args.bits, args.nonuniform,
                                 args.nonexpert)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
