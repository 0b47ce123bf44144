"""Non-uniform per-layer expert counts: the exact DP allocator, global plans, and both loadable forms
(padded: stock transformers; compact: moeslim.load) computing the original's masked routing."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from test_prune_groups import IDS
from tiny_models import sample_ids, tiny_model
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.appliers import apply
from moeslim.config import ConfigError
from moeslim.methods.prune import PruneConfig, plan_prune
from moeslim.methods.prune.allocate import allocate_counts
from moeslim.models import find_moe_layers
from moeslim.plans import Plan

EVAL_IDS = sample_ids(seed=9, batch=2, seq=12)


@pytest.mark.parametrize("seed", range(5))
def test_dp_allocation_is_exact_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    curves = {layer: {k: rng.random() * (9 - k) ** 2 for k in range(2, 9) if rng.random() > 0.2 or k == 8}
              for layer in range(4)}
    for total in range(12, 30, 3):
        combos = [c for c in itertools.product(*(sorted(curves[i]) for i in range(4))) if sum(c) == total]
        if not combos:
            with pytest.raises(ValueError, match="not reachable"):
                allocate_counts(curves, total)
            continue
        best = min(sum(curves[i][k] for i, k in enumerate(c)) for c in combos)
        counts = allocate_counts(curves, total)
        assert sum(counts.values()) == total
        assert sum(curves[i][k] for i, k in counts.items()) == pytest.approx(best, rel=1e-12)


def _masked_logits(model: torch.nn.Module, kept: dict[int, list[int]]) -> torch.Tensor:
    """Logits of the unmodified model whose MoE blocks may only route to ``kept`` (masked routing)."""
    ref = copy.deepcopy(model)
    for moe in find_moe_layers(ref):
        allowed = torch.zeros(moe.num_experts, dtype=torch.bool)
        allowed[kept[moe.layer_idx]] = True

        def hook(_m, args, output, moe=moe, allowed=allowed):
            x = args[0]
            out = moe.forward(x.reshape(-1, x.shape[-1]), allowed).view(x.shape)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        moe.block.register_forward_hook(hook)
    with torch.no_grad():
        return ref(EVAL_IDS).logits


def _with_layout(plan: Plan, layout: str) -> Plan:
    return Plan(kind=plan.kind, layers=plan.layers, provenance=plan.provenance,
                summary={**plan.summary, "layout": layout})


# family, total experts over its 2 MoE layers (odd or unbalanced: the counts must differ), padded allowed
CASES = [("mixtral", 9, False), ("qwen3_moe", 11, False), ("gpt_oss", 9, True), ("deepseek_v3", 10, True)]


@pytest.mark.parametrize("family, total, paddable", CASES)
def test_global_plan_loads_padded_in_stock_and_compact_in_moeslim(family: str, total: int, paddable: bool,
                                                                   tmp_path) -> None:
    model = tiny_model(family)
    plan = plan_prune(model, IDS, PruneConfig(keep=5, allocation="global", total_keep=total))
    counts = {idx: len(k) for idx, k in plan.layers.items()}
    assert sum(counts.values()) == total and len(set(counts.values())) > 1
    assert plan.summary["experts_per_layer"] == {str(i): n for i, n in counts.items()}
    assert plan.summary["layout"] == ("padded" if paddable else "compact")
    for idx, entry in plan.summary["layers"].items():  # the chosen set is the curve's best of its size
        assert entry["curve"][str(counts[int(idx)])]["kept"] == plan.layers[int(idx)]
    reference = _masked_logits(model, plan.layers)
    original = model(EVAL_IDS).logits
    assert not torch.allclose(reference, original, atol=1e-4)

    compact = copy.deepcopy(model)
    apply(compact, _with_layout(plan, "compact"))
    assert {m.layer_idx: m.num_experts for m in find_moe_layers(compact)} == counts
    moeslim.save(compact, tmp_path / "compact")
    loaded, _ = moeslim.load(tmp_path / "compact")
    assert {m.layer_idx: m.num_experts for m in find_moe_layers(loaded)} == counts
    with torch.no_grad():
        torch.testing.assert_close(compact(EVAL_IDS).logits, reference, rtol=0, atol=2e-5)
        torch.testing.assert_close(loaded(EVAL_IDS).logits, reference, rtol=0, atol=2e-5)
    with pytest.raises(OSError):  # stock transformers refuses the compact form loudly
        AutoModelForCausalLM.from_pretrained(tmp_path / "compact")

    if not paddable:
        with pytest.raises(ConfigError, match="layout='compact'"):
            PruneConfig(keep=5, allocation="global", total_keep=total, layout="padded").check_model(model)
        return
    padded = copy.deepcopy(model)
    apply(padded, plan)
    assert all(m.num_experts == max(counts.values()) for m in find_moe_layers(padded))
    moeslim.save(padded, tmp_path / "padded")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "padded", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(EVAL_IDS).logits, reference, rtol=0, atol=2e-5)
        torch.testing.assert_close(stock(EVAL_IDS).logits, loaded(EVAL_IDS).logits, rtol=0, atol=2e-5)
        # Padded experts are never routed to: not even on random hidden states.
        for moe in find_moe_layers(stock):
            x = 10 * torch.randn(512, moe.hidden_size, generator=torch.Generator().manual_seed(0))
            _, ids = moe.route(moe.router_logits(x))
            assert int(ids.max()) < counts[moe.layer_idx] or family == "deepseek_v3"
            if family == "deepseek_v3":  # groups padded each: slots [c, 4) and [4 + c, 8) are padding
                c = counts[moe.layer_idx] // 2
                real = [g * (moe.num_experts // 2) + j for g in range(2) for j in range(c)]
                assert set(ids.flatten().tolist()) <= set(real)


def test_global_curve_matches_uniform_plans() -> None:
    model = tiny_model("mixtral")
    plan = plan_prune(model, IDS, PruneConfig(keep=5, allocation="global", total_keep=9))
    for k in (3, 6):
        uniform = plan_prune(model, IDS, PruneConfig(keep=k))
        for idx, entry in plan.summary["layers"].items():
            assert entry["curve"][str(k)]["kept"] == uniform.layers[int(idx)]
            assert entry["curve"][str(k)]["loss"] == pytest.approx(uniform.summary["layers"][idx]["loss"], rel=1e-9)


def test_global_search_uses_the_removal_path_and_config_errors() -> None:
    model = tiny_model("qwen3_moe")
    plan = plan_prune(model, IDS, PruneConfig(keep=5, method="search", allocation="global", total_keep=11))
    assert sum(len(k) for k in plan.layers.values()) == 11
    with pytest.raises(ConfigError, match="only used with allocation='global'"):
        PruneConfig(keep=5, total_keep=10)
    with pytest.raises(ConfigError, match="method='enumerate' or 'search'"):
        PruneConfig(keep=5, allocation="global", method="reap")
    with pytest.raises(ConfigError, match="progressive"):
        PruneConfig(keep=5, allocation="global", mode="progressive")
    with pytest.raises(ConfigError, match=r"total_keep=3 must be in \[4, 15\]"):
        PruneConfig(keep=5, allocation="global", total_keep=3).check_model(model)
