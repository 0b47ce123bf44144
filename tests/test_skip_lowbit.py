"""Skipping over packed low-bit experts: skipped (token, expert) pairs reach the low-bit forward at the placeholder
index and are never computed; the result equals the kept pairs computed one by one through the same experts."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from moeslim.methods.quant.fused import quantize_fused
from moeslim.methods.skip import keep_mask, rescale_kept
from moeslim.models import find_moe_layers
from moeslim.models.expert_math import expert_weight_views
from moeslim.runtime.lowbit_io import install_lowbit
from moeslim.runtime.packed import PackedExperts
from moeslim.runtime.skipping import install_skipping


def _quantized(family: str) -> torch.nn.Module:
    model = tiny_model(family)
    for layer in find_moe_layers(model):
        views = expert_weight_views(layer)
        for name, w in ((views.up_name, views.up), (views.down_name, views.down)):
            bits = [(2, 3, 4, 8)[e % 4] for e in range(w.shape[0])]
            install_lowbit(layer.experts, name, quantize_fused(w.detach(), bits, 16, None, "rtn",
                                                               transposed=views.transposed))
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_skipped_pairs_are_never_computed(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _quantized(family)
    layer = find_moe_layers(model)[0]
    x = torch.randn(40, layer.hidden_size, generator=torch.Generator().manual_seed(0))
    weights, ids = layer.route(layer.router_logits(x))
    beta = 0.6 if ids.shape[1] == 2 else 0.3
    rule = "top2" if ids.shape[1] == 2 else "topk"
    keep = keep_mask(weights, beta, rule)
    assert 0 < int((~keep).sum()) < keep.numel()
    kept_w = rescale_kept(weights, keep)
    with torch.no_grad():  # reference: each kept pair alone through the same low-bit experts, summed per token
        manual = torch.zeros_like(x)
        for t, s in keep.nonzero().tolist():
            manual[t] += layer.experts(x[t:t + 1], ids[t:t + 1, s:s + 1], kept_w[t:t + 1, s:s + 1])[0]
    install_skipping(model, {layer.layer_idx: beta}, rule)
    rows: list[int] = []
    original = PackedExperts.group_matmul

    def counting(self: PackedExperts, gi: int, r: torch.Tensor, h: torch.Tensor, *args: object) -> torch.Tensor:
        rows.append(h.shape[0])
        return original(self, gi, r, h, *args)

    monkeypatch.setattr(PackedExperts, "group_matmul", counting)
    with torch.no_grad():
        got = layer.experts(x, ids, weights)
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-5)
    assert sum(rows) == 2 * int(keep.sum())  # up and down projections: the kept pairs only
    assert layer.experts.moeslim_counters["expert_calls"] == int(keep.sum())
