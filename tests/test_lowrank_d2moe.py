"""D2-MoE low-rank experts: the Fisher-weighted shared base, one delta rank, exact at full rank, save -> load."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import moeslim
from moeslim.appliers import apply
from moeslim.config import ConfigError
from moeslim.methods.lowrank import LowRankConfig, plan_lowrank
from moeslim.methods.lowrank.allocate import projection_params, shared_base_rank
from moeslim.methods.lowrank.shared_base import fisher_base
from moeslim.models import find_moe_layers
from moeslim.plans import Plan
from moeslim.runtime.lowrank import lowrank_storage


def _ids(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_fisher_base_weighs_each_input_column_by_the_experts_fisher() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, 2, generator=gen)  # (E, out, in)
    h0, h1 = torch.diag(torch.tensor([3.0, 0.0])), torch.diag(torch.tensor([1.0, 2.0]))
    base = fisher_base(w, [h0, h1, None])
    assert torch.allclose(base[:, 0], (3 * w[0, :, 0] + w[1, :, 0]) / 4)
    assert torch.allclose(base[:, 1], w[1, :, 1])  # only expert 1 saw this input
    assert torch.allclose(fisher_base(w, [None, None, None]), w.mean(0))  # nothing routed: the plain mean
    same = w[:1].expand(3, -1, -1)
    assert torch.allclose(fisher_base(same, [h0, h1, h1]), w[0])


def test_shared_base_rank_fits_the_budget() -> None:
    out, inp, experts = 16, 8, 4
    for budget in (out * inp, 200, 300, 512):
        r = shared_base_rank(experts, out, inp, budget, 0)
        assert out * inp + experts * projection_params(r, out, inp) <= budget
        assert r == min(inp, 8) or out * inp + experts * projection_params(r + 1, out, inp) > budget
    with pytest.raises(ValueError, match="budget"):
        shared_base_rank(experts, out, inp, out * inp - 1, 0)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])  # halves; transposed + biases; shared
def test_d2moe_at_full_rank_equals_the_original(family: str, tmp_path) -> None:
    model = tiny_model(family)
    ids = _ids()
    plan = plan_lowrank(model, ids, LowRankConfig(ratio=0.5, method="d2moe"))
    assert plan.provenance.method == "d2moe"
    raw = plan.to_dict()
    for idx, layer in ((str(layer.layer_idx), layer) for layer in find_moe_layers(model)):
        up, down = layer.experts.gate_up_proj, layer.experts.down_proj
        raw["layers"][idx] = {"up_ranks": [min(up.shape[1:])] * up.shape[0],
                              "down_ranks": [min(down.shape[1:])] * down.shape[0]}
    low = copy.deepcopy(model)
    apply(low, Plan.from_dict(raw), calibration=ids)
    store = lowrank_storage(find_moe_layers(low)[0].experts)
    assert store and all(p.shared_base for p in store.values())
    with torch.no_grad():
        want = model(ids).logits
        assert torch.allclose(low(ids).logits, want, atol=1e-4)
    moeslim.save(low, tmp_path / "d2")
    again, _ = moeslim.load(tmp_path / "d2")
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, want, atol=1e-4)


@pytest.mark.parametrize(("family", "delta_ranks"), [("qwen3_moe", "uniform"), ("gpt_oss", "uniform"),
                                                    ("qwen3_moe", "greedy")])
def test_d2moe_keeps_its_budget_and_reports_the_applied_loss(family: str, delta_ranks: str, tmp_path) -> None:
    model = tiny_model(family)
    ids = _ids()
    config = LowRankConfig(ratio=0.5, method="d2moe", delta_ranks=delta_ranks)  # type: ignore[arg-type]
    plan = plan_lowrank(model, ids, config)
    assert 0.3 < plan.summary["param_ratio"] <= 0.5
    for entry in plan.layers.values():  # uniform: one delta rank per projection kind
        distinct = len(set(entry["up_ranks"])) + len(set(entry["down_ranks"]))
        assert distinct == 2 if delta_ranks == "uniform" else distinct > 2
    low = copy.deepcopy(model)
    apply(low, plan, calibration=ids)
    old, layer = find_moe_layers(model)[0], find_moe_layers(low)[0]
    dense = old.experts.down_proj.numel() + (old.experts.gate_up_proj.numel())
    assert sum(p.params() for p in lowrank_storage(layer.experts).values()) <= 0.5 * dense
    seen: list[torch.Tensor] = []
    handle = old.block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
        handle.remove()
        diff = layer.block_output(layer.block(seen[0])) - old.block_output(old.block(seen[0]))
    assert float(diff.double().norm()) == pytest.approx(plan.summary["layers"][str(old.layer_idx)]["loss"], rel=1e-4)
    moeslim.save(low, tmp_path / "d2")
    again, _ = moeslim.load(tmp_path / "d2")
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, low(ids).logits, atol=1e-5)


def test_d2moe_refuses_a_ratio_below_its_base() -> None:
    with pytest.raises(ConfigError, match="shared base"):
        LowRankConfig(ratio=0.1, method="d2moe").check_model(tiny_model("mixtral"))  # 8 experts: base = 1/8
    with pytest.raises(ConfigError, match="delta_ranks"):
        LowRankConfig(ratio=0.5, delta_ranks="greedy")


def test_d2moe_at_the_base_alone_saves_and_loads(tmp_path) -> None:
    """ratio = 1/E: every delta has rank 0 (zero-width factors): each expert computes the shared base."""
    model = tiny_model("mixtral")
    ids = _ids()
    plan = plan_lowrank(model, ids, LowRankConfig(ratio=1 / 8, method="d2moe", min_rank=0))
    assert all(set(e["up_ranks"]) == {0} for e in plan.layers.values())
    low = copy.deepcopy(model)
    apply(low, plan, calibration=ids)
    layer = find_moe_layers(low)[0]
    x = torch.randn(5, layer.hidden_size, generator=torch.Generator().manual_seed(0))
    outs = layer.expert_outputs(x)  # (T, E, H): all experts equal
    assert torch.allclose(outs, outs[:, :1].expand_as(outs), atol=1e-6)
    moeslim.save(low, tmp_path / "base")
    again, _ = moeslim.load(tmp_path / "base")
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, low(ids).logits, atol=1e-5)
