"""Group-limited routing (DeepSeek-V3, GLM-4-MoE with n_group = 2): the pruning loss of every layer is the
block-output error of the model the plan actually produces, and the chosen set is the brute-force argmin."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from tiny_models import _reinit, sample_ids, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from moeslim.appliers.prune import apply_prune
from moeslim.methods.prune import PruneConfig, plan_prune
from moeslim.models import find_moe_layers
from moeslim.models.select import group_limits, select_experts

IDS = sample_ids(seed=4, batch=4, seq=16)


def grouped_model(family: str) -> torch.nn.Module:
    """Tiny DeepSeek-V3 (2 groups of 4, topk_group 1) or GLM-4-MoE made group-limited the same way."""
    if family == "deepseek_v3":
        return tiny_model(family)
    config = tiny_config(family)
    config.n_group, config.topk_group = 2, 1
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _reinit(model, 0)
    return model.eval()


@torch.no_grad()
def block_io(model: torch.nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{MoE layer: (block input (T, H), block output (T, H))} of one forward on IDS."""
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for moe in find_moe_layers(model):
        def hook(_m, args, output, idx=moe.layer_idx, moe=moe):
            out = moe.block_output(output)
            found[idx] = (args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1]))
        handles.append(moe.block.register_forward_hook(hook))
    model(IDS)
    for h in handles:
        h.remove()
    return found


@torch.no_grad()
def block_errors(pruned: torch.nn.Module, original_io: dict[int, tuple[torch.Tensor, torch.Tensor]]
                 ) -> dict[int, float]:
    """||pruned block(X) - F(X)||_F per MoE layer, X and F(X) from the original model (layer-wise loss)."""
    errors = {}
    for moe in find_moe_layers(pruned):
        x, z = original_io[moe.layer_idx]
        out = moe.block_output(moe.block(x.unsqueeze(0))).reshape(z.shape)
        errors[moe.layer_idx] = float((out.double() - z.double()).norm())
    return errors


CASES = [(6, "auto", "keep"), (5, "auto", "drop"), (4, "drop", "drop"), (4, "keep", "keep")]


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
@pytest.mark.parametrize("keep, groups, resolved", CASES)
def test_loss_is_the_pruned_models_error_and_argmin_is_exact(family: str, keep: int, groups: str,
                                                             resolved: str) -> None:
    model = grouped_model(family)
    limits = group_limits(model)
    assert limits is not None and limits.n_group == 2
    plan = plan_prune(model, IDS, PruneConfig(keep=keep, groups=groups))
    assert plan.summary["groups"] == resolved
    reference = block_io(model)

    pruned = copy.deepcopy(model)
    apply_prune(pruned, plan)
    assert (pruned.config.n_group == 2) is (resolved == "keep")
    measured = block_errors(pruned, reference)
    for idx, entry in plan.summary["layers"].items():
        assert entry["loss"] == pytest.approx(measured[int(idx)], rel=1e-5, abs=1e-6)

    # Brute force over every kept set the pruned model can be (balanced sets when the groups stay).
    best: dict[int, tuple[float, tuple[int, ...]]] = {}
    for kept in itertools.combinations(range(8), keep):
        if resolved == "keep" and not limits.representable(kept, 8):
            continue
        candidate = copy.deepcopy(model)
        select_experts(candidate, {idx: list(kept) for idx in plan.layers}, groups=resolved)
        for idx, err in block_errors(candidate, reference).items():
            if idx not in best or err < best[idx][0] - 1e-9:
                best[idx] = (err, kept)
    for idx, (err, kept) in best.items():
        assert plan.layers[idx] == list(kept), idx
        assert plan.summary["layers"][str(idx)]["loss"] == pytest.approx(err, rel=1e-5, abs=1e-6)


def test_keep_policy_refuses_counts_that_cannot_balance() -> None:
    from moeslim.config import ConfigError

    with pytest.raises(ConfigError, match="cannot keep the 2 routing groups.*groups='drop'"):
        PruneConfig(keep=5, groups="keep").check_model(grouped_model("deepseek_v3"))
    with pytest.raises(ValueError, match="groups='keep': layer .* keeps \\[2, 4\\]"):
        select_experts(grouped_model("deepseek_v3"), {1: [0, 1, 4, 5, 6, 7], 2: [0, 1, 4, 5, 6, 7]},
                       groups="keep")


@pytest.mark.parametrize("method", ["search", "reap", "frequency", "random"])
def test_every_method_keeps_balanced_groups(method: str) -> None:
    model = grouped_model("deepseek_v3")
    plan = plan_prune(model, IDS, PruneConfig(keep=4, method=method))
    limits = group_limits(model)
    assert limits is not None and plan.summary["groups"] == "keep"
    assert all(limits.representable(kept, 8) for kept in plan.layers.values())
