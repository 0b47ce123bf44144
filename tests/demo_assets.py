"""Helpers shared by the tests of the two bundled demo models (``assets/demo-moe`` and ``assets/demo-fine``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from moeslim._package import assets_dir

CORPUS_DIR = assets_dir() / "corpus"


def load_offline(model_dir: Path) -> tuple[Any, Any]:
    """(float32 model in eval mode, tokenizer) read from the package folder only, never from the Hub."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                                  local_files_only=True)
    return model.eval(), tok


def corpus_windows(tok: Any, domain: str, split: str, n_windows: int, context: int) -> torch.Tensor:
    """First ``n_windows`` windows (n_windows, context) of a corpus split's stream, built as the card script does
    (documents followed by EOS), tokenizing only as many documents as needed."""
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    with (CORPUS_DIR / f"{domain}.{split}.jsonl").open(encoding="utf-8") as f:
        for line in f:
            ids.extend(tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"])
            ids.append(eos)
            if len(ids) >= n_windows * context:
                break
    return torch.tensor(ids[: n_windows * context]).view(n_windows, context)
