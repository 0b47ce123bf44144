"""Shared test settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Tests run offline: a stray hub lookup must fail at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tiny models are dominated by per-op overhead, which a second thread only adds to on 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mixtral checkpoint folder with the demo model's tokenizer (for CLI / recipe tests)."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from moeslim.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(os.environ.get("MOESLIM_TEST_TOKENIZER") or resolve_model_path("demo"))
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)  # spread routing so every expert is used
    path = tmp_path_factory.mktemp("tiny") / "tiny-mixtral"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prune_plan(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A frequency keep-4 prune plan of ``tiny_model_dir`` made by the CLI (for apply / error tests)."""
    from moeslim.cli import main

    plan = tmp_path_factory.mktemp("plans") / "p.json"
    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    assert main(["plan", "prune", str(tiny_model_dir), "--method", "frequency", "--keep", "4", *calib,
                 "--out", str(plan)]) == 0
    return plan
