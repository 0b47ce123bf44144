"""GGUF export of non-uniformly pruned models: every layer padded to the largest expert count (export/gguf_pad.py).

The file written from the compact model (per-layer counts, ``moeslim.load``) is tensor for tensor the file
written from the same pruning in the padded layout (``select_experts(layout="padded")``), which stock
transformers runs with the compact model's logits: so the padded GGUF computes the non-uniform model (llama.cpp
runs it in benchmarks/engines.py). Routers without a per-expert bias are refused with the reason.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from test_export_gguf import _field, _runnable_model
from tiny_models import sample_ids
from transformers import AutoTokenizer

from moeslim.export import GGUF_FAMILIES, UnsupportedExportError, export_gguf
from moeslim.models import find_moe_layers, resolve_model_path, select_experts

# family -> kept experts per MoE layer (deepseek_v3: 2 groups of 4, padded per group)
KEPT = {
    "gpt_oss": {0: [0, 2, 3, 5, 7], 1: [1, 4, 6]},
    "deepseek_v3": {1: [0, 1, 4, 5], 2: [0, 1, 3, 4, 6, 7]},
    "glm4_moe": {1: [0, 2, 5], 2: [1, 2, 3, 4, 6]},
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("demo"))


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("family", sorted(KEPT))
def test_compact_model_is_written_as_its_padded_layout(family: str, tokenizer, tmp_path: Path) -> None:
    model = _runnable_model(family, len(tokenizer))
    compact, padded = copy.deepcopy(model), copy.deepcopy(model)
    select_experts(compact, KEPT[family], layout="compact")
    select_experts(padded, KEPT[family], layout="padded")
    counts = {m.layer_idx: m.num_experts for m in find_moe_layers(compact)}
    assert len(set(counts.values())) > 1
    ids = sample_ids(3, 2, 12) % len(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(padded(ids).logits, compact(ids).logits, rtol=0, atol=2e-5)
        assert not torch.allclose(compact(ids).logits, model(ids).logits, atol=1e-4)  # the pruning matters

    ours = export_gguf(compact, tokenizer, tmp_path / "compact.gguf", qtype="F32")
    reference = export_gguf(padded, tokenizer, tmp_path / "padded.gguf", qtype="F32")
    arch = GGUF_FAMILIES[family].name
    width = max(counts.values())
    assert ours.expert_count == width == _field(GGUFReader(str(ours.path)), f"{arch}.expert_count")
    a, b = _tensors(ours.path), _tensors(reference.path)
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # the padding is unselectable: -inf in the bias the router adds before choosing, in the padded slots only
    bias = "ffn_gate_inp.bias" if family == "gpt_oss" else "exp_probs_b.bias"
    small = min(counts, key=counts.get)
    assert int(np.isneginf(a[f"blk.{small}.{bias}"]).sum()) == width - counts[small]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_routers_without_a_per_expert_bias_are_refused(family: str, tokenizer, tmp_path: Path) -> None:
    model = _runnable_model(family, len(tokenizer))
    moe = [m.layer_idx for m in find_moe_layers(model)]
    select_experts(model, {moe[0]: [0, 1, 2], moe[1]: [0, 1, 2, 3, 4]}, layout="compact")
    with pytest.raises(UnsupportedExportError, match=r"cannot be padded to \d+: .*no per-expert logit bias"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype="F32")
    assert not (tmp_path / "m.gguf").exists()
