"""MoBE-style shared bases: exact when the bases span the inputs, within budget, save -> load, bad input refused."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import moeslim
from moeslim.appliers import apply
from moeslim.config import ConfigError
from moeslim.methods.lowrank import LowRankConfig, plan_lowrank
from moeslim.methods.lowrank.mobe import fit_mobe, mobe_params, mobe_rank
from moeslim.models import find_moe_layers
from moeslim.models.expert_math import expert_weight_views
from moeslim.plans import Plan, PlanError
from moeslim.runtime.lowrank import lowrank_storage


def _ids(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_fit_mobe_is_exact_when_one_basis_is_shared() -> None:
    """Experts A_e B with one common B (r, in): one shared basis of rank r recovers them exactly."""
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(3, 6, generator=gen)
    w = torch.stack([torch.randn(5, 3, generator=gen) @ b for _ in range(4)])  # (E, out, in), rank 3 each
    x = torch.randn(50, 6, generator=gen)
    fit = fit_mobe(w, [x.T @ x] * 4, rank=3, bases=2, damp=1e-9)
    assert fit.error < 1e-8
    approx = torch.stack([fit.a[e] @ fit.basis(e) for e in range(4)])
    assert torch.allclose(approx, w, atol=1e-4)
    assert torch.allclose(fit.mix.sum(1), torch.ones(4))


def test_fit_mobe_never_ends_worse_than_its_start() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 8, 10, generator=gen)
    fit = fit_mobe(w, [None] * 6, rank=4, bases=3, damp=0.01, steps=20)
    assert 0 < fit.error <= fit.error_start


def test_mobe_rank_fits_the_budget() -> None:
    for budget in (400, 1000, 4000):
        r = mobe_rank(8, 2, 16, 12, budget, 1)
        assert mobe_params(8, 2, r, 16, 12) <= budget
        assert r == 12 or mobe_params(8, 2, r + 1, 16, 12) > budget
    with pytest.raises(ValueError, match="budget"):
        mobe_rank(8, 2, 16, 12, 50, 1)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # gate/up halves; transposed + biases
def test_mobe_with_bases_spanning_the_inputs_equals_the_original(family: str, tmp_path) -> None:
    model = tiny_model(family)
    ids = _ids()
    plan = plan_lowrank(model, ids, LowRankConfig(ratio=0.5, method="mobe", bases=2))
    raw = plan.to_dict()
    for layer in find_moe_layers(model):
        views = expert_weight_views(layer)
        ins = [int(w.shape[1] if views.transposed else w.shape[2]) for w in (views.up, views.down)]
        raw["layers"][str(layer.layer_idx)] = {"up_ranks": [ins[0]] * layer.num_experts,
                                               "down_ranks": [ins[1]] * layer.num_experts}
    low = copy.deepcopy(model)
    apply(low, Plan.from_dict(raw), calibration=ids)
    store = lowrank_storage(find_moe_layers(low)[0].experts)
    assert store and all(p.bases == 2 for p in store.values())
    with torch.no_grad():
        want = model(ids).logits
        assert torch.allclose(low(ids).logits, want, atol=1e-4)
    moeslim.save(low, tmp_path / "mobe")
    again, _ = moeslim.load(tmp_path / "mobe")
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, want, atol=1e-4)


def test_mobe_keeps_its_budget_and_round_trips(tmp_path) -> None:
    model = tiny_model("qwen3_moe")
    ids = _ids()
    plan = plan_lowrank(model, ids, LowRankConfig(ratio=0.5, method="mobe"))
    assert 0.3 < plan.summary["param_ratio"] <= 0.5
    for entry in plan.summary["layers"].values():
        assert entry["bases"] == 2  # E // 4 of 8 experts
        for kind in ("up", "down"):
            assert entry["fit_error"][kind]["mobe"] <= entry["fit_error"][kind]["shared_basis"]
    low = copy.deepcopy(model)
    apply(low, plan, calibration=ids)
    layer = find_moe_layers(low)[0]
    views = expert_weight_views(find_moe_layers(model)[0])
    stored = sum(p.params() for p in lowrank_storage(layer.experts).values())
    assert stored <= 0.5 * (views.up.numel() + views.down.numel())
    with torch.no_grad():
        want = low(ids).logits
    moeslim.save(low, tmp_path / "mobe")
    again, _ = moeslim.load(tmp_path / "mobe")
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, want, atol=1e-5)


def test_bad_mobe_input_fails_clearly() -> None:
    with pytest.raises(ConfigError, match="bases applies"):
        LowRankConfig(ratio=0.5, bases=2)
    with pytest.raises(ConfigError, match="at least 1"):
        LowRankConfig(ratio=0.5, method="mobe", bases=0)
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="exceeds"):
        plan_lowrank(model, _ids(), LowRankConfig(ratio=0.5, method="mobe", bases=99))
    plan = plan_lowrank(model, _ids(), LowRankConfig(ratio=0.5, method="mobe"))
    raw = plan.to_dict()
    entry = raw["layers"][next(iter(raw["layers"]))]
    entry["up_ranks"] = [10_000] * len(entry["up_ranks"])
    with pytest.raises(PlanError, match="above the full rank"):
        apply(copy.deepcopy(model), Plan.from_dict(raw), calibration=_ids())
