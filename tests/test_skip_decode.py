"""Skipping at decode (a few (token, expert) pairs a step): the routing is read once on the host and each kept
expert runs as plain matmuls on its slice of the fused weights. Logits equal those of the same model whose experts
output is replaced by the kept pairs combined by hand (NAEE's rule on sorted weights, kept weights rescaled to the
token's total), and the counters count the kept pairs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import sample_ids, tiny_model
from transformers import DynamicCache

from moeslim.methods.skip import keep_mask
from moeslim.models import find_moe_layers
from moeslim.runtime import skipping
from moeslim.runtime.routed_experts import current_implementation
from moeslim.runtime.skipping import counters, install_skipping, reset_counters

BETA = 0.6


def _hand_keep(weights: torch.Tensor, beta: float) -> torch.Tensor:
    """(T, 2) -> (T, 2) bool: the best expert runs, the second iff w_2 >= beta * w_1 (sorted, ties by column)."""
    ws, order = weights.float().sort(dim=-1, descending=True, stable=True)
    keep_sorted = torch.stack((torch.ones_like(ws[:, 0], dtype=torch.bool), ws[:, 1] >= beta * ws[:, 0]), 1)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def test_top2_mask_equals_the_sorted_rule_with_ties_and_low_precision() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(400, 2, generator=gen)
    w[::3] = (w[::3] * 4).round() / 4  # ties, including equal pairs
    w[::7] -= 0.5  # negative weights (no family routes with them; the rule still reads the sorted order)
    for dtype in (torch.float32, torch.bfloat16):
        for beta in (0.2, 0.5, 0.75, 1.0, 1.5):
            assert torch.equal(keep_mask(w.to(dtype), beta, "top2"), _hand_keep(w.to(dtype), beta)), (dtype, beta)


def test_host_top2_rule_equals_the_tensor_rule_at_the_float32_boundary() -> None:
    # The decode path decides on the host (Python floats) what keep_mask decides in float32: random weights,
    # ties, negative weights, bfloat16 inputs, betas above 1, and second weights exactly at the float32
    # threshold beta * w_1 and one float32 step below it.
    from moeslim.methods.skip.thresholds import keep_rows_top2

    gen = torch.Generator().manual_seed(1)
    w = torch.rand(600, 2, generator=gen)
    w[::3] = (w[::3] * 4).round() / 4
    w[::7] -= 0.5
    for beta in (0.2, 0.3, 0.5, 0.7, 1.0, 1.5):
        at = (w[:, :1] * torch.tensor(beta, dtype=torch.float32)).squeeze(-1)  # float32 threshold
        edge = torch.stack((w[:, 0].abs(), at.abs()), 1)
        below = torch.stack((w[:, 0].abs(), torch.nextafter(at.abs(), torch.zeros(()))), 1)
        for case in (w, w.bfloat16(), edge, below, edge.flip(-1)):
            host = keep_rows_top2(case.float().tolist(), beta)
            assert host is not None
            assert torch.equal(torch.tensor(host), keep_mask(case, beta, "top2")), beta
    assert keep_rows_top2([[float("nan"), 0.5]], 0.5) is None  # NaN: left to the tensor rule


def _hand_masked(model: torch.nn.Module, beta: float, kept: dict[int, int]) -> None:
    """Forward hooks that replace every MoE layer's experts output by the kept pairs combined by hand."""
    for layer in find_moe_layers(model):
        busy = [False]

        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor, layer=layer, busy=busy
                 ) -> torch.Tensor | None:
            if busy[0]:  # expert_outputs below runs this experts module itself
                return None
            x, ids, w = args
            keep = _hand_keep(w, beta)
            masked = w * keep
            w_hand = torch.where(keep.all(-1, keepdim=True), w,
                                 masked * w.sum(-1, keepdim=True) / masked.sum(-1, keepdim=True))
            busy[0] = True
            try:
                outs = layer.expert_outputs(x)  # (T, E, H)
            finally:
                busy[0] = False
            kept[layer.layer_idx] = kept.get(layer.layer_idx, 0) + int(keep.sum())
            return layer.combine(outs, w_hand, ids)

        layer.experts.register_forward_hook(hook)


def _decode_logits(model: torch.nn.Module, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """(1, S) ids: a ``prompt``-token prefill, then one token a step through the KV cache -> (S - prompt + 1, V)."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :prompt], cache=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.cat(logits)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_decode_fast_path_equals_hand_masked_logits_and_counts(family: str, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    ids = sample_ids(seed=5, batch=1, seq=20)
    prompt = 4  # 4 tokens x top-2 = 8 pairs: the prefill takes the host-read path too (several tokens per expert)
    reference = tiny_model(family)
    kept: dict[int, int] = {}
    _hand_masked(reference, BETA, kept)
    expected = _decode_logits(reference, ids, prompt)

    model = tiny_model(family)
    before = current_implementation(model.config)
    install_skipping(model, {layer.layer_idx: BETA for layer in find_moe_layers(model)})
    # the matmuls stay with the implementation the model had (transformers' fused forward), not a slower one
    assert {layer.experts.moeslim_inner for layer in find_moe_layers(model)} == {before or "grouped_mm"}
    direct = []
    original = skipping._direct_forward

    def counting(*args: object) -> torch.Tensor:
        direct.append(1)
        return original(*args)

    monkeypatch.setattr(skipping, "_direct_forward", counting)
    reset_counters(model)
    got = _decode_logits(model, ids, prompt)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    tokens = ids.shape[1]
    layers = find_moe_layers(model)
    assert direct, "no decode step took the host-read path"
    assert 0 < sum(kept.values()) < 2 * tokens * len(layers)  # some pairs were skipped, not all
    assert counters(model) == {layer.layer_idx: {"expert_calls": kept[layer.layer_idx], "tokens": tokens}
                               for layer in layers}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_one_token_fast_path_is_bit_identical_to_the_routed_reference(family: str) -> None:
    """At one token the fast path equals ``routed_forward`` on the placeholder routing with ``rescale_kept``
    weights (the general path) exactly for tokens that skip, and ``routed_forward`` on the original arguments
    exactly for tokens that keep both experts (the original implementation up to float rounding)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from moeslim.methods.skip import rescale_kept
    from moeslim.runtime.routed_experts import routed_forward

    model = tiny_model(family)
    original = ALL_EXPERTS_FUNCTIONS[current_implementation(model.config) or "grouped_mm"]
    layer = find_moe_layers(model)[0]
    x = torch.randn(64, layer.hidden_size, generator=torch.Generator().manual_seed(1))
    weights, ids = layer.route(layer.router_logits(x))
    install_skipping(model, {layer.layer_idx: BETA})
    skipped = 0
    with torch.no_grad():
        for t in range(x.shape[0]):
            keep = _hand_keep(weights[t:t + 1], BETA)
            skipped += int((~keep).sum())
            routed = ids[t:t + 1].masked_fill(~keep, layer.num_experts)
            got = layer.experts(x[t:t + 1], ids[t:t + 1], weights[t:t + 1])
            if keep.all():
                expected = routed_forward(layer.experts, x[t:t + 1], ids[t:t + 1], weights[t:t + 1], {})
                torch.testing.assert_close(got, original(layer.experts, x[t:t + 1], ids[t:t + 1], weights[t:t + 1]),
                                           rtol=1e-5, atol=1e-6)
            else:
                expected = routed_forward(layer.experts, x[t:t + 1], routed, rescale_kept(weights[t:t + 1], keep), {})
            assert torch.equal(got, expected), t
    assert 0 < skipped < x.shape[0]
