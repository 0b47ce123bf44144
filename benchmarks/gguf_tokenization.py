"""llama.cpp's tokenization through moeslim's GGUF files equals llama.cpp's own fixtures, per real vocabulary.

    python benchmarks/gguf_tokenization.py --llama-cpp DIR [--vocabs llama-spm qwen2 gpt-2 starcoder]
        [--work runs/gguf-tokenization]

For each ``ggml-vocab-VOCAB.gguf`` of llama.cpp's ``models/`` folder (DIR/models): transformers turns it into a
Hugging Face tokenizer, a tiny Mixtral (SentencePiece vocabularies) or Qwen3-MoE (BPE) checkpoint carries it,
``moeslim export --format gguf`` writes it, and llama.cpp (llama-cpp-python, built from source in its own venv by
benchmarks/engines.py) tokenizes every text of ``VOCAB.gguf.inp`` through our file as llama.cpp's test-tokenizer-0
does (no BOS, no special-token parsing). Each result is compared with the ids of ``VOCAB.gguf.out`` and with
transformers' tokenizer.

Ends with, per vocabulary:
    gguf tokenization VOCAB: N/M texts equal to llama.cpp's fixture (transformers: K/M)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SEPARATOR = "\n__ggml_vocab_test__\n"
VOCABS = ("llama-spm", "qwen2", "gpt-2", "starcoder")
_WORKER = """
import json, sys
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
llm = Llama(model_path=job["model"], vocab_only=True, verbose=False)
out = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text in job["texts"]]
json.dump(out, open(job["out"], "w"))
"""


def fixture(models: Path, vocab: str) -> tuple[list[str], list[list[int]]]:
    """(texts, llama.cpp's ids) of ``ggml-vocab-VOCAB.gguf.inp`` / ``.out``."""
    texts = (models / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    lines = (models / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    texts, lines = texts[:-1] if texts[-1] == "" else texts, lines[:-1] if lines[-1] == "" else lines
    if len(texts) != len(lines):
        raise SystemExit(f"ggml-vocab-{vocab}: {len(texts)} texts but {len(lines)} id lines")
    return texts, [[int(t) for t in line.split()] for line in lines]


def tokenization_lines(python: Path, models: Path, vocabs: list[str], work: Path) -> list[str]:
    """One ``gguf tokenization VOCAB: ...`` line per vocabulary of llama.cpp's ``models`` folder; ``python``: the
    engines venv's interpreter (llama-cpp-python)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gguf_parity import export, tiny_folder
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    summary = []
    for vocab in vocabs:
        family = "mixtral" if "spm" in vocab else "qwen3_moe"
        folder = tiny_folder(f"{family}:{vocab}", models, work)
        gguf_path = work / f"{vocab}.gguf"
        export(folder, gguf_path)
        texts, expected = fixture(models, vocab)
        job = work / f"{vocab}.job.json"
        result = work / f"{vocab}.ids.json"
        job.write_text(json.dumps({"model": str(gguf_path), "texts": texts, "out": str(result)}))
        run = subprocess.run([str(python), "-c", _WORKER, str(job)], capture_output=True, text=True, check=False)
        if run.returncode != 0:
            tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
            summary.append(f"gguf tokenization {vocab}: llama.cpp failed to load our file (exit {run.returncode}: "
                           f"{tail})")
            continue
        got = json.loads(result.read_text())
        hf = AutoTokenizer.from_pretrained(str(folder))
        ours = sum(g == e for g, e in zip(got, expected, strict=True))
        theirs = sum(hf(t, add_special_tokens=False)["input_ids"] == e for t, e in zip(texts, expected, strict=True))
        for text, g, e in zip(texts, got, expected, strict=True):
            if g != e:
                print(f"  {vocab} {text[:40]!r}: llama.cpp via moeslim {g[:12]} | fixture {e[:12]}")
        summary.append(f"gguf tokenization {vocab}: {ours}/{len(texts)} texts equal to llama.cpp's fixture "
                       f"(transformers: {theirs}/{len(texts)})")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (its models/ folder)")
    parser.add_argument("--vocabs", nargs="*", default=list(VOCABS))
    parser.add_argument("--work", type=Path, default=Path("runs/gguf-tokenization"))
    parser.add_argument("--engines-work", type=Path, default=Path("runs/engines"),
                        help="where benchmarks/engines.py keeps (or builds) the llama.cpp venv")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llama_env import ensure_llama_env

    python, _, _ = ensure_llama_env(args.engines_work)
    print("\n".join(tokenization_lines(python, args.llama_cpp / "models", args.vocabs, args.work)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
