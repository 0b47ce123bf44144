"""Packed attention and token embedding / head: the runtime (lookups and head equal to the dequantized weights),
save -> load, held bytes against the planner's accounting, and the joint planner's choices for them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import sample_ids, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.appliers.nonexpert import pack_nonexpert
from moeslim.evaluate.cost import param_bytes
from moeslim.models.held_bytes import held_bytes
from moeslim.models.nonexpert import token_matrices
from moeslim.plans import PlanError
from moeslim.runtime.packed_rows import PackedRows, quantize_rows

PROBE = sample_ids(7, 2, 12)


def _model(tied: bool, family: str = "olmoe") -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not tied:
            return tiny_model(family)
        config = tiny_config(family)
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0, 0.08)
        return model.eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_rows_equal_the_dequantized_matrix(bits: int) -> None:
    weight = torch.randn(40, 24)
    packed = quantize_rows(weight, bits, 16)
    rows = PackedRows(packed)
    dense = packed.dequantize()[0]
    assert torch.equal(rows.dequantize(), dense)
    ids = torch.tensor([[3, 0, 39], [7, 7, 12]])
    assert torch.equal(rows.rows(ids), dense[ids])
    x = torch.randn(5, 24)
    torch.testing.assert_close(rows.matmul(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    again = rows.to_lowbit()
    assert torch.equal(again.dequantize(), packed.dequantize())
    assert rows.nbytes() == 40 * 24 * bits // 8 + 40 * 2 * 2 + 40 * 2


def test_rows_refuse_rows_that_are_not_whole_bytes() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_rows(torch.randn(4, 13), 3, 8)


@pytest.mark.parametrize("tied", [True, False])
def test_packed_embedding_and_head_compute_the_dequantized_weights(tied: bool) -> None:
    model = _model(tied)
    matrices = token_matrices(model)
    assert matrices.tied == tied and matrices.head is not None
    emb_w = matrices.embedding.weight.detach().clone()
    head_w = matrices.head.weight.detach().clone()
    deq_emb = quantize_rows(emb_w, 4, 16).dequantize()[0]
    deq_head = quantize_rows(head_w, 4, 16).dequantize()[0]
    with torch.no_grad():
        reference = _model(tied)
        ref = token_matrices(reference)
        ref.embedding.weight.copy_(deq_emb)
        if not tied:
            ref.head.weight.copy_(deq_head)
        expected = reference(PROBE).logits
    before = held_bytes(model)
    section = pack_nonexpert(model, {}, 4, 16)
    assert list(section["packed_nonexpert"]["rows"].values())[0] == (
        ["model.embed_tokens.weight", "lm_head.weight"] if tied else ["model.embed_tokens.weight"])
    assert torch.equal(model.get_input_embeddings()(PROBE), deq_emb[PROBE])
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE).logits, expected, rtol=1e-4, atol=1e-4)
    v, h = emb_w.shape
    rows_bytes = v * h * 4 // 8 + v * (h // 16) * 3
    dense = v * h * 4
    assert before - held_bytes(model) == (dense - rows_bytes) * (1 if tied else 2)
    assert param_bytes(model)["quantized"] == rows_bytes * (1 if tied else 2)


@pytest.mark.parametrize("tied", [True, False])
def test_packed_nonexpert_save_load_round_trip(tmp_path: Path, tied: bool) -> None:
    model = _model(tied)
    section = pack_nonexpert(model, {0: 4, 1: 8}, 8, 16)
    model.config.moeslim = section
    with torch.no_grad():
        expected = model(PROBE).logits
    held = held_bytes(model)
    moeslim.save(model, tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _ = moeslim.load(tmp_path / "m")
    loaded.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, expected, rtol=0, atol=1e-5)
    assert torch.equal(loaded.get_input_embeddings()(PROBE), model.get_input_embeddings()(PROBE))
    assert held_bytes(loaded) == held
    assert token_matrices(loaded).tied == tied


def test_packing_twice_is_refused() -> None:
    model = _model(True)
    pack_nonexpert(model, {}, 8, 16)
    with pytest.raises(PlanError, match="already packed"):
        pack_nonexpert(model, {}, 4, 16)
    with pytest.raises(PlanError, match="no attention projections"):
        pack_nonexpert(model, {99: 4}, None, 16)
