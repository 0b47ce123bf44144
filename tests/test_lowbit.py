"""Bit-packing, bits accounting, and low-bit storage of fused expert tensors (save/load round trip)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeslim.calibrate.hessians import accumulate_hessian
from moeslim.methods.quant.fused import LowBitTensor, quantize_fused
from moeslim.methods.quant.gptq import gptq_quantize, rtn_quantize
from moeslim.methods.quant.pack import bits_accounting, pack_bits, packed_nbytes, unpack_bits

# ---- pack.py ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 13, 64, 1001])
def test_pack_round_trip(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_little_endian_within_bytes() -> None:
    # 3-bit codes 1, 2, 7: stream bits (LSB first) 100 010 111 -> byte0 = 0b11010001, byte1 = 0b1.
    packed = pack_bits(torch.tensor([1, 2, 7], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b11010001, 0b1]
    assert pack_bits(torch.tensor([1, 0, 3, 2]), 2).tolist() == [0b10110001]


def test_pack_large_spans_chunks() -> None:
    n = 8 * 2**19 + 37  # more than one internal chunk, odd length
    codes = torch.randint(0, 8, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_bits(pack_bits(codes, 3), 3, n), codes)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)


def test_bits_accounting() -> None:
    # Mixtral-like numbers: 2.5 average bits, group 128, fp16 scales, zeros at the code width.
    acc = bits_accounting([2, 3, 2, 3], 128 * 4, group_size=128)
    assert acc.avg_bits == 2.5
    assert acc.avg_bits_with_overhead == pytest.approx(2.5 + (16 + 2.5) / 128)
    acc16 = bits_accounting([16, 2], [100, 300], group_size=100, zero_bits=0)
    assert acc16.code_bits == 16 * 100 + 2 * 300 and acc16.overhead_bits == 3 * 16
    # A partial last group per row counts as a group of its own.
    assert bits_accounting([4], 2 * 200, 128, in_features=200).overhead_bits == 2 * 2 * (16 + 4)


# ---- lowbit.py ----------------------------------------------------------------------------------


def _experts(n_experts: int = 4, d1: int = 48, d2: int = 256, dtype: torch.dtype = torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n_experts, d1, d2, generator=gen) * 0.05).to(dtype)


def _hessians(n_experts: int, n_in: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_experts):
        X = torch.randn(128, 16, generator=gen) @ torch.randn(16, n_in, generator=gen)
        out.append(accumulate_hessian(None, X + 0.1 * torch.randn(128, n_in, generator=gen)))
    return out


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_round_trip_through_safetensors(tmp_path: Path, transposed: bool, method: str) -> None:
    bits = [2, 16, 3, 1]
    tensor = _experts()  # (E, 48, 256): out=48, in=256, or in=48, out=256 when transposed
    n_in = 48 if transposed else 256
    hessians = _hessians(4, n_in) if method == "gptq" else None
    lb = quantize_fused(tensor, bits, 128, hessians, method, transposed=transposed)
    in_memory = lb.dequantize()
    assert in_memory.shape == tensor.shape and in_memory.dtype == tensor.dtype

    prefix = "model.layers.0.mlp.experts.gate_up_proj"
    save_file(lb.to_state_dict(prefix), tmp_path / "experts.safetensors")
    loaded = LowBitTensor.from_state_dict(load_file(tmp_path / "experts.safetensors"), prefix)
    assert loaded.bits == bits and loaded.transposed == transposed and loaded.shape == tuple(tensor.shape)
    assert torch.equal(loaded.dequantize(), in_memory)
    # The 16-bit expert is untouched; quantized experts are not.
    assert torch.equal(in_memory[1], tensor[1])
    assert not torch.equal(in_memory[0], tensor[0])


def test_stored_experts_equal_gptq_output_and_groups_run_along_input() -> None:
    tensor = _experts(2, 256, 48, torch.float32)  # transposed layout: (E, in=256, out=48)
    hessians = _hessians(2, 256)
    lb = quantize_fused(tensor, [3, 4], 128, hessians, "gptq", transposed=True)
    assert lb.out_in == (48, 256) and lb.n_groups == 2
    for e, b in enumerate([3, 4]):
        q = gptq_quantize(tensor[e].T, hessians[e], b, 128, scale_dtype=torch.float16)
        assert torch.equal(lb.dequantize_expert(e), q.weight.T)
        assert lb.scales[e].shape == (48, 2)


def test_gptq_without_calibration_falls_back_to_rtn() -> None:
    tensor = _experts(2, 32, 64, torch.float32)
    zero_h = torch.zeros(64, 64)
    lb = quantize_fused(tensor, [4, 4], 64, [None, zero_h], "gptq")
    rtn = quantize_fused(tensor, [4, 4], 64, None, "rtn")
    assert torch.equal(lb.dequantize(), rtn.dequantize())
    # GPTQ on a zero Hessian would have zeroed every (dead) column.
    assert (lb.dequantize()[1] != 0).any(dim=0).all()


def test_nbytes_matches_accounting() -> None:
    bits = [2, 3, 16, 1, 4]
    tensor = _experts(5, 64, 256)  # every stream is byte aligned: 64 * 256 codes, 64 * 2 zeros
    lb = quantize_fused(tensor, bits, 128, None, "rtn")
    acc = bits_accounting(bits, 64 * 256, group_size=128, scale_bits=16, in_features=256)
    expected = (acc.code_bits + acc.overhead_bits) // 8
    # codes 64*256*(2+3+1+4)/8 = 20480, dense 64*256*2 = 32768, scales 4*128*2 = 1024, zeros 64*2*10/8 = 160
    assert expected == 20480 + 32768 + 1024 + 160 == 54432
    assert lb.nbytes() == expected
    assert acc.avg_bits == pytest.approx(26 / 5)
    assert acc.avg_bits_with_overhead == pytest.approx(expected * 8 / (5 * 64 * 256))


def test_quantize_fused_validates() -> None:
    tensor = _experts(2, 8, 16)
    with pytest.raises(ValueError, match="one width per expert"):
        quantize_fused(tensor, [2], 16)
    with pytest.raises(ValueError, match="1..8 or 16"):
        quantize_fused(tensor, [2, 12], 16)
    with pytest.raises(ValueError, match="method"):
        quantize_fused(tensor, [2, 2], 16, method="awq")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="qmeta"):
        LowBitTensor.from_state_dict({}, "x")


@pytest.mark.parametrize("act_order", [False, True])
def test_mixed_widths_are_each_expert_quantized_alone(act_order: bool) -> None:
    """quantize_fused GPTQs each width's experts as one batch: every expert's codes, scales and zeros are those of
    its own GPTQ (or round-to-nearest without tokens), whatever else shares its batch."""
    bits = [3, 2, 16, 3, 4, 3, 2, 3]
    tensor = _experts(len(bits), 256, 48, torch.float32)  # transposed layout: (E, in=256, out=48)
    hessians: list[torch.Tensor | None] = list(_hessians(len(bits), 256))
    hessians[3] = torch.zeros(256, 256)  # no calibration tokens: round-to-nearest inside a GPTQ'd width
    hessians[6] = None
    lb = quantize_fused(tensor, bits, 64, hessians, "gptq", transposed=True, act_order=act_order)
    for e, b in enumerate(bits):
        if b == 16:
            assert torch.equal(lb.dense[e], tensor[e])  # type: ignore[arg-type]
            continue
        h = hessians[e]
        q = rtn_quantize(tensor[e].T, b, 64, scale_dtype=torch.float16) if h is None or not h.any() else \
            gptq_quantize(tensor[e].T, h, b, 64, scale_dtype=torch.float16, act_order=act_order)
        assert torch.equal(lb.dequantize_expert(e), q.weight.T), e
