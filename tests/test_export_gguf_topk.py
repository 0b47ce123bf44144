"""Skipping in GGUF files (export/gguf_topk.py): a reduced top-k written as expert_used_count; per-token skip
thresholds refused rather than dropped. llama.cpp runs the reduced top-k in benchmarks/engines.py (--top-k)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from test_export_gguf import _field, _runnable_model
from tiny_models import sample_ids
from transformers import AutoTokenizer

import moeslim
from moeslim.export import UnsupportedExportError, export_gguf
from moeslim.methods.skip import SkipConfig, plan_skip
from moeslim.models import resolve_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("demo"))


def test_reduced_top_k_is_the_files_expert_used_count(tokenizer, tmp_path: Path) -> None:
    model = _runnable_model("qwen3_moe", len(tokenizer))
    full = export_gguf(model, tokenizer, tmp_path / "full.gguf", qtype="F32")
    reduced = export_gguf(model, tokenizer, tmp_path / "top1.gguf", qtype="F32", top_k=1)
    assert (full.expert_used_count, reduced.expert_used_count) == (2, 1)
    a, b = GGUFReader(str(full.path)), GGUFReader(str(reduced.path))
    assert _field(b, "qwen3moe.expert_used_count") == 1 and _field(b, "qwen3moe.expert_count") == 8
    for ta, tb in zip(a.tensors, b.tensors, strict=True):  # the weights are the model's own
        assert ta.name == tb.name
        np.testing.assert_array_equal(np.array(ta.data), np.array(tb.data))
    for bad in (0, 3):
        with pytest.raises(UnsupportedExportError, match="between 1 and the model's top-2"):
            export_gguf(model, tokenizer, tmp_path / f"k{bad}.gguf", qtype="F32", top_k=bad)
        assert not (tmp_path / f"k{bad}.gguf").exists()


@pytest.mark.parametrize("rule", ["top2", "topk"])
def test_a_model_that_skips_per_token_is_refused(rule: str, tokenizer, tmp_path: Path) -> None:
    model = _runnable_model("qwen3_moe", len(tokenizer))
    moeslim.apply(model, plan_skip(model, sample_ids(0, 4, 16), SkipConfig(rule=rule)))
    with pytest.raises(UnsupportedExportError, match=f"skip rule '{rule}'.*--top-k"):
        export_gguf(model, tokenizer, tmp_path / "s.gguf", qtype="F32")
    assert not (tmp_path / "s.gguf").exists()


def test_cli_top_k(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from moeslim.cli import main

    out = tmp_path / "top1.gguf"
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--top-k", "1", "--out", str(out)]) == 0
    assert "top-1" in capsys.readouterr().out
    assert _field(GGUFReader(str(out)), "llama.expert_used_count") == 1
    assert main(["export", str(tiny_model_dir), "--format", "compressed-tensors", "--top-k", "1",
                 "--out", str(tmp_path / "ct")]) == 2
    assert "--top-k are GGUF options" in capsys.readouterr().err


def test_cli_top_k_streamed_is_the_same_file(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from moeslim.cli import main

    held, streamed = tmp_path / "held.gguf", tmp_path / "streamed.gguf"
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--top-k", "1", "--out", str(held)]) == 0
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--top-k", "1", "--stream",
                 "--out", str(streamed)]) == 0
    assert _field(GGUFReader(str(streamed)), "llama.expert_used_count") == 1
    assert held.read_bytes() == streamed.read_bytes()
