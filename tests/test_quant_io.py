"""Low-bit checkpoints: quantize -> pack -> save -> load gives the in-memory model; bytes match accounting."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from tiny_models import sample_ids, tiny_model

import moeslim.io
from moeslim.appliers import apply
from moeslim.methods.quant.driver import QuantizeConfig, plan_quantize
from moeslim.methods.quant.pack import bits_accounting
from moeslim.models import find_moe_layers
from moeslim.runtime.lowbit_io import (
    BASE_FILE,
    LOWBIT_FILE,
    load_quantized,
    lowbit_tensors,
    quantized_nbytes,
    save_quantized,
)

CALIB = sample_ids(0, 4, 24)


PROBE = sample_ids(7, 2, 16)


def _quantized(family: str, **kwargs: object) -> torch.nn.Module:
    model = tiny_model(family)
    config = QuantizeConfig(**{"method": "pmq", "bits": 2.5, "group_size": 16, **kwargs})  # type: ignore[arg-type]
    return apply(model, plan_quantize(model, CALIB, config, "tiny"), calibration=CALIB)


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    # The tiny models run eager attention; a model rebuilt from config.json would pick sdpa (1e-6 noise).
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_save_load_gives_the_same_model(family: str, tmp_path: Path) -> None:
    model = _quantized(family)
    ref = model(PROBE).logits
    save_quantized(model, tmp_path)
    loaded, tokenizer = load_quantized(tmp_path)
    assert tokenizer is None
    loaded = _eager(loaded)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    torch.testing.assert_close(loaded(PROBE).logits, ref, rtol=0, atol=0)
    before, after = lowbit_tensors(model), lowbit_tensors(loaded)
    assert sorted(before) == sorted(after) and len(before) == 2 * len(find_moe_layers(model))
    assert all(before[k].bits == after[k].bits for k in before)
    assert loaded.config.moeslim["quantize"] == model.config.moeslim["quantize"]


def test_in_memory_model_computes_from_packed_experts() -> None:
    model = _quantized("mixtral")
    names = {n for n, _ in model.named_parameters()}
    reference = tiny_model("mixtral")
    with torch.no_grad():
        for name, packed in lowbit_tensors(model).items():
            assert name not in names  # no float copy: the experts are held packed
            reference.get_parameter(name).copy_(packed.dequantize())
    torch.testing.assert_close(model(PROBE).logits, reference(PROBE).logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(tiny_model("mixtral")(PROBE).logits, model(PROBE).logits)


def test_moeslim_io_round_trip_with_attention(tmp_path: Path) -> None:
    model = _quantized("qwen3_moe", quantize_attention=4)
    names = lowbit_tensors(model)
    assert any("self_attn.q_proj" in n for n in names)
    ref = model(PROBE).logits
    out = moeslim.io.save(model, tmp_path / "ckpt")
    loaded, _ = moeslim.io.load(out)
    torch.testing.assert_close(_eager(loaded)(PROBE).logits, ref, rtol=0, atol=1e-6)
    assert sorted(lowbit_tensors(loaded)) == sorted(names)


def _tensor_bytes(path: Path) -> tuple[int, dict]:
    """Payload bytes of a safetensors file (file size minus its header) and its header."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    return len(raw) - 8 - header_len, header


def test_disk_bytes_match_accounting(tmp_path: Path) -> None:
    model = _quantized("mixtral")
    save_quantized(model, tmp_path)
    payload, header = _tensor_bytes(tmp_path / LOWBIT_FILE)
    meta = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k.endswith((".qmeta", ".qbits")))
    assert payload == quantized_nbytes(model) + meta
    section = model.config.moeslim["quantize"]
    bits_total = 0
    for layer in find_moe_layers(model):
        widths = section["bits"][str(layer.layer_idx)]
        for w in (layer.experts.gate_up_proj, layer.experts.down_proj):  # meta placeholders: shapes only
            acc = bits_accounting(widths, int(w[0].numel()), section["group_size"], in_features=int(w.shape[2]))
            bits_total += acc.code_bits + acc.overhead_bits
    # tiny shapes are byte-aligned per expert, so packed bytes are exactly the accounted bits / 8
    assert quantized_nbytes(model) * 8 == bits_total
    n_expert = sum(int(torch.Size(p.shape).numel()) for p in lowbit_tensors(model).values())
    assert bits_total / n_expert == pytest.approx(section["avg_bits_with_overhead"])
    # the base file holds everything else, nothing twice
    base_payload, base_header = _tensor_bytes(tmp_path / BASE_FILE)
    expert_names = set(lowbit_tensors(model))
    assert not expert_names & set(base_header)
    others = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in expert_names)
    assert base_payload == others


def test_save_needs_a_quantized_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no low-bit parameters"):
        save_quantized(tiny_model("mixtral"), tmp_path)
    with pytest.raises(FileNotFoundError, match="not a moeslim quantized checkpoint"):
        load_quantized(tmp_path)
