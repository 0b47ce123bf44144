"""Online dynamic pruning: the paper's attention-column importance and token protection at runtime."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import sample_ids, tiny_model

from moeslim.calibrate import RoutingStats, run_layerwise
from moeslim.methods.odp import protected_tokens, token_importance
from moeslim.methods.skip import calibrate_beta
from moeslim.runtime.odp import install_odp, protected_share, uninstall_odp
from moeslim.runtime.skipping import counters, install_skipping, reset_counters


def _causal_attention(batch: int, heads: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, seq, seq, generator=gen)
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def test_importance_is_the_attention_column_sum_over_later_tokens() -> None:
    attn = _causal_attention(2, 3, 7, seed=0)
    tokens = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(1))
    got = token_importance(attn, tokens)
    for b in range(2):
        for j in range(7):
            column = sum(float(attn[b, :, i, j].mean()) for i in range(j, 7))
            expected = float(tokens[b, j].abs().sum()) * column / (7 - j)
            assert abs(float(got[b, j]) - expected) < 1e-5


def test_row_sums_would_degenerate_but_column_sums_do_not() -> None:
    attn = _causal_attention(1, 2, 6, seed=2)
    tokens = torch.ones(1, 6, 4)  # equal norms: only the attention part can rank tokens
    scores = token_importance(attn, tokens)
    assert torch.allclose(attn.mean(1).sum(-1), torch.ones(1, 6))  # rows: always 1
    assert scores.std() > 0


def test_protected_tokens_takes_the_top_share_per_sequence() -> None:
    importance = torch.tensor([[0.1, 0.9, 0.3, 0.8], [5.0, 1.0, 2.0, 3.0]])
    mask = protected_tokens(importance, 0.5)
    assert mask.tolist() == [[False, True, False, True], [True, False, False, True]]
    assert protected_tokens(importance, 0.0).sum() == 0
    assert protected_tokens(importance, 0.01).sum(-1).tolist() == [1, 1]


def _median_betas(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, float]:
    results = run_layerwise(model, ids, lambda layer: [RoutingStats(layer.num_experts)], progress=False)
    return {i: calibrate_beta(r["routing"].topk_weights, "top2", 0.5) for i, r in results.items()}


def test_odp_keeps_all_experts_for_protected_tokens() -> None:
    model = tiny_model("mixtral", seed=0)
    model.set_attn_implementation("eager")
    ids = sample_ids(seed=3, batch=2, seq=16)
    betas = _median_betas(model, ids)
    with torch.no_grad():
        original = model(ids).logits
        install_skipping(model, betas, "top2")
        model(ids)
        skip_calls = sum(c["expert_calls"] for c in counters(model).values())
        install_odp(model, betas, "top2", protect=0.25)
        reset_counters(model)
        model(ids)
        odp_calls = sum(c["expert_calls"] for c in counters(model).values())
        tokens = ids.numel()
    assert abs(protected_share(model) - 0.25) < 1e-6
    # Protected tokens run both experts: more calls than plain skipping, never more than no skipping.
    assert skip_calls < odp_calls <= 2 * tokens * len(counters(model))
    install_odp(model, dict.fromkeys(betas, 0.0), "top2", protect=0.02)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original, atol=1e-6)


def test_odp_checkpoint_save_then_load_reinstalls_protection(tmp_path: Path) -> None:
    from moeslim.appliers import apply
    from moeslim.io import load, save
    from moeslim.methods.skip import SkipConfig, plan_skip

    model = tiny_model("mixtral", seed=0)
    ids = sample_ids(seed=4, batch=2, seq=16)
    plan = plan_skip(model, sample_ids(seed=5, batch=4, seq=16), SkipConfig(protect=0.25), "tiny")
    apply(model, plan)
    with torch.no_grad():
        in_memory = model(ids).logits
    assert abs(protected_share(model) - 0.25) < 1e-6
    loaded, _ = load(save(model, tmp_path / "odp"))
    assert loaded.config.moeslim["skip"]["protect"] == 0.25
    with torch.no_grad():
        reloaded = loaded(ids).logits
    assert abs(protected_share(loaded) - 0.25) < 1e-6  # the attention hooks are back, not plain skipping
    torch.testing.assert_close(reloaded, in_memory, rtol=1e-5, atol=1e-5)
    uninstall_odp(loaded)  # skipping stays installed with the same thresholds, without protection
    with torch.no_grad():
        plain = loaded(ids).logits
    assert not torch.allclose(plain, in_memory, atol=1e-4)
