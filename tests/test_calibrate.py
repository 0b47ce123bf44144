"""The layer-wise runner sees exactly what a full forward pass feeds each MoE block."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import sample_ids, tiny_model

from moeslim.calibrate import ExpertOutputs, LayerDecision, RoutingStats, run_layerwise
from moeslim.models import MoELayer, find_moe_layers


class _Record:
    key = "record"

    def __init__(self) -> None:
        self.xs: list[torch.Tensor] = []

    def observe(self, layer: MoELayer, x: torch.Tensor) -> None:
        self.xs.append(x.clone())

    def result(self) -> torch.Tensor:
        return torch.cat(self.xs)


def _block_inputs(model: torch.nn.Module, ids: torch.Tensor, replace: dict[int, Any] | None = None
                  ) -> dict[int, torch.Tensor]:
    """Block inputs of a full forward (batch by batch of 2, as the runner), optionally replacing outputs."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for layer in find_moe_layers(model):
        def hook(_m: torch.nn.Module, args: tuple, out: Any, idx: int = layer.layer_idx) -> Any:
            x = args[0]
            seen.setdefault(idx, []).append(x.reshape(-1, x.shape[-1]).clone())
            if replace and idx in replace:
                return replace[idx](x)
            return None
        handles.append(layer.block.register_forward_hook(hook))
    with torch.no_grad():
        for start in range(0, ids.shape[0], 2):
            model(ids[start:start + 2])
    for h in handles:
        h.remove()
    return {i: torch.cat(v) for i, v in seen.items()}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_runner_inputs_equal_full_forward(family: str) -> None:
    """Every layer gets the arguments the model's own forward gives it: gpt_oss alternates sliding-window
    (16) and full attention, and windows of 40 tokens make the two masks differ."""
    model = tiny_model(family, seed=0)
    ids = sample_ids(seed=1, batch=4, seq=40)
    results = run_layerwise(model, ids, lambda layer: [_Record()], batch_size=2, progress=False)
    expected = _block_inputs(model, ids)
    assert sorted(results) == sorted(expected) == [layer.layer_idx for layer in find_moe_layers(model)]
    for idx, entry in results.items():
        assert torch.allclose(entry["record"], expected[idx], atol=1e-5)


def test_compressed_propagation_feeds_the_override_forward() -> None:
    model = tiny_model("mixtral", seed=0)
    ids = sample_ids(seed=2, batch=2, seq=8)
    first = find_moe_layers(model)[0].layer_idx

    def zero_first(layer: MoELayer, observers: Any) -> LayerDecision:
        override = (lambda x: torch.zeros_like(x)) if layer.layer_idx == first else None
        return LayerDecision(result=observers[0].result(), override=override)

    compressed = run_layerwise(model, ids, lambda layer: [_Record()], zero_first, propagate="compressed",
                               batch_size=2, progress=False)
    original = run_layerwise(model, ids, lambda layer: [_Record()], zero_first, propagate="original",
                             batch_size=2, progress=False)
    expected = _block_inputs(model, ids, replace={first: torch.zeros_like})
    second = sorted(compressed)[1]
    assert torch.allclose(compressed[second], expected[second], atol=1e-5)
    assert not torch.allclose(original[second], expected[second], atol=1e-3)


def test_routing_stats_and_expert_outputs_match_direct_computation() -> None:
    model = tiny_model("mixtral", seed=0)
    ids = sample_ids(seed=3, batch=2, seq=12)
    results = run_layerwise(
        model, ids, lambda layer: [RoutingStats(layer.num_experts), ExpertOutputs(), _Record()], progress=False)
    for layer in find_moe_layers(model):
        entry = results[layer.layer_idx]
        x = entry["record"]
        weights, top = layer.route(layer.router_logits(x))
        stats = entry["routing"]
        assert torch.equal(stats.counts, torch.bincount(top.flatten(), minlength=layer.num_experts).double())
        assert stats.tokens == x.shape[0] and abs(float(stats.load.sum()) - 1) < 1e-9
        sample = entry["expert_outputs"]
        routed = layer.combine(sample.outputs, *layer.route(sample.logits))
        with torch.no_grad():
            assert torch.allclose(routed, layer.forward(x), atol=1e-5)


class _WhereComputed:
    """Records where each observed block input lives and where the layer's experts are at that moment."""

    key = "where"

    def __init__(self) -> None:
        self.seen: list[tuple[torch.device, torch.device]] = []
        self.xs: list[torch.Tensor] = []

    def observe(self, layer: MoELayer, x: torch.Tensor) -> None:
        self.seen.append((x.device, next(layer.experts.parameters()).device))
        self.xs.append(x.detach().cpu().clone())

    def result(self) -> dict[str, Any]:
        return {"seen": self.seen, "x": torch.cat(self.xs)}


COMPUTE_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the GPU check of the device path)"))]


@pytest.mark.parametrize("device", COMPUTE_DEVICES)
def test_runner_computes_each_layer_on_the_given_device_and_moves_it_back(device: str) -> None:
    # The runner's device path: the model stays where it is (CPU); each decoder layer is moved to ``device``
    # for its turn, observers see tensors there, and the layer goes back. Results match the default run.
    model = tiny_model("mixtral", seed=0)
    ids = sample_ids(seed=2, batch=4, seq=24)
    reference = run_layerwise(model, ids, lambda layer: [_WhereComputed()], batch_size=2, progress=False,
                              device="cpu")
    results = run_layerwise(model, ids, lambda layer: [_WhereComputed()], batch_size=2, progress=False,
                            device=torch.device(device))
    want = torch.device(device)
    for idx, entry in results.items():
        seen = entry["where"]["seen"]
        assert len(seen) == 2 and all(x.type == want.type and w.type == want.type for x, w in seen), seen
        torch.testing.assert_close(entry["where"]["x"], reference[idx]["where"]["x"], rtol=1e-4, atol=1e-4)
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # every layer went back
