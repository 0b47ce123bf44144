"""Every family of the table, on a tiny model built from its own config class (defaults shrunk by rule):
routing and block output equal the family's own forward; prune -> apply -> save -> stock reload equals the
masked original; the skipping forward equals its reference; quantize -> apply -> save -> ``moeslim.load``
gives the in-memory quantized model. Public API only."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from collections.abc import Iterator
from functools import cache

import pytest
import torch
from tiny_models import HIDDEN, all_families, sample_ids, tiny_model
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.methods.skip.thresholds import keep_mask, rescale_kept
from moeslim.models import (
    MoELayer,
    UnsupportedModelError,
    family_of,
    find_moe_layers,
    masked_routing_is_identity,
    select_experts,
)
from moeslim.runtime.skipping import SkippingUnsupportedError, install_skipping

FAMILIES = all_families()
CALIB = sample_ids(0, 4, 16)
PROBE = sample_ids(7, 2, 24)


@cache
def _model(family: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_model(family)


@pytest.fixture
def fresh(request: pytest.FixtureRequest) -> Iterator[torch.nn.Module]:
    """A private copy of the family's tiny model (built once per session, copied per test)."""
    yield copy.deepcopy(_model(request.node.callspec.params["family"]))


def _tokens(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, HIDDEN), generator=torch.Generator().manual_seed(seed))


def _sorted(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.long().argsort(dim=-1)
    return weights.float().reshape(ids.shape).gather(1, order), ids.long().gather(1, order)


def _own_router_output(moe: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weights, ids) from the family's own router module (outermost wrapper first), or None if it needs
    arguments this test cannot supply."""
    bias = moe.correction_bias()
    inside = list(moe.router.modules())[1:]  # the router's own parts (ERNIE's moe_statics) are not routers
    for owner in reversed([o for o in moe.routing_owners()[:-1] if o not in inside]):
        n_args = len([p for p in inspect.signature(owner.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
        extra = () if n_args == 1 else (bias,) if n_args == 2 and bias is not None else None
        if extra is None:
            continue
        for inputs in (x, x.unsqueeze(0)):  # some routers take (B, S, H)
            try:
                with torch.no_grad():
                    out = owner(inputs, *extra)
            except ValueError:
                continue
            if isinstance(out, tuple) and len(out) >= 3:
                return out[1], out[2]
    return None


@pytest.mark.parametrize("family", FAMILIES)
def test_route_and_block_equal_family_forward(family: str) -> None:
    model = _model(family)
    x = _tokens()
    layers = find_moe_layers(model)
    assert layers and all(moe.num_experts == 8 for moe in layers)
    for moe in layers:
        weights, ids = moe.route(moe.router_logits(x))
        own = _own_router_output(moe, x)
        if own is not None:
            scale = float(moe.routing_kwargs().get("scaling", 1.0)) if moe.family.scaling_in_block else 1.0
            w, i = _sorted(weights / scale, ids)
            ref_w, ref_i = _sorted(*own)
            assert torch.equal(i, ref_i)
            torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-6)
        with torch.no_grad():
            block = moe.block_output(moe.block(x.unsqueeze(0)))[0]
        torch.testing.assert_close(moe.forward(x), block, rtol=0, atol=2e-6)
        shared = moe.shared_output(x)
        rebuilt = moe.combine(moe.expert_outputs(x), weights, ids) + (0 if shared is None else shared)
        torch.testing.assert_close(rebuilt, block, rtol=0, atol=1e-5)


def _masked_reference(model: torch.nn.Module, kept: dict[int, list[int]]) -> torch.nn.Module:
    """A copy whose MoE blocks compute masked routing of the original (dropped experts never chosen; softmax
    families: -inf logits). When ``select_experts`` must drop group limits, the copy drops them too."""
    ref = copy.deepcopy(model)
    drop_groups = not masked_routing_is_identity(model, kept)
    for moe in find_moe_layers(ref):
        if drop_groups:
            moe.router.num_group = moe.router.topk_group = 1
        allowed = torch.zeros(moe.num_experts, dtype=torch.bool)
        allowed[kept[moe.layer_idx]] = True

        def hook(module, args, output, moe=moe, allowed=allowed):
            x = args[0]
            out = moe.forward(x.reshape(-1, x.shape[-1]), allowed).view(x.shape)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        moe.block.register_forward_hook(hook)
    return ref


def _routes_to_dropped(model: torch.nn.Module, kept: dict[int, list[int]]) -> bool:
    """Whether the original model chooses a dropped expert for some token of PROBE."""
    hits: list[bool] = []
    handles = []
    for moe in find_moe_layers(model):

        def hook(module, args, output, moe=moe):
            _, ids = moe.route(moe.router_logits(args[0].reshape(-1, args[0].shape[-1])))
            hits.append(bool((~torch.isin(ids, torch.tensor(kept[moe.layer_idx]))).any()))

        handles.append(moe.block.register_forward_hook(hook))
    try:
        _logits(model)
    finally:
        for handle in handles:
            handle.remove()
    return any(hits)


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(PROBE).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_stock_reload_equals_masked_original(family: str, fresh, tmp_path) -> None:
    config = moeslim.PruneConfig(method="frequency", keep=4)
    if family_of(fresh).layerwise_blocker:
        # Calibration is refused with the reason; pruning itself (select_experts) still has to be exact.
        with pytest.raises(UnsupportedModelError, match=f"{family}: layer-wise calibration"):
            moeslim.plan_prune(fresh, CALIB, config, "tiny")
        kept = {moe.layer_idx: [0, 3, 4, 6] for moe in find_moe_layers(fresh)}
        ref = _masked_reference(fresh, kept)
        select_experts(fresh, kept)
    else:
        plan = moeslim.plan_prune(fresh, CALIB, config, "tiny")
        kept = {int(idx): [int(e) for e in ids] for idx, ids in plan.layers.items()}
        ref = _masked_reference(fresh, kept)
        moeslim.apply(fresh, plan)
    pruned = _logits(fresh)
    if _routes_to_dropped(_model(family), kept):  # then pruning must change the logits (the test is not vacuous)
        assert not torch.allclose(pruned, _logits(_model(family)), atol=1e-4)
    torch.testing.assert_close(pruned, _logits(ref), rtol=0, atol=5e-5)
    moeslim.save(fresh, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert all(moe.num_experts == 4 for moe in find_moe_layers(loaded))
    torch.testing.assert_close(_logits(loaded), pruned, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_forward_equals_reference(family: str, fresh) -> None:
    layer = find_moe_layers(fresh)[0]
    if family_of(fresh).skip_blocker:
        with pytest.raises(SkippingUnsupportedError, match=f"{family}: dynamic expert skipping cannot run"):
            install_skipping(fresh, {layer.layer_idx: 0.6})
        return
    x = _tokens(40, seed=0)
    weights, ids = layer.route(layer.router_logits(x))
    keep = keep_mask(weights, 0.6, "top2")
    manual = layer.combine(layer.expert_outputs(x), rescale_kept(weights, keep), ids)
    install_skipping(fresh, {layer.layer_idx: 0.6})
    with torch.no_grad():
        got = layer.experts(x, ids, weights)
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)
    assert layer.experts.moeslim_counters["expert_calls"] == int(keep.sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_save_load_round_trip(family: str, fresh, tmp_path) -> None:
    config = moeslim.QuantizeConfig(method="uniform", bits=4, group_size=16, quantizer="rtn")
    moeslim.apply(fresh, moeslim.plan_quantize(fresh, CALIB, config, "tiny"))
    expected = _logits(fresh)
    moeslim.save(fresh, tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _ = moeslim.load(tmp_path / "q")
    loaded.set_attn_implementation("eager")
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-5)


GROUPED = [f for f in FAMILIES if int(find_moe_layers(_model(f))[0].routing_kwargs().get("n_group", 1) or 1) > 1]


@pytest.mark.parametrize("family", GROUPED)
def test_equal_groups_keep_group_limits(family: str, fresh) -> None:
    """2 experts kept in each of the 2 groups: the groups stay and the pruned model equals masked routing."""
    kept = {moe.layer_idx: [1, 2, 4, 7] for moe in find_moe_layers(fresh)}
    assert masked_routing_is_identity(fresh, kept)
    ref = _masked_reference(fresh, kept)
    select_experts(fresh, kept)
    assert all(moe.routing_kwargs()["n_group"] == 2 for moe in find_moe_layers(fresh))
    torch.testing.assert_close(_logits(fresh), _logits(ref), rtol=0, atol=5e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lowrank_full_rank_and_merge_reload(family: str, fresh, tmp_path) -> None:
    """Low-rank at ratio 1 is the original; an HC-SMoE merge to 4 experts (router fit: 4 experts; router keep: E
    slots) saves and reloads in stock transformers with the logits it had in memory."""
    from moeslim.methods.lowrank import LowRankConfig, plan_lowrank
    from moeslim.methods.merge import MergeConfig, plan_merge

    merge = MergeConfig(method="hc-smoe", keep=4, router="fit")
    if family_of(fresh).layerwise_blocker:
        with pytest.raises(UnsupportedModelError, match=f"{family}: layer-wise calibration"):
            plan_merge(fresh, CALIB, merge, "tiny")
        return
    original = _logits(fresh)
    low = copy.deepcopy(fresh)
    moeslim.apply(low, plan_lowrank(low, CALIB, LowRankConfig(ratio=1.0), "tiny"), calibration=CALIB)
    torch.testing.assert_close(_logits(low), original, rtol=0, atol=1e-5)

    experts = find_moe_layers(fresh)[0].num_experts
    keep = copy.deepcopy(fresh)  # router='keep' (the papers'): E slots holding their group's merged expert
    moeslim.apply(keep, plan_merge(keep, CALIB, dataclasses.replace(merge, router="keep"), "tiny"))
    moeslim.apply(fresh, plan_merge(fresh, CALIB, merge, "tiny"), calibration=CALIB)
    for model, count in ((fresh, 4), (keep, experts)):
        merged = _logits(model)
        assert all(moe.num_experts == count for moe in find_moe_layers(model))
        moeslim.save(model, tmp_path / f"merged{count}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"merged{count}",
                                                          attn_implementation="eager").eval()
        assert all(moe.num_experts == count for moe in find_moe_layers(loaded))
        torch.testing.assert_close(_logits(loaded), merged, rtol=0, atol=1e-5)
