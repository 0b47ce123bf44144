"""Expert merging (HC-SMoE / MC-SMoE): grouping maths, neuron alignment, the merged block, apply, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from tiny_models import VOCAB, _reinit, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.appliers import apply, needs_calibration
from moeslim.appliers.merge import merge_config
from moeslim.config import ConfigError
from moeslim.methods.merge import MergeConfig, plan_merge
from moeslim.methods.merge.combine import group_logit, permute_expert
from moeslim.methods.merge.grouping import (
    average_linkage_groups,
    dominant_groups,
    global_group_counts,
    pairwise_distance,
)
from moeslim.models import find_moe_layers
from moeslim.models.expert_edit import matrices_forward, neuron_rows, read_experts
from moeslim.plans import Plan, PlanError


def _ids(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _block_inputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(T, H) inputs of the first MoE block of ``model`` on ``ids``."""
    layer = find_moe_layers(model)[0]
    seen: list[torch.Tensor] = []
    handle = layer.block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen[0]


# -- pure maths ---------------------------------------------------------------------------------------------


def test_average_linkage_on_points_of_a_line() -> None:
    points = torch.tensor([[0.0], [0.1], [5.0], [5.3], [10.0], [5.1]])
    dist = pairwise_distance(points, "euclidean")
    assert average_linkage_groups(dist, 3) == [[0, 1], [2, 3, 5], [4]]
    assert average_linkage_groups(dist, 6) == [[0], [1], [2], [3], [4], [5]]
    assert average_linkage_groups(dist, 1) == [[0, 1, 2, 3, 4, 5]]
    # average linkage: {4} is 4.87 from {2, 3, 5} on average, {0, 1} is 5.08 away, so {4} joins first.
    assert average_linkage_groups(dist, 2) == [[0, 1], [2, 3, 4, 5]]


def test_dominant_groups_join_their_most_similar_dominant() -> None:
    sim = torch.tensor([[1.0, 0.9, 0.1, 0.2], [0.9, 1.0, 0.0, 0.3], [0.1, 0.0, 1.0, 0.8], [0.2, 0.3, 0.8, 1.0]])
    counts = torch.tensor([5.0, 9.0, 1.0, 7.0])  # dominant: 1 and 3
    assert dominant_groups(sim, counts, 2) == [[0, 1], [2, 3]]


def test_group_logit_gives_the_group_its_summed_probability() -> None:
    logits = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    groups = [[0, 3], [1], [2, 4, 5]]
    merged = torch.stack([group_logit(logits, g, sigmoid=False) for g in groups], dim=1)
    probs = torch.softmax(logits.double(), -1)
    expected = torch.stack([probs[:, g].sum(1) for g in groups], dim=1)
    assert torch.allclose(torch.softmax(merged, -1), expected, atol=1e-12)
    noisy_or = torch.sigmoid(group_logit(logits, [0, 3], sigmoid=True))
    s = torch.sigmoid(logits.double())
    assert torch.allclose(noisy_or, 1 - (1 - s[:, 0]) * (1 - s[:, 3]), atol=1e-12)
    assert torch.allclose(group_logit(logits, [1], sigmoid=True), logits[:, 1].double(), atol=1e-9)


# gate/up halves; interleaved + biases + transposed; no gate + a norm row per expert after down_proj
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "ergo"])
def test_neuron_permutation_keeps_every_expert_function(family: str) -> None:
    model = tiny_model(family)
    layer = find_moe_layers(model)[0]
    mats, rows = read_experts(layer), neuron_rows(layer)
    x = torch.randn(10, layer.hidden_size, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(mats.intermediate, generator=torch.Generator().manual_seed(1))
    for e in (0, 5):
        permuted = permute_expert(mats, e, rows, perm)
        assert not torch.equal(permuted.up[0], mats.up[e])
        ref = layer.expert_outputs(x, [e])[:, 0]
        assert torch.allclose(matrices_forward(layer, permuted, 0, x), ref, atol=1e-5)


@pytest.mark.parametrize("router", ["fit", "keep"])
def test_per_expert_norm_rows_merge_like_the_weights(router: str) -> None:
    """Ergo normalises each expert's output with its own scale row: a merged expert's row is the frequency-weighted
    average of its group's rows (like its weights), and the merged model computes each merged expert as
    ``matrices_forward`` of the merged matrices does."""
    model = tiny_model("ergo")
    original = {layer.layer_idx: read_experts(layer) for layer in find_moe_layers(model)}
    plan = plan_merge(model, _ids(), MergeConfig(keep=4, router=router))
    apply(model, plan, calibration=_ids())
    x = torch.randn(10, find_moe_layers(model)[0].hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in find_moe_layers(model):
        entry, old, new = plan.layers[layer.layer_idx], original[layer.layer_idx], read_experts(layer)
        assert old.norm is not None and new.norm is not None
        for slot, (group, weights) in enumerate(zip(entry["groups"], entry["weights"], strict=True)):
            expected = sum(w * old.norm[e] for e, w in zip(group, weights, strict=True))
            for s in ([slot] if router == "fit" else group):
                torch.testing.assert_close(new.norm[s], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(new.norm[0], new.norm[1])  # the rows differ: a wrong slice would show
        for e in range(layer.num_experts):
            torch.testing.assert_close(matrices_forward(layer, new, e, x), layer.expert_outputs(x, [e])[:, 0],
                                       rtol=0, atol=1e-5)


# -- the merged block ---------------------------------------------------------------------------------------


def test_merged_block_equals_hand_computed_merge() -> None:
    """Mixtral: weight-matching permutation, frequency-weighted average and representative router rows, by hand."""
    model = tiny_model("mixtral")
    ids = _ids()
    config = MergeConfig(keep=4, method="hc-smoe", router="fit", fit_rows="representative", align=True)
    plan = plan_merge(model, ids, config)
    merged = copy.deepcopy(model)
    apply(merged, plan, calibration=ids)
    for layer, new in zip(find_moe_layers(model), find_moe_layers(merged), strict=True):
        entry = plan.layers[layer.layer_idx]
        gate_up, down = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()  # (E, 2I, H), (E, H, I)
        inter = down.shape[2]
        assert new.num_experts == 4 and new.experts.gate_up_proj.shape[0] == 4
        for j, (group, weights, rep) in enumerate(zip(entry["groups"], entry["weights"], entry["representatives"],
                                                      strict=True)):
            want_gu, want_d = torch.zeros_like(gate_up[0]), torch.zeros_like(down[0])
            for e, w in zip(group, weights, strict=True):
                score = _feats(gate_up, down, rep) @ _feats(gate_up, down, e).T  # (I, I)
                r, c = linear_sum_assignment(score.double().numpy(), maximize=True)
                perm = torch.as_tensor(c[r.argsort()])
                want_gu += w * torch.cat((gate_up[e][:inter][perm], gate_up[e][inter:][perm]))
                want_d += w * down[e][:, perm]
            assert torch.allclose(new.experts.gate_up_proj[j], want_gu, atol=1e-6)
            assert torch.allclose(new.experts.down_proj[j], want_d, atol=1e-6)
            assert torch.equal(new.router_weight[j], layer.router_weight[rep])
    # The whole block, by hand: softmax over the 4 rows -> top-2 -> renormalise -> weighted merged experts.
    x = _block_inputs(merged, ids)
    new = find_moe_layers(merged)[0]
    probs = torch.softmax(x @ new.router_weight.T, -1)
    w, top = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    gu, dn = new.experts.gate_up_proj, new.experts.down_proj
    inter = dn.shape[2]
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(2):
            h = x[t] @ gu[top[t, k]].T
            want[t] += w[t, k] * ((torch.nn.functional.silu(h[:inter]) * h[inter:]) @ dn[top[t, k]].T)
    with torch.no_grad():
        got = new.block(x[None])
    assert torch.allclose(new.block_output(got)[0], want, atol=1e-5)


def _feats(gate_up: torch.Tensor, down: torch.Tensor, e: int) -> torch.Tensor:
    """(I, 3H) per neuron of expert e: gate row, up row, down column (Mixtral halves layout)."""
    inter = down.shape[2]
    return torch.cat((gate_up[e][:inter], gate_up[e][inter:], down[e].T), dim=1)


def _paired_model(family: str) -> torch.nn.Module:
    """Top-1 routing, experts 2k and 2k+1 identical (weights and router rows, choice bias), no group limits."""
    config = tiny_config(family)
    config.num_experts_per_tok = 1
    for key in ("n_group", "topk_group"):
        if hasattr(config, key):
            setattr(config, key, 1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _reinit(model, 0)
    with torch.no_grad():
        for layer in find_moe_layers(model):
            tensors = [layer.experts.gate_up_proj, layer.experts.down_proj, layer.router_weight]
            bias = layer.correction_bias()
            tensors += [bias] if bias is not None else []
            for t in tensors:
                t[1::2] = t[0::2].clone()
    return model.eval()


@pytest.mark.parametrize(("family", "router"), [
    ("mixtral", "fit"), ("deepseek_v3", "fit"),  # softmax; sigmoid + correction bias + shared experts
    ("mixtral", "keep"), ("deepseek_v3", "keep"), ("qwen3_moe", "keep")])
def test_merging_identical_experts_is_lossless(family: str, router: str) -> None:
    """HC-SMoE groups twins (distance 0). (MC-SMoE need not: top-k ties split the counts between twins, so both
    twins of a pair can be dominant; that is the method, not a defect.)"""
    model = _paired_model(family)
    ids = _ids()
    config = MergeConfig(keep=4, method="hc-smoe", router=router, fit_rows="representative")  # type: ignore[arg-type]
    plan = plan_merge(model, ids, config)
    assert all(entry["groups"] == [[0, 1], [2, 3], [4, 5], [6, 7]] for entry in plan.layers.values())
    assert not needs_calibration(plan)
    merged = copy.deepcopy(model)
    apply(merged, plan)  # router="keep" / fit_rows="representative": no calibration needed in apply
    with torch.no_grad():
        want, got = model(ids).logits, merged(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert all(v["loss"] < 1e-4 for v in plan.summary["layers"].values())
    assert find_moe_layers(merged)[0].num_experts == (8 if router == "keep" else 4)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])  # softmax; sigmoid + groups; biases
def test_router_keep_saves_a_stock_checkpoint_of_slot_copies(family: str, tmp_path) -> None:
    """router='keep': E slots, each holding its group's merged expert; stock transformers computes the same logits."""
    model = tiny_model(family)
    ids = _ids()
    plan = plan_merge(model, ids, MergeConfig(keep=3, method="mc-smoe"))  # global counts: layers may differ
    original = copy.deepcopy(model)
    apply(model, plan)
    moeslim.save(model, tmp_path / "merged")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, model(ids).logits, atol=1e-5)
    assert sum(len(e["groups"]) for e in plan.layers.values()) == 3 * len(plan.layers)
    for old, new in zip(find_moe_layers(original), find_moe_layers(stock), strict=True):
        assert new.num_experts == old.num_experts
        assert torch.equal(new.router_weight, old.router_weight)
        for group in plan.layers[old.layer_idx]["groups"]:
            slots = new.experts.down_proj[group]
            assert all(torch.equal(slots[0], s) for s in slots)
    section = stock.config.moeslim["merge"]
    assert section["router"] == "keep" and section["unique_expert_ratio"] == pytest.approx(3 / 8)


def test_global_group_counts_follow_routing_spread() -> None:
    """Layer 0 routes almost everything to one expert, layer 1 evenly: layer 1 gets the groups."""
    counts = {0: torch.tensor([97.0, 1, 1, 1]), 1: torch.tensor([25.0, 25, 25, 25])}
    assert global_group_counts(counts, 2) == {0: 1, 1: 3}
    assert global_group_counts(counts, 4) == {0: 4, 1: 4}
    assert global_group_counts(counts, 1) == {0: 1, 1: 1}  # each layer's most-routed expert always dominates


def test_method_defaults_are_the_papers() -> None:
    hc, mc = MergeConfig(keep=4), MergeConfig(keep=4, method="mc-smoe")
    assert (hc.router, hc.metric, hc.align, hc.counts) == ("keep", "euclidean", False, "uniform")
    assert (mc.router, mc.align, mc.counts) == ("keep", True, "global")
    assert MergeConfig(keep=4, method="mc-smoe", router="fit").counts == "uniform"


def test_plans_from_before_router_keep_still_apply() -> None:
    """Old plans recorded router='lse-fit' / 'representative': they are router='fit' plans."""
    model = tiny_model("mixtral")
    ids = _ids()
    plan = plan_merge(model, ids, MergeConfig(keep=4, router="fit", fit_rows="representative"))
    raw = plan.to_dict()
    raw["provenance"]["config"]["router"] = "representative"
    del raw["provenance"]["config"]["fit_rows"]
    old = Plan.from_dict(raw)
    assert merge_config(old) == MergeConfig(keep=4, router="fit", fit_rows="representative")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    apply(a, plan)
    apply(b, old)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize(("family", "router"), [("qwen2_moe", "fit"), ("deepseek_v3", "fit"), ("gpt_oss", "fit"),
                                               ("deepseek_v3", "keep"), ("gpt_oss", "keep")])
def test_plan_loss_is_what_the_applied_block_computes(family: str, router: str) -> None:
    """lse-fit router rows and the router refit are recomputed in apply: the applied block has the plan's loss.
    (shared experts; sigmoid routing with groups and correction bias; router biases, interleaved gate/up)"""
    model = tiny_model(family)
    ids = _ids()
    plan = plan_merge(model, ids, MergeConfig(keep=4, method="mc-smoe", router=router,  # type: ignore[arg-type]
                                              recalibrate_router=True))
    first = str(find_moe_layers(model)[0].layer_idx)
    fit = plan.summary["layers"][first]["router_fit"]
    assert fit["loss_after"] <= fit["loss_before"]
    merged = copy.deepcopy(model)
    apply(merged, plan, calibration=ids)
    x = _block_inputs(model, ids)
    old, new = find_moe_layers(model)[0], find_moe_layers(merged)[0]
    with torch.no_grad():
        diff = new.block_output(new.block(x[None])) - old.block_output(old.block(x[None]))
    assert float(diff.double().norm()) == pytest.approx(plan.summary["layers"][first]["loss"], rel=1e-4)


def test_merged_checkpoint_loads_in_stock_transformers(tmp_path) -> None:
    model = tiny_model("qwen3_moe")
    ids = _ids()
    plan = plan_merge(model, ids, MergeConfig(keep=4, method="hc-smoe", router="fit"))
    plan = Plan.from_dict(plan.to_dict())  # pure JSON
    apply(model, plan, calibration=ids)
    moeslim.save(model, tmp_path / "merged")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    again, _ = moeslim.load(tmp_path / "merged")
    assert stock.config.num_experts == 4
    with torch.no_grad():
        want = model(ids).logits
        assert torch.allclose(stock(ids).logits, want, atol=1e-5)
        assert torch.allclose(again(ids).logits, want, atol=1e-5)


def test_plan_merge_leaves_the_model_unchanged() -> None:
    model = tiny_model("olmoe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan_merge(model, _ids(), MergeConfig(keep=3, method="hc-smoe", recalibrate_router=True))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- errors -------------------------------------------------------------------------------------------------


def test_bad_configs_fail_before_calibration() -> None:
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="below top_k"):
        MergeConfig(keep=1, router="fit").check_model(model)
    MergeConfig(keep=1).check_model(model)  # router=keep: top-2 of 8 slots that all compute one merged expert
    with pytest.raises(ConfigError, match="counts='global'"):
        MergeConfig(keep=4, method="mc-smoe", router="fit", counts="global")
    with pytest.raises(ConfigError, match="nothing to merge"):
        MergeConfig(keep=8).check_model(model)
    with pytest.raises(ConfigError, match="method"):
        MergeConfig(keep=4, method="average")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="keep"):
        MergeConfig(keep=0)


def test_apply_refuses_missing_calibration_and_bad_groups() -> None:
    model = tiny_model("mixtral")
    ids = _ids()
    plan = plan_merge(model, ids, MergeConfig(keep=4, router="fit"))
    assert needs_calibration(plan)
    with pytest.raises(PlanError, match="calibration"):
        apply(copy.deepcopy(model), plan)
    with pytest.raises(PlanError, match="hash|windows"):
        apply(copy.deepcopy(model), plan, calibration=_ids(seed=5))
    raw = plan.to_dict()
    first = next(iter(raw["layers"]))
    groups = raw["layers"][first]["groups"]
    j = next(i for i, g in enumerate(groups) if len(g) > 1)
    groups[j] = groups[j][:1]  # an expert in no group
    with pytest.raises(PlanError, match="partition"):
        apply(copy.deepcopy(model), Plan.from_dict(raw), calibration=ids)


def test_cli_plan_merge_then_apply(tiny_model_dir, tmp_path) -> None:
    """`moeslim plan merge` (flags derived from MergeConfig) -> `moeslim apply` redraws the windows for the fit."""
    from moeslim.cli import main

    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    plan = tmp_path / "merge.json"
    assert main(["plan", "merge", str(tiny_model_dir), "--method", "mc-smoe", "--keep", "4", "--router", "fit",
                 "--recalibrate-router", *calib, "--out", str(plan)]) == 0
    loaded = Plan.load(plan)
    assert loaded.kind == "merge" and loaded.provenance.config["recalibrate_router"] is True
    ckpt = tmp_path / "merged"
    assert main(["apply", str(tiny_model_dir), str(plan), "--out", str(ckpt)]) == 0
    stock = AutoModelForCausalLM.from_pretrained(ckpt)
    assert stock.config.num_local_experts == 4


def test_cli_plan_merge_router_keep_applies_without_windows(tiny_model_dir, tmp_path) -> None:
    """The default router='keep' plan is data-free in apply and saves E slots; --counts is a flag."""
    from moeslim.cli import main

    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    plan = tmp_path / "merge.json"
    assert main(["plan", "merge", str(tiny_model_dir), "--method", "mc-smoe", "--keep", "3", "--counts", "uniform",
                 *calib, "--out", str(plan)]) == 0
    loaded = Plan.load(plan)
    assert loaded.provenance.config["router"] == "keep" and loaded.provenance.config["align"] is True
    assert all(len(entry["groups"]) == 3 for entry in loaded.layers.values())
    assert not needs_calibration(loaded)
    ckpt = tmp_path / "merged"
    assert main(["apply", str(tiny_model_dir), str(plan), "--out", str(ckpt)]) == 0
    stock = AutoModelForCausalLM.from_pretrained(ckpt)
    assert stock.config.num_local_experts == 8
