"""select_experts: the sliced model computes the original's masked routing, saves as a stock checkpoint,
and refuses bad plans without touching the model."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import EXPERTS, FAMILIES, HIDDEN, sample_ids, tiny_model
from transformers import AutoModelForCausalLM

from moeslim.models import family_of, find_moe_layers, masked_routing_is_identity, select_experts

GROUPED = ("deepseek_v2", "deepseek_v3")  # tiny configs use n_group=2 (groups {0..3}, {4..7}), topk_group=1
NO_RENORM_SOFTMAX = ("qwen2_moe", "olmoe", "deepseek_v2")


def _moe_ids(model: torch.nn.Module) -> list[int]:
    return [moe.layer_idx for moe in find_moe_layers(model)]


def _plan(model: torch.nn.Module, keep: int = 6, seed: int = 0) -> dict[int, list[int]]:
    """A different random subset per layer; for grouped families the same count in every group."""
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for idx in _moe_ids(model):
        if family_of(model).name in GROUPED:
            half = keep // 2  # keep `half` of the 4 experts of each group
            plan[idx] = sorted(
                g * 4 + int(i) for g in range(2) for i in torch.randperm(4, generator=gen)[:half]
            )
        else:
            plan[idx] = sorted(int(i) for i in torch.randperm(EXPERTS, generator=gen)[:keep])
    return plan


def _masked_reference(model: torch.nn.Module, plan: dict[int, list[int]]) -> torch.nn.Module:
    """An unmodified deep copy whose MoE blocks output ``MoELayer.forward(x, allowed)`` (masked routing)."""
    ref = copy.deepcopy(model)
    for moe in find_moe_layers(ref):
        allowed = torch.zeros(moe.num_experts, dtype=torch.bool)
        allowed[plan[moe.layer_idx]] = True

        def hook(module, args, output, moe=moe, allowed=allowed):
            x = args[0]
            out = moe.forward(x.reshape(-1, x.shape[-1]), allowed).view(x.shape)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        moe.block.register_forward_hook(hook)
    return ref


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(sample_ids()).logits


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_masked_routing_and_roundtrips(family: str, tmp_path) -> None:
    model = tiny_model(family)
    plan = _plan(model)
    assert masked_routing_is_identity(model, plan)
    ref = _masked_reference(model, plan)
    original = _logits(model)

    select_experts(model, plan)

    pruned = _logits(model)
    torch.testing.assert_close(pruned, _logits(ref), rtol=0, atol=2e-5)
    assert not torch.allclose(pruned, original, atol=1e-4)  # pruning changed something
    for moe in find_moe_layers(model):
        assert moe.num_experts == 6 and moe.router.weight.shape == (6, HIDDEN)
    key = family_of(model).num_experts_key
    assert getattr(model.config, key) == 6

    # Stock transformers loads the result (no moeslim needed) and computes the same logits.
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert getattr(loaded.config, key) == 6
    torch.testing.assert_close(_logits(loaded), pruned, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", GROUPED)
def test_unequal_groups_drop_group_limits(family: str) -> None:
    """Pruned = masked routing of the original with group limits removed (n_group = topk_group = 1)."""
    model = tiny_model(family)
    plan = dict.fromkeys(_moe_ids(model), [0, 1, 4, 5, 6, 7])  # 2 in group 0, 4 in group 1
    assert not masked_routing_is_identity(model, plan)
    ungrouped = copy.deepcopy(model)
    for moe in find_moe_layers(ungrouped):
        moe.router.num_group = moe.router.topk_group = 1
    ref = _masked_reference(ungrouped, plan)

    select_experts(model, plan)

    assert model.config.n_group == 1 and model.config.topk_group == 1
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", NO_RENORM_SOFTMAX)
def test_no_renorm_softmax_weight_relation(family: str) -> None:
    """Without renormalisation, pruned weight = original prob * sum_all exp / sum_kept exp
    = original prob / (sum of original probs over kept experts), for the same chosen experts."""
    model = tiny_model(family)
    plan = _plan(model)
    x = torch.randn((32, HIDDEN), generator=torch.Generator().manual_seed(3))
    before = {moe.layer_idx: moe for moe in find_moe_layers(copy.deepcopy(model))}
    select_experts(model, plan)
    for moe in find_moe_layers(model):
        orig, kept = before[moe.layer_idx], torch.tensor(plan[moe.layer_idx])
        probs = orig.gate_probs(orig.router_logits(x))  # (T, E) softmax over all experts
        weights, ids = moe.route(moe.router_logits(x))  # pruned index space
        scale = orig.routing_kwargs().get("scaling", 1.0)
        expected = probs.gather(1, kept[ids]) / probs[:, kept].sum(-1, keepdim=True) * scale
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(weights, probs.gather(1, kept[ids]) * scale)  # the denominator changed


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_identity(family: str) -> None:
    model = tiny_model(family)
    state, logits = _state(model), _logits(model)
    shuffled = {idx: list(reversed(range(EXPERTS))) for idx in _moe_ids(model)}
    select_experts(model, shuffled)
    select_experts(model, {})
    _assert_same_state(state, _state(model))
    torch.testing.assert_close(_logits(model), logits, rtol=0, atol=0)


def _bad_plans(moe_ids: list[int]) -> list[tuple[dict, str]]:
    first, *rest = moe_ids
    good = [0, 1, 2, 3, 4, 5]
    return [
        ({first: [0, 1, 2, 3, 4, 99]}, r"out of range \[0, 8\)"),
        ({idx: [0, 0, 1, 2, 3, 4] for idx in moe_ids}, "duplicate expert ids"),
        ({idx: [3] for idx in moe_ids}, "keep=1 is below top_k=2 of .*; keep at least 2 experts"),
        ({first: good, **{idx: [0, 1, 2, 3] for idx in rest}}, "different numbers of experts.*layout='padded'"),
        ({first: good}, "different numbers of experts.*unlisted layers keep all 8"),
        ({max(moe_ids) + 7: good}, "not MoE layers"),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_plans_raise_and_leave_model_unmodified(family: str) -> None:
    model = tiny_model(family)
    state, config = _state(model), model.config.to_dict()
    for plan, message in _bad_plans(_moe_ids(model)):
        with pytest.raises(ValueError, match=message):
            select_experts(model, plan)
        _assert_same_state(state, _state(model))
        assert model.config.to_dict() == config
