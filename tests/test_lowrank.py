"""Low-rank experts: whitened SVD maths, rank allocation, apply at full and reduced rank, save -> moeslim.load."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.appliers import apply, needs_calibration
from moeslim.config import ConfigError
from moeslim.methods.lowrank import LowRankConfig, allocate_ranks, plan_lowrank, projection_params
from moeslim.methods.whitened_svd import whitened_svd, whitening
from moeslim.models import find_moe_layers
from moeslim.plans import PlanError
from moeslim.runtime.lowrank import lowrank_storage


def _ids(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_whitened_svd_error_is_the_tail_energy_and_full_rank_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    x = torch.randn(200, 20, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 20, dtype=torch.float64)
    cov = x.T @ x
    chol = whitening(cov, 20, damp=0.01)
    damped = cov + 0.01 * cov.diagonal().mean() * torch.eye(20, dtype=torch.float64)
    svd = whitened_svd(w, chol)
    for rank in (1, 5, 11):
        a, b = svd.factors(rank)
        delta = w - (a.double() @ b.double())
        error = torch.trace(delta @ damped @ delta.T)
        assert float(error) == pytest.approx(float(svd.energies[rank:].sum()), rel=1e-4)
    a, b = svd.factors(12)
    assert torch.allclose(a.double() @ b.double(), w, atol=1e-4)
    # Whitening beats plain SVD on the activation-weighted error at the same rank.
    u, s, vt = torch.linalg.svd(w)
    plain = w - (u[:, :5] * s[:5]) @ vt[:5]
    a, b = svd.factors(5)
    aware = w - a.double() @ b.double()
    assert torch.trace(aware @ damped @ aware.T) < torch.trace(plain @ damped @ plain.T)


def test_allocate_ranks_respects_the_budget_and_follows_the_energy() -> None:
    shapes = [(8, 8), (8, 8)]
    strong, weak = torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2]), torch.tensor([1.0, 0.5, 0.2, 0.1, 0, 0, 0, 0])
    ranks = allocate_ranks([strong, weak], shapes, budget=64, min_rank=1)
    assert ranks[0] > ranks[1] and sum(projection_params(r, 8, 8) for r in ranks) <= 64
    # Exhaustive check on a small case: greedy reaches the best tail energy for this (concave) instance.
    best = min((sum(float(e[r:].sum()) for e, r in zip((strong, weak), rs, strict=True)), rs)
               for rs in itertools.product(range(1, 9), repeat=2)
               if sum(projection_params(r, 8, 8) for r in rs) <= 64)
    assert sum(float(e[r:].sum()) for e, r in zip((strong, weak), ranks, strict=True)) == pytest.approx(best[0])
    assert allocate_ranks([strong, weak], shapes, budget=128, min_rank=1) == [8, 8]  # ratio 1: all dense
    with pytest.raises(ValueError, match="min_rank"):
        allocate_ranks([strong, weak], shapes, budget=40, min_rank=3)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])  # halves; transposed+biases; shared
def test_full_rank_equals_the_original(family: str) -> None:
    model = tiny_model(family)
    ids = _ids()
    plan = plan_lowrank(model, ids, LowRankConfig(ratio=1.0))
    assert plan.summary["param_ratio"] == 1.0
    low = copy.deepcopy(model)
    apply(low, plan, calibration=ids)
    for layer in find_moe_layers(low):
        store = lowrank_storage(layer.experts)
        assert store and all(p.is_dense(e) for p in store.values() for e in range(layer.num_experts))
    with torch.no_grad():
        assert torch.allclose(low(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_lowrank_round_trip_and_plan_loss(family: str, tmp_path) -> None:
    model = tiny_model(family)
    ids = _ids()
    plan = plan_lowrank(model, ids, LowRankConfig(ratio=0.5, recalibrate_router=True))
    assert 0.45 < plan.summary["param_ratio"] <= 0.5
    low = copy.deepcopy(model)
    apply(low, plan, calibration=ids)
    layer = find_moe_layers(low)[0]
    assert sum(p.params() for p in lowrank_storage(layer.experts).values()) <= 0.5 * (
        find_moe_layers(model)[0].experts.gate_up_proj.numel() + find_moe_layers(model)[0].experts.down_proj.numel())
    # The applied block has the loss the plan reports (factors and refitted rows recomputed in apply).
    seen: list[torch.Tensor] = []
    old = find_moe_layers(model)[0]
    handle = old.block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
        handle.remove()
        diff = layer.block_output(layer.block(seen[0])) - old.block_output(old.block(seen[0]))
    entry = plan.summary["layers"][str(old.layer_idx)]
    assert entry["router_fit"]["loss_after"] <= entry["router_fit"]["loss_before"]
    assert float(diff.double().norm()) == pytest.approx(entry["loss"], rel=1e-4)
    moeslim.save(low, tmp_path / "low")
    again, _ = moeslim.load(tmp_path / "low")
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, low(ids).logits, atol=1e-5)
    with pytest.raises(OSError):  # stock transformers finds no model weights (never random experts)
        AutoModelForCausalLM.from_pretrained(tmp_path / "low")


def test_plan_lowrank_leaves_the_model_unchanged_and_bad_input_fails() -> None:
    model = tiny_model("olmoe")
    ids = _ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_lowrank(model, ids, LowRankConfig(ratio=0.3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert needs_calibration(plan)
    with pytest.raises(PlanError, match="calibration"):
        apply(copy.deepcopy(model), plan)
    for ratio in (0.0, 1.5):
        with pytest.raises(ConfigError, match="ratio"):
            LowRankConfig(ratio=ratio)
    low = copy.deepcopy(model)
    apply(low, plan, calibration=ids)
    with pytest.raises(PlanError, match="already"):
        apply(low, plan, calibration=ids, force=True)


def test_cli_plan_lowrank_then_apply_and_load(tiny_model_dir, tmp_path) -> None:
    from moeslim.cli import main

    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    plan = tmp_path / "lowrank.json"
    assert main(["plan", "lowrank", str(tiny_model_dir), "--ratio", "0.5", *calib, "--out", str(plan)]) == 0
    ckpt = tmp_path / "low"
    assert main(["apply", str(tiny_model_dir), str(plan), "--out", str(ckpt)]) == 0
    model, _ = moeslim.load(ckpt)
    assert model.config.moeslim["lowrank"]["param_ratio"] <= 0.5
    assert all(lowrank_storage(layer.experts) for layer in find_moe_layers(model))


def test_quantizing_after_lowrank_is_refused_before_any_work(tmp_path) -> None:
    from moeslim.methods.quant.config import QuantizeConfig
    from moeslim.methods.quant.driver import plan_quantize
    from moeslim.workflows.recipe import recipe_from_dict

    model = tiny_model("mixtral")
    ids = _ids()
    quant_plan = plan_quantize(model, ids, QuantizeConfig(method="uniform", bits=3, group_size=16))
    apply(model, plan_lowrank(model, ids, LowRankConfig(ratio=0.5)), calibration=ids)
    before = model(ids).logits
    for method in ("uniform", "pmq"):  # used to crash mid-pass on the meta placeholders
        with pytest.raises(ConfigError, match=r"low-rank experts is not supported \(decoder layers \[0, 1\]"):
            plan_quantize(model, ids, QuantizeConfig(method=method, bits=3, candidates=(2, 3, 4), group_size=16))
    with pytest.raises(ConfigError, match="low-rank factors"):  # a plan made before the low-rank stage
        apply(model, quant_plan, calibration=ids, force=True)
    assert torch.equal(model(ids).logits, before) and "quantize" not in model.config.moeslim
    recipe = {"name": "r", "model": "demo", "stages": [{"lowrank": {"ratio": 0.5}}, {"skip": {}},
                                                       {"quantize": {"method": "uniform", "bits": 4}}]}
    with pytest.raises(ConfigError, match=r"stages\[2\].quantize: quantizing after the low-rank stage stages\[0\]"):
        recipe_from_dict(recipe)
    recipe["stages"] = recipe["stages"][:2]  # low-rank without a later quantize stage is fine
    assert [s.kind for s in recipe_from_dict(recipe).stages] == ["lowrank", "skip"]
