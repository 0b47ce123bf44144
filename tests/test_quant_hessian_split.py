"""The expert-group Hessian split (``hessian_experts`` / ``hessian_memory``): the same packed experts, bit for bit,
with at most a group of experts' gate_up Hessians alive at once (made from the kept block inputs)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_scale_quant import _on_threads
from tiny_models import sample_ids, tiny_model

import moeslim.methods.quant.transform as transform
from moeslim.calibrate.hessians import ExpertHessians
from moeslim.config import ConfigError
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.fused import LowBitTensor
from moeslim.methods.quant.transform import gptq_experts, gptq_observer, quantize_layer_experts
from moeslim.models import find_moe_layers

CALIB = sample_ids(0, 4, 24)


def _same(a: LowBitTensor, b: LowBitTensor) -> bool:
    sa, sb = a.to_state_dict("w"), b.to_state_dict("w")
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("settings", [
    {},  # true sequential, starved experts on all-token Hessians
    {"sequential": False, "weighted_hessian": True},
    {"sequential": False, "starved": "rtn", "min_tokens": 1},
    {"calibrate_all_experts": True, "sequential": False},
])
def test_split_gives_the_same_packed_experts(settings: dict[str, Any]) -> None:
    model = tiny_model("mixtral")
    widths = {layer.layer_idx: [3, 2, 16, 3, 4, 3, 2, 3] for layer in find_moe_layers(model)}
    base = QuantizeConfig(method="uniform", bits=3, group_size=16, **settings)
    want = gptq_experts(model, widths, CALIB, base)
    for split in ({"hessian_experts": 3}, {"hessian_experts": 1}, {"hessian_memory": 2 * 32 * 32 * 8 / 2**30}):
        config = QuantizeConfig(method="uniform", bits=3, group_size=16, **settings, **split)
        assert config.hessian_group(8, 32) == split.get("hessian_experts", 2)
        got = gptq_experts(model, widths, CALIB, config)
        assert got.fallback == want.fallback and got.all_tokens == want.all_tokens and got.counts == want.counts
        for idx, packed in want.experts.items():
            assert _same(got.experts[idx].up, packed.up) and _same(got.experts[idx].down, packed.down)


def test_split_observer_holds_no_per_expert_hessian() -> None:
    layer = find_moe_layers(tiny_model("mixtral"))[0]
    x = torch.randn(30, layer.hidden_size, generator=torch.Generator().manual_seed(1))
    obs = gptq_observer(layer, QuantizeConfig(method="uniform", bits=3, group_size=16, hessian_experts=2))
    obs.observe(layer, x)
    summary = obs.result()
    assert all(h is None for h in [*summary.up, *summary.down]) and summary.inputs is not None
    full = ExpertHessians(layer.num_experts)
    full.observe(layer, x)
    assert torch.equal(summary.counts, full.result().counts)
    assert QuantizeConfig(hessian_experts=8).hessian_group(8, 32) is None  # a group of all: no split
    assert QuantizeConfig(hessian_memory=1e-9).hessian_group(8, 32) == 1  # at least one expert


def test_split_over_processes_equals_one_process() -> None:
    layer = find_moe_layers(tiny_model("qwen3_moe"))[0]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(24, layer.hidden_size, generator=gen) for _ in range(4)]
    bits = [3, 16, 2, 3, 4, 3, 16, 2]
    unsplit = QuantizeConfig(method="uniform", bits=3, group_size=16)
    config = QuantizeConfig(method="uniform", bits=3, group_size=16, hessian_experts=2)
    one = gptq_observer(layer, unsplit)
    for x in batches:
        one.observe(layer, x)
    want, want_fallback = quantize_layer_experts(layer, bits, one.result(), unsplit)

    def rank_work(comm: Any) -> Any:
        observer = gptq_observer(layer, config)
        for x in batches[comm.rank::comm.size]:
            observer.observe(layer, x)
        observer.sync(comm)
        return quantize_layer_experts(layer, bits, observer.result(), config, comm)

    for packed, fallback in _on_threads(3, rank_work):
        assert fallback == want_fallback
        assert _same(packed.up, want.up) and _same(packed.down, want.down)


def test_split_config_refusals() -> None:
    with pytest.raises(ConfigError, match="^hessian_experts="):
        QuantizeConfig(hessian_experts=0)
    with pytest.raises(ConfigError, match="^hessian_memory="):
        QuantizeConfig(hessian_memory=-1.0)
    with pytest.raises(ConfigError, match="give one"):
        QuantizeConfig(hessian_experts=2, hessian_memory=1.0)


def test_gptq_batches_of_any_size_give_the_same_packed_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apply's GPTQ waits for a batch of Hessians (``gptq.BATCH_BYTES`` of working memory) before quantizing: a
    bound of one expert per batch, or of a few, packs the experts bit for bit as one batch per width does."""
    model = tiny_model("mixtral")
    widths = {layer.layer_idx: [3, 2, 16, 3, 4, 3, 2, 3] for layer in find_moe_layers(model)}
    config = QuantizeConfig(method="uniform", bits=3, group_size=16, act_order=True)
    want = gptq_experts(model, widths, CALIB, config)
    for experts in (1, 3):
        # the tiny model's gate_up slices are (96, 32)
        monkeypatch.setattr(transform, "BATCH_BYTES", experts * transform.gptq_bytes_per_matrix(96, 32))
        got = gptq_experts(model, widths, CALIB, config)
        for idx, packed in want.experts.items():
            assert _same(got.experts[idx].up, packed.up) and _same(got.experts[idx].down, packed.down)
