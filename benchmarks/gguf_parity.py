"""moeslim's GGUF export against llama.cpp's own converter, on the same checkpoint folder.

    python benchmarks/gguf_parity.py FOLDER [FOLDER ...] --llama-cpp DIR [--work runs/gguf-parity]
    python benchmarks/gguf_parity.py --tiny mixtral:llama-spm qwen3_moe:qwen2 --vocab-dir DIR --llama-cpp DIR

DIR (``--llama-cpp``) is a llama.cpp source tree (llama-cpp-python's sdist vendors one: ``pip download --no-deps
--no-binary :all: llama-cpp-python``, unpack, ``vendor/llama.cpp``). Its ``convert_hf_to_gguf.py`` runs with this
Python and the tree's own gguf-py first on the path (torch and transformers are moeslim's); nothing is built.

Per folder both write F16 and the two files are compared: every ``tokenizer.ggml.*`` key and the hyper-parameters
(``ARCH.*``), and every tensor's name, shape, type and data. ``--tiny FAMILY:VOCAB`` first makes the folder: the
tiny model of FAMILY (tests/tiny_models.py, every layer MoE) with a real vocabulary, ``VOCAB`` being one of the
``ggml-vocab-VOCAB.gguf`` files of llama.cpp's ``models/`` folder (``--vocab-dir``) turned into a Hugging Face
tokenizer by transformers. Differences are printed one per line; known, explained ones are marked ``(expected)``.

Ends with, per folder:
    gguf parity FOLDER: tokenizer keys N/M equal, hparams N/M equal, tensors N/M equal
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

# Keys the converter writes from information moeslim does not carry or does not need (file naming, provenance).
_IGNORED = ("general.", "GGUF.")
# Differences we make on purpose (docs in src/moeslim/export/gguf_vocab.py): reason per key.
_EXPECTED = {
    "tokenizer.ggml.scores": "from tokenizer.json alone the converter writes -1000 for every token (llama.cpp then "
                             "merges left to right); moeslim rebuilds SentencePiece's scores from the merges (equal "
                             "to the converter's when tokenizer.model is there)",
    "tokenizer.ggml.token_type": "from tokenizer.json alone the converter types <unk> CONTROL; moeslim UNKNOWN, as "
                                 "SentencePiece does (and the converter with tokenizer.model)",
    "deepseek2.expert_gating_func": "transformers 5 configs carry no scoring_func and llama.cpp then assumes softmax; "
                                    "moeslim names the router transformers runs (V3: sigmoid), the converter "
                                    "writes nothing (llama.cpp's logits then differ)",
    "tokenizer.ggml.bos_token_id": "HunYuan: moeslim names <|bos|> (the converter's fixed id 127959 is that token in "
                                   "the published vocabulary); with the generic reader the converter keeps "
                                   "config.json's id",
    "tokenizer.ggml.add_space_prefix": "tokenizer_config.json has add_prefix_space: null, which the converter writes "
                                       "as False (no leading space, unlike the tokenizer's Metaspace); moeslim "
                                       "leaves llama.cpp's default",
}
# Families whose multi-token-prediction layers transformers drops (so moeslim's checkpoints never have them).
_NO_MTP = ("glm4_moe",)
# Tiny-config changes that make a family's tiny model one llama.cpp runs (every layer MoE where it needs that,
# V3-style group scores), and the added tokens the converter requires of a family's tokenizer.
_TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2_moe": {"mlp_only_layers": []}, "qwen3_moe": {"mlp_only_layers": []},
    "deepseek_v2": {"n_group": 1, "topk_group": 1, "q_lora_rank": 16}, "deepseek_v3": {"q_lora_rank": 16},
    "olmoe": {"num_key_value_heads": 4},
    # the per-layer lists the published HunYuan config.json has (transformers' own config class has ints)
    "hunyuan_v1_moe": {"moe_intermediate_size": [64] * 3, "moe_topk": [2] * 3, "num_shared_expert": [1] * 3}}
_TINY_TOKENS = {"glm4_moe": ["[gMASK]", "<|user|>", "<|observation|>", "<|endoftext|>"], "hunyuan_v1_moe": ["<|bos|>"]}
# Families whose converter reads the vocabulary only through the published tokenizer's remote code (HunYuan's
# tiktoken): their converter class runs with its generic byte-level BPE reader instead (module, class).
_GENERIC_VOCAB = {"hunyuan_v1_moe": ("hunyuan", "HunYuanMoEModel")}


def _fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if not key.startswith(_IGNORED):
            out[key] = fld.contents()
    return out


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), np.asarray(t.data))
            for t in GGUFReader(str(path)).tensors}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return bool(np.isclose(a, b, rtol=1e-6, atol=0))
    return bool(a == b)


def _show(value: Any) -> str:
    text = repr(value[:6]) + f"... ({len(value)})" if isinstance(value, list) and len(value) > 6 else repr(value)
    return text[:160]


def compare(ours: Path, theirs: Path) -> dict[str, tuple[int, int]]:
    """Print every difference; returns {group: (equal, total)} for tokenizer keys, hparams and tensors."""
    a, b = _fields(ours), _fields(theirs)
    groups: dict[str, list[bool]] = {"tokenizer keys": [], "hparams": [], "tensors": []}
    for key in sorted(set(a) | set(b)):
        group = "tokenizer keys" if key.startswith("tokenizer.") else "hparams"
        equal = key in a and key in b and _same(a[key], b[key])
        groups[group].append(equal)
        if not equal:
            note = f"  (expected: {_EXPECTED[key]})" if key in _EXPECTED else ""
            if key not in b and key not in _EXPECTED:
                note = "  (moeslim only: llama.cpp derives the same value when the key is absent)"
            print(f"  {key}: moeslim {_show(a.get(key, '<absent>'))} | converter {_show(b.get(key, '<absent>'))}{note}")
    ta, tb = _tensors(ours), _tensors(theirs)
    for name in sorted(set(ta) | set(tb)):
        equal = name in ta and name in tb and ta[name][:2] == tb[name][:2] and np.array_equal(ta[name][2],
                                                                                               tb[name][2])
        groups["tensors"].append(equal)
        if not equal:
            left = ta[name][:2] if name in ta else "<absent>"
            right = tb[name][:2] if name in tb else "<absent>"
            diff = ""
            if name in ta and name in tb and ta[name][1] == tb[name][1]:
                diff = f" max|diff| {np.abs(ta[name][2].astype(np.float64) - tb[name][2].astype(np.float64)).max():.3g}"
            print(f"  tensor {name}: moeslim {left} | converter {right}{diff}")
    return {g: (sum(v), len(v)) for g, v in groups.items()}


def convert(folder: Path, out: Path, llama_cpp: Path) -> None:
    """llama.cpp's converter on ``folder`` (F16), with the tree's gguf-py ahead of any installed one."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(llama_cpp / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    args = [str(folder), "--outtype", "f16", "--outfile", str(out)]
    if model_type in _NO_MTP:
        args.append("--no-mtp")  # transformers drops the MTP layers on load: neither file has them
    cmd = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), *args]
    if model_type in _GENERIC_VOCAB:
        cls = _GENERIC_VOCAB[model_type]
        cmd = [sys.executable, "-c", (
            f"import sys, runpy; sys.path.insert(0, {str(llama_cpp)!r}); sys.argv = ['convert', *{args!r}]\n"
            f"import conversion.{cls[0]} as family\nfrom conversion.base import TextModel\n"
            f"family.{cls[1]}.set_vocab = TextModel._set_vocab_gpt2\n"
            f"runpy.run_path({str(llama_cpp / 'convert_hf_to_gguf.py')!r}, run_name='__main__')")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the converter failed on {folder}:\n{result.stderr[-3000:]}")


def export(folder: Path, out: Path) -> None:
    """moeslim's export of ``folder`` (F16), through the same CLI users run."""
    from moeslim.cli import main

    out.unlink(missing_ok=True)
    if main(["export", str(folder), "--format", "gguf", "--type", "F16", "--out", str(out)]) != 0:
        raise SystemExit(f"moeslim export failed on {folder}")


def spm_tokenizer(work: Path) -> tuple[Any, Path]:
    """A SentencePiece BPE model with byte fallback trained on the bundled corpus (600 pieces), and the Hugging
    Face tokenizer transformers converts from it: a folder with both tokenizer.model and tokenizer.json, as
    Mixtral's and ERNIE's published ones (needs the sentencepiece and protobuf packages)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from moeslim.data.sources import load_source

    src = work / "spm-src"
    src.mkdir(parents=True, exist_ok=True)
    docs = load_source("demo:prose:test").documents[:50]
    lines = [line for text in docs for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(src / "tokenizer"),
                                   vocab_size=600, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                           "eos_token": "</s>", "unk_token": "<unk>"}))
    return AutoTokenizer.from_pretrained(str(src)), src / "tokenizer.model"


def tiny_folder(spec: str, vocab_dir: Path, work: Path) -> Path:
    """FAMILY:VOCAB -> a saved tiny checkpoint of FAMILY with llama.cpp's ggml-vocab-VOCAB tokenizer (``spm``: a
    SentencePiece model trained here, written with its tokenizer.model)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from tiny_models import _reinit, tiny_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    family, vocab = spec.split(":")
    sp_model = None
    if vocab == "spm":
        tokenizer, sp_model = spm_tokenizer(work)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(vocab_dir), gguf_file=f"ggml-vocab-{vocab}.gguf")
    tokenizer.add_special_tokens({"additional_special_tokens": _TINY_TOKENS.get(family, [])})
    config = tiny_config(family, len(tokenizer))
    for key, value in _TINY_OVERRIDES.get(family, {}).items():
        setattr(config, key, value)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, key, getattr(tokenizer, key))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit(model, 0)
    folder = work / f"{family}-{vocab}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if sp_model is not None:
        shutil.copy(sp_model, folder / "tokenizer.model")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree")
    parser.add_argument("--tiny", nargs="*", default=[], help="FAMILY:VOCAB tiny checkpoints to make first")
    parser.add_argument("--vocab-dir", type=Path, help="llama.cpp's models/ folder (default: DIR/models)")
    parser.add_argument("--work", type=Path, default=Path("runs/gguf-parity"))
    args = parser.parse_args()
    if not (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        parser.error(f"--llama-cpp {args.llama_cpp}: no convert_hf_to_gguf.py there")
    args.work.mkdir(parents=True, exist_ok=True)
    vocab_dir = args.vocab_dir or args.llama_cpp / "models"
    folders = list(args.folders) + [tiny_folder(spec, vocab_dir, args.work) for spec in args.tiny]
    summary = []
    for folder in folders:
        ours, theirs = args.work / f"{folder.name}.moeslim.gguf", args.work / f"{folder.name}.converter.gguf"
        export(folder, ours)
        convert(folder, theirs, args.llama_cpp)
        print(f"{folder}:")
        counts = compare(ours, theirs)
        summary.append(f"gguf parity {folder.name}: " + ", ".join(f"{g} {e}/{t} equal" for g, (e, t) in counts.items()))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
