"""llama.cpp's logits through moeslim's GGUF files against transformers', per exported family (tiny models).

    python benchmarks/gguf_logits.py [--families mixtral qwen2_moe ...] [--keep K] [--bits B] [--work runs/gguf-logits]

Each family's tiny model (tests/tiny_models.py, with the tiny changes llama.cpp needs: every layer MoE where its
graph wants that, V3-style group scores) carries a tiny byte-level BPE tokenizer (tests/tiny_tokenizers.py), is
written as F32 by ``export_gguf`` and run by llama.cpp (llama-cpp-python from benchmarks/engines.py's venv) on the
same 12 token ids as transformers (eager attention, float32). ``--keep K`` first prunes every MoE layer to its
experts 0..K-1 (moeslim's ``select_experts``), so the pruned layout is what both run; ``--bits B`` then quantizes
the experts with moeslim (uniform B-bit GPTQ, groups of 16, on sample ids): the file holds them dequantized in F32,
and transformers runs moeslim's quantized model.

Ends with, per family:
    gguf logits FAMILY: max |diff| X.XXe-XX (logits' max |value| Y.YY)
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


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root / "tests"), str(Path(__file__).resolve().parent)]
    import numpy as np
    import torch
    from engines import ensure_llama_env
    from tiny_models import _reinit, sample_ids, tiny_config
    from tiny_tokenizers import byte_level_bpe
    from transformers import AutoModelForCausalLM

    import moeslim
    from moeslim.export import GGUF_FAMILIES, export_gguf
    from moeslim.methods.quant.config import QuantizeConfig
    from moeslim.methods.quant.driver import plan_quantize
    from moeslim.models import find_moe_layers, select_experts

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=sorted(GGUF_FAMILIES))
    parser.add_argument("--work", type=Path, default=Path("runs/gguf-logits"))
    parser.add_argument("--keep", type=int, default=None, help="prune every MoE layer to experts 0..K-1 first")
    parser.add_argument("--bits", type=int, default=None, help="quantize the experts with moeslim first")
    parser.add_argument("--engines-work", type=Path, default=Path("runs/engines"))
    args = parser.parse_args()
    python, _, _ = ensure_llama_env(args.engines_work)
    args.work.mkdir(parents=True, exist_ok=True)
    runnable = {"qwen2_moe": {"mlp_only_layers": []}, "qwen3_moe": {"mlp_only_layers": []},
                "deepseek_v2": {"n_group": 1, "topk_group": 1, "q_lora_rank": 16}, "deepseek_v3": {"q_lora_rank": 16},
                "olmoe": {"num_key_value_heads": 4}}
    tokenizer = byte_level_bpe("gpt2")
    ids = sample_ids(0, 1, 12)[0].tolist()
    summary = []
    for family in args.families:
        config = tiny_config(family, len(tokenizer))
        for key, value in runnable.get(family, {}).items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        _reinit(model, 0)
        model.eval()
        if args.keep is not None:
            select_experts(model, {layer.layer_idx: list(range(args.keep)) for layer in find_moe_layers(model)})
        if args.bits is not None:
            calib = sample_ids(1, 4, 16) % len(tokenizer)
            plan = plan_quantize(model, calib, QuantizeConfig(method="uniform", bits=args.bits, group_size=16))
            moeslim.apply(model, plan, calibration=calib)
        path = args.work / f"{family}.gguf"
        path.unlink(missing_ok=True)
        export_gguf(model, tokenizer, path, qtype="F32")
        job, out = args.work / f"{family}.job.json", args.work / f"{family}.logits.json"
        job.write_text(json.dumps({"model": str(path), "ids": ids, "out": str(out)}))
        run = subprocess.run([str(python), "-c", _WORKER, str(job)], capture_output=True, text=True, check=False)
        if run.returncode != 0:
            summary.append(f"gguf logits {family}: llama.cpp failed: {run.stderr.strip().splitlines()[-1]}")
            continue
        theirs = np.asarray(json.loads(out.read_text()))
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].double().numpy()
        summary.append(f"gguf logits {family}: max |diff| {np.abs(theirs - ours).max():.2e} "
                       f"(logits' max |value| {np.abs(ours).max():.2f})")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
