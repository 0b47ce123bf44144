"""Family adapters: discovery, routing and the MoELayer view agree with each family's own modules."""

from __future__ import annotations

import time

import pytest
import torch
from tiny_models import FAMILIES, HIDDEN, sample_ids, tiny_llama, tiny_model

from moeslim.models import (
    FAMILIES as FAMILY_TABLE,
)
from moeslim.models import (
    UnsupportedModelError,
    decoder_layers,
    family_of,
    find_moe_layers,
    load_model,
    masked_routing_is_identity,
    moe_summary,
    resolve_model_path,
)
from moeslim.models.routing import softmax_topk

EXPECTED_MOE_LAYERS = {"qwen3_moe": [1, 2], "deepseek_v2": [1, 2], "deepseek_v3": [1, 2], "glm4_moe": [1, 2]}


def _tokens(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, HIDDEN), generator=torch.Generator().manual_seed(seed))


def _sorted_by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the k columns in id order (DeepSeek / GLM routers return unsorted top-k)."""
    order = ids.argsort(dim=-1)
    return weights.float().gather(1, order), ids.long().gather(1, order)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, tiny_model(request.param)


def test_family_table_covers_fixture_families() -> None:
    assert set(FAMILIES) <= set(FAMILY_TABLE)


def test_route_equals_family_router(family_model) -> None:
    _, model = family_model
    x = _tokens()
    for moe in find_moe_layers(model):
        _, ref_w, ref_ids = moe.router(x)
        w, ids = moe.route(moe.router_logits(x))
        assert w.dtype == torch.float32 and ids.dtype == torch.long
        w, ids = _sorted_by_id(w, ids)
        ref_w, ref_ids = _sorted_by_id(ref_w, ref_ids)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-6)


def test_forward_equals_block(family_model) -> None:
    _, model = family_model
    x = _tokens()
    for moe in find_moe_layers(model):
        with torch.no_grad():
            ref = moe.block_output(moe.block(x.unsqueeze(0)))[0]
        torch.testing.assert_close(moe.forward(x), ref, rtol=0, atol=1e-6)


def test_expert_outputs_combine_and_shared_rebuild_block(family_model) -> None:
    _, model = family_model
    x = _tokens()
    for moe in find_moe_layers(model):
        outs = moe.expert_outputs(x)  # (T, E, H)
        assert outs.shape == (x.shape[0], moe.num_experts, HIDDEN)
        torch.testing.assert_close(moe.expert_outputs(x, [3, 1]), outs[:, [3, 1]])
        weights, ids = moe.route(moe.router_logits(x))
        shared = moe.shared_output(x)
        rebuilt = moe.combine(outs, weights, ids) + (0 if shared is None else shared)
        torch.testing.assert_close(rebuilt, moe.forward(x), rtol=0, atol=1e-5)
        assert (shared is not None) == bool(moe.family.shared_attrs)


def test_masked_route_never_picks_dropped(family_model) -> None:
    _, model = family_model
    x = _tokens(64)
    for moe in find_moe_layers(model):
        allowed = torch.ones(moe.num_experts, dtype=torch.bool)
        allowed[[0, 5]] = False
        logits = moe.router_logits(x)
        _, ids = moe.route(logits, allowed)
        assert not torch.isin(ids, torch.tensor([0, 5])).any()
        _, free_ids = moe.route(logits)
        assert torch.isin(free_ids, torch.tensor([0, 5])).any()  # the mask really changed something
        probs = moe.gate_probs(logits)
        assert probs.shape == logits.shape and torch.isfinite(probs).all()


def test_masked_routing_identity_flag(family_model) -> None:
    name, model = family_model
    grouped = name in ("deepseek_v2", "deepseek_v3")  # n_group=2 in the tiny configs
    assert masked_routing_is_identity(model) is (not grouped)


def test_moe_layers_and_dense_layers(family_model) -> None:
    name, model = family_model
    n_layers = len(decoder_layers(model))
    moe_ids = [moe.layer_idx for moe in find_moe_layers(model)]
    assert moe_ids == EXPECTED_MOE_LAYERS.get(name, list(range(n_layers)))
    summary = moe_summary(model)
    assert summary["moe_layers"] == moe_ids
    assert summary["dense_layers"] == [i for i in range(n_layers) if i not in moe_ids]
    assert summary["family"] == name and summary["experts"] == 8 and summary["top_k"] == 2
    params = summary["params"]
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert params["expert"] == sum(p.numel() for m in find_moe_layers(model) for p in m.experts.parameters())
    assert params["activated_per_token"] == params["total"] - params["expert"] + params["expert"] // 4
    assert (summary["shared_experts"] > 0) == (params["shared"] > 0)


def test_family_of_reads_config() -> None:
    model = tiny_model("deepseek_v3")
    assert family_of(model).name == "deepseek_v3"
    assert family_of(model.config).routing == "sigmoid_group"


def test_non_moe_model_raises_naming_what_was_found() -> None:
    with pytest.raises(UnsupportedModelError) as info:
        find_moe_layers(tiny_llama())
    message = str(info.value)
    assert "LlamaForCausalLM" in message and "LlamaMLP" in message and "'llama'" in message
    assert "mixtral" in message and "deepseek_v3" in message  # lists supported families


@pytest.mark.parametrize(("source", "renormalize"), [("mixtral", True), ("qwen2_moe", False)])
def test_unlisted_model_type_uses_generic_row(source: str, renormalize: bool) -> None:
    model = tiny_model(source)
    # Pretend the architecture is unknown to the table: only structure and the router's output are left.
    object.__setattr__(model.config, "model_type", "my_custom_moe")
    layers = find_moe_layers(model)
    assert layers[0].family.name == "generic"
    assert layers[0].family.routing == "softmax_topk" and layers[0].family.renormalize is renormalize
    x = _tokens()
    for moe in layers:
        with torch.no_grad():
            ref = moe.block(x.unsqueeze(0))[0]
        torch.testing.assert_close(moe.forward(x), ref, rtol=0, atol=1e-6)


def test_routing_function_shapes() -> None:
    logits = torch.randn(5, 8)
    allowed = torch.tensor([True] * 4 + [False] * 4)
    w, ids = softmax_topk(logits, top_k=2, renormalize=True, allowed=allowed)
    assert w.shape == ids.shape == (5, 2)
    assert (ids < 4).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(5))


def test_resolve_model_path(tmp_path) -> None:
    import moeslim

    assert resolve_model_path("demo").endswith("assets/demo-moe")
    assert resolve_model_path("demo").startswith(str(__import__("pathlib").Path(moeslim.__file__).parent))
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"


def test_load_model_local_dir(tmp_path) -> None:
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path))
    assert tokenizer is None
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_load_model_offline_fails_fast(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_model("moeslim-test/does-not-exist")
    assert time.monotonic() - start < 10
