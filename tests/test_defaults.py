"""Measured defaults: each pruning method's mode, progressive merging, evenly spaced calibration windows."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_models import HIDDEN, sample_ids, tiny_model

from moeslim.appliers.merge import apply_merge
from moeslim.cli import main
from moeslim.config import ConfigError
from moeslim.methods.merge import MergeConfig, merge_layer, plan_merge
from moeslim.methods.merge.driver import LayerGroups, merged_block
from moeslim.methods.prune import PruneConfig, plan_prune
from moeslim.methods.prune.config import DEFAULT_MODES, PRUNE_METHODS
from moeslim.models import find_moe_layers

IDS = sample_ids(seed=4, batch=4, seq=16)
CALIB = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]


@pytest.mark.parametrize("method", PRUNE_METHODS)
def test_unset_mode_is_the_methods_default_and_the_plan_records_it(method: str) -> None:
    config = PruneConfig(method=method, keep=6)  # type: ignore[arg-type]
    assert config.mode is None and config.effective_mode == DEFAULT_MODES[method]
    assert config.to_dict()["mode"] == DEFAULT_MODES[method]
    plan = plan_prune(tiny_model("mixtral"), IDS, config)
    assert plan.summary["mode"] == plan.provenance.config["mode"] == DEFAULT_MODES[method]
    other = "layerwise" if DEFAULT_MODES[method] == "progressive" else "progressive"
    assert PruneConfig(method=method, keep=6, mode=other).to_dict()["mode"] == other  # type: ignore[arg-type]


def test_unset_mode_with_global_allocation_is_layerwise() -> None:
    config = PruneConfig(method="enumerate", keep=6, allocation="global")
    assert config.effective_mode == "layerwise"
    with pytest.raises(ConfigError, match="progressive"):
        PruneConfig(method="enumerate", keep=6, allocation="global", mode="progressive")


def test_progressive_prune_is_what_the_default_mode_table_says() -> None:
    """An unset mode plans exactly what the explicit default mode plans (kept sets and losses)."""
    model = tiny_model("mixtral")
    for method in ("enumerate", "reap"):
        unset = plan_prune(model, IDS, PruneConfig(method=method, keep=4, score=True))  # type: ignore[arg-type]
        explicit = plan_prune(model, IDS, PruneConfig(method=method, keep=4, score=True,  # type: ignore[arg-type]
                                                      mode=DEFAULT_MODES[method]))
        assert unset.layers == explicit.layers
        assert unset.summary["layers"].keys() == explicit.summary["layers"].keys()


def test_progressive_merge_propagates_the_merged_block() -> None:
    """The block a progressive merge plan propagates is the block the applied model computes."""
    model = tiny_model("mixtral")
    config = MergeConfig(keep=4, router="fit", fit_rows="representative", mode="progressive")
    plan = plan_merge(model, IDS, config)
    layerwise = plan_merge(model, IDS, MergeConfig(keep=4, router="fit", fit_rows="representative"))
    first = min(plan.layers)
    assert plan.layers[first] == layerwise.layers[first]  # the first layer sees the same inputs in both modes
    assert plan.summary["mode"] == "progressive"
    assert plan.layers != layerwise.layers  # later layers see the merged model's outputs and group differently

    layer = find_moe_layers(model)[0]
    entry = plan.layers[layer.layer_idx]
    decision = LayerGroups(entry["groups"], entry["weights"], entry["representatives"])
    block = merged_block(layer, merge_layer(layer, decision, None, config))
    merged = copy.deepcopy(model)
    apply_merge(merged, plan)
    x = torch.randn(24, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = find_moe_layers(merged)[0].block(x[None])
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(block(x), out.reshape(x.shape), rtol=1e-5, atol=1e-6)


def test_apply_redraws_even_windows_of_a_progressive_merge_plan(tiny_model_dir: Path, tmp_path: Path) -> None:
    """apply reruns the router fits on the plan's windows: the spacing is recorded and redrawn, or the hashes differ."""
    plan = tmp_path / "m.json"
    assert main(["plan", "merge", str(tiny_model_dir), "--keep", "4", "--router", "fit", "--mode", "progressive",
                 "--spacing", "even",
                 *CALIB, "--out", str(plan)]) == 0
    summary = json.loads(plan.read_text())["summary"]
    assert summary["calibration"]["spacing"] == "even" and summary["mode"] == "progressive"
    out = tmp_path / "merged"
    assert main(["apply", str(tiny_model_dir), str(plan), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
