"""The joint planner's low-rank options: exact choice, exact bytes on applied and reloaded models, refusals."""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import error_line
from tiny_models import sample_ids, tiny_model

import moeslim
from moeslim.appliers import apply
from moeslim.calibrate import ExpertOutputs, ExpertOutputSample, LayerDecision, result_of, run_layerwise
from moeslim.cli import main
from moeslim.config import ConfigError
from moeslim.evaluate.cost import param_bytes
from moeslim.export import UnsupportedExportError, export_compressed_tensors
from moeslim.methods.joint import JointConfig, measure_options, plan_joint
from moeslim.methods.joint.config import MIB, resolve_targets
from moeslim.methods.joint.lowrank_options import expert_ranks
from moeslim.methods.joint.sizes import LayerBytes
from moeslim.methods.joint.solve import SizeOption, min_held_bytes, solve_joint
from moeslim.models import find_moe_layers
from moeslim.models.expert_math import expert_forward, expert_weight_views
from moeslim.plans import Plan, PlanError
from moeslim.runtime.lowrank import lowrank_storage
from moeslim.workflows.plan_summary import summarize

CALIB = sample_ids(0, 4, 16)
PROBE = sample_ids(7, 2, 12)
SHARES = (0.25, 0.5)


# -- the knapsack with a mode per layer: exact on cases small enough to enumerate ------------------------------

def _options(rng: np.random.Generator, num_experts: int, widths: tuple[int, ...], shares: tuple[float, ...]
             ) -> list[SizeOption]:
    out = []
    for k in range(1, num_experts + 1):
        kept = tuple(sorted(rng.choice(num_experts, size=k, replace=False).tolist()))
        quant = rng.exponential(1.0, size=(k, len(widths)))
        quant[:, widths.index(16)] = 0.0
        out.append(SizeOption(kept, 0.0 if k == num_experts else float(rng.exponential(3.0 / k)), quant,
                              rng.dirichlet(np.ones(k)) * min(2, k), rank_err=rng.exponential(1.0, (k, len(shares)))))
    return out


def _brute_force(options: dict[int, list[SizeOption]], widths: tuple[int, ...], shares: tuple[float, ...],
                 sizes: dict[int, LayerBytes], base: int, target: int) -> float:
    """Least error over every layer's every (size, mode, per-expert format) decision."""
    per_layer = []
    for idx, opts in options.items():
        lb = sizes[idx]
        choices = []
        for opt in opts:
            for bits in itertools.product(range(len(widths)), repeat=len(opt.kept)):
                err = opt.prune_err + sum(opt.quant_err[e, j] for e, j in enumerate(bits))
                choices.append((lb.saving([widths[j] for j in bits]), err))
            formats = [None, *shares]
            for picks in itertools.product(range(len(formats)), repeat=len(opt.kept)):
                err = opt.prune_err + sum(opt.rank_err[e, j - 1] for e, j in enumerate(picks) if j)
                choices.append((lb.saving_lowrank([formats[j] for j in picks]), err))
        per_layer.append(choices)
    best = np.inf
    for combo in itertools.product(*per_layer):
        if base - sum(c[0] for c in combo) <= target:
            best = min(best, sum(c[1] for c in combo))
    return float(best)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimum_with_rank_options_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    widths, shares, num_experts = (2, 16), SHARES, 3
    sizes = {i: LayerBytes(num_experts=num_experts, row=7 + i, width={2: 30 + i, 16: 200},
                           rank={0.25: 50, 0.5: 100 + i}, rank_ranks={0.25: (1, 1), 0.5: (2, 2)}) for i in range(2)}
    options = {i: _options(rng, num_experts, widths, shares) for i in range(2)}
    base = 5000
    low = min_held_bytes(base, sizes, dict.fromkeys(sizes, 1), widths, shares)
    modes = set()
    for target in np.linspace(low, base - 1, 7).astype(int).tolist():
        expected = _brute_force(options, widths, shares, sizes, base, target)
        got = solve_joint(options, widths, sizes, base, target, ranks=shares)
        assert got.error == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert got.held_bytes <= target
        modes |= {c.ranks is not None for c in got.layers.values()}
    assert modes == {True, False}  # both modes are chosen somewhere: the test exercises the choice


# -- applied models: mixed low-rank / quantized layers, bytes exact after apply and after save -> load ----------

def _forced_plan(model: torch.nn.Module, slack: float, prune_first: bool) -> Plan:
    """A plan whose first MoE layer is low-rank and the others quantized: the measured options with the first
    layer's quantization priced out (random tiny experts are full-rank noise, so the planner would not choose
    low-rank on its own); ``prune_first``: the first layer keeps its fewest experts, the others all (unequal
    counts, the compact layout)."""
    config = JointConfig(target_ratio=0.999, ranks=SHARES, quantizer="rtn")
    targets = resolve_targets(model, config)
    options = measure_options(model, CALIB, config, targets)
    first = min(options)
    for idx, opts in options.items():
        options[idx] = [dataclasses.replace(
            o, quant_err=o.quant_err * (1e6 if idx == first else 1.0) + (1.0 if idx == first else 0.0),
            rank_err=o.rank_err * (1e-3 if idx == first else 1e6),
            prune_err=(0.0 if idx == first else 1e9) if prune_first and len(o.kept) < targets.sizes[idx].num_experts
            else o.prune_err) for o in opts]
    # the first layer at its fewest (or all) experts at the smallest share, the others every expert at 2 bits
    kept = min(targets.kept_sizes) if prune_first else targets.sizes[first].num_experts
    sizes = targets.sizes
    low = targets.base - sizes[first].saving_lowrank([min(SHARES)] * kept) - sum(
        lb.saving([2] * lb.num_experts) for idx, lb in sizes.items() if idx != first)
    target = int(low + slack * (sizes[first].dense - sizes[first].rank[min(SHARES)]))
    return plan_joint(model, CALIB, dataclasses.replace(config, target_ratio=None, target_mib=target / MIB), "tiny",
                      options=options)


@pytest.mark.parametrize(("family", "prune_first"), [("mixtral", False), ("qwen3_moe", True), ("olmoe", True)])
def test_mixed_lowrank_and_quantized_layers_hold_the_planned_bytes(family: str, prune_first: bool, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(family)
    plan = _forced_plan(model, 2.5, prune_first)
    modes = {idx: "ranks" in entry for idx, entry in plan.layers.items()}
    assert modes[min(modes)] and not all(modes.values()), plan.layers
    assert any(r is not None for r in plan.layers[min(modes)]["ranks"])
    assert any(b < 16 for idx, entry in plan.layers.items() if not modes[idx] for b in entry["bits"])
    if prune_first:
        assert len({len(entry["kept"]) for entry in plan.layers.values()}) > 1, plan.layers  # compact layout
    shown = "\n".join(summarize(plan))
    assert "low-rank" in shown and " bits" in shown, shown
    apply(model, plan, calibration=CALIB)
    assert param_bytes(model)["total"] == plan.summary["held_bytes"] <= plan.summary["target_bytes"]
    with torch.no_grad():
        expected = model(PROBE).logits
    moeslim.save(model, tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _ = moeslim.load(tmp_path / "m")
    assert param_bytes(loaded)["total"] == plan.summary["held_bytes"]
    loaded.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, expected, rtol=0, atol=1e-5)
    if family == "mixtral":  # exports have no format for low-rank experts: refused, naming them
        with pytest.raises(UnsupportedExportError, match="low-rank experts"):
            export_compressed_tensors(loaded, None, tmp_path / "ct")
        assert main(["export", str(tmp_path / "m"), "--stream", "--format", "gguf", "--out",
                     str(tmp_path / "m.gguf")]) == 2
        assert "low-rank experts" in error_line(capsys)


def test_full_rank_option_has_no_error_and_keeps_the_logits(tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        original = model(PROBE).logits
    config = JointConfig(target_ratio=0.9, ranks=(1.0,), quantizer="rtn")
    options = measure_options(model, CALIB, config, resolve_targets(model, config))
    assert all(float(np.abs(o.rank_err).max()) < 1e-9 for opts in options.values() for o in opts)
    plan = plan_joint(model, CALIB, config, "tiny", options=options)
    layers = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    full = {idx: list(expert_ranks(layer, 1.0)) for idx, layer in layers.items()}
    # every layer low-rank at full rank (nothing quantized): the original model's logits
    plan = dataclasses.replace(plan, layers={idx: {"kept": list(range(layer.num_experts)),
                                                   "bits": [16] * layer.num_experts,
                                                   "ranks": [full[idx]] * layer.num_experts}
                                             for idx, layer in layers.items()})
    apply(model, plan, calibration=CALIB)
    assert "quantize" not in model.config.moeslim and set(model.config.moeslim["lowrank"]["layers"]) == {
        str(idx) for idx in layers}
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE).logits, original, rtol=0, atol=1e-5)
    moeslim.save(model, tmp_path / "f")
    loaded, _ = moeslim.load(tmp_path / "f")
    loaded.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, original, rtol=0, atol=1e-5)


def test_rank_error_estimate_equals_the_applied_factors_error() -> None:
    """With every calibration token in the sample and no pruning, the planner's covariances are apply's: its
    estimated error of a low-rank layer is the applied factors' gate^2-weighted output error on those tokens."""
    model = tiny_model("mixtral")
    applied = tiny_model("mixtral")
    config = JointConfig(target_ratio=0.9, ranks=(0.5,), quantizer="rtn", max_tokens=None)
    targets = resolve_targets(model, config)
    options = measure_options(model, CALIB, config, targets)
    samples = run_layerwise(model, CALIB, make_observers=lambda _layer: [ExpertOutputs(max_tokens=None)],
                            on_layer=lambda _layer, obs: LayerDecision(result=result_of(obs[0], ExpertOutputSample)))
    template = plan_joint(model, CALIB, config, "tiny", options=options)
    layers = {idx: {"kept": list(opts[-1].kept), "bits": [16] * len(opts[-1].kept),
                    "ranks": [list(targets.sizes[idx].rank_ranks[0.5])] * len(opts[-1].kept)}
              for idx, opts in options.items()}
    apply(applied, dataclasses.replace(template, layers=layers), calibration=CALIB)
    found = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    for idx, opts in options.items():
        layer, sample = found[idx], samples[idx]
        store = lowrank_storage(find_moe_layers(applied)[list(found).index(idx)].experts)
        views = expert_weight_views(layer)
        weights, ids = layer.route(sample.logits)
        measured = 0.0
        for e in range(layer.num_experts):
            up, down = (store[name].weight(e).T if views.transposed else store[name].weight(e)
                        for name in (views.up_name, views.down_name))
            out = expert_forward(layer, sample.x, e, up=up, down=down)
            gate = (weights * (ids == e)).sum(dim=1)
            measured += float((gate.double() ** 2 * (sample.outputs[:, e] - out).double().pow(2).sum(dim=-1)).sum())
        estimated = float(opts[-1].rank_err[:, 0].sum())
        assert estimated > 0
        assert estimated == pytest.approx(measured, rel=1e-3)


# -- refusals ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("values", "message"), [
    ({"ranks": (0.0,)}, "in \\(0, 1\\]"),
    ({"ranks": (1.5,)}, "in \\(0, 1\\]"),
    ({"ranks": (0.5, 0.5)}, "distinct"),
    ({"ranks": (0.5,), "error_scale": "kl"}, "error_scale='squared'"),
    ({"ranks": (0.5,), "rank_damp": 0.0}, "rank_damp"),
])
def test_config_refuses_bad_ranks(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JointConfig(target_ratio=0.5, **values)


def test_share_too_small_for_a_rank_is_refused_before_work() -> None:
    with pytest.raises(ConfigError, match="no rank; use shares of at least"):
        JointConfig(target_ratio=0.5, ranks=(0.001,)).check_model(tiny_model("mixtral"))


@pytest.mark.parametrize(("entry", "message"), [
    ({"kept": [0, 1], "bits": [16, 16], "ranks": [[2, 2]]}, "one entry per kept expert"),
    ({"kept": [0, 1], "bits": [4, 16], "ranks": [[2, 2], None]}, "keeps every width at 16"),
    ({"kept": [0, 1], "bits": [16, 16], "ranks": [[0, 2], None]}, "ranks are 1 or more"),
    ({"kept": [0, 1], "bits": [16, 16], "ranks": [[2, 2, 2], None]}, "up rank, down rank"),
])
def test_plan_refuses_bad_ranks(entry: dict, message: str) -> None:
    data = plan_joint(tiny_model("mixtral"), CALIB, JointConfig(target_ratio=0.8, quantizer="rtn"), "tiny").to_dict()
    Plan.from_dict(json.loads(json.dumps(data)))  # as planned: valid
    data["layers"] = {"0": entry}
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(json.loads(json.dumps(data)))


def test_rank_above_full_is_refused_in_apply() -> None:
    model = tiny_model("mixtral")
    plan = plan_joint(model, CALIB, JointConfig(target_ratio=0.8, quantizer="rtn"), "tiny")
    n = find_moe_layers(model)[0].num_experts
    plan = dataclasses.replace(plan, layers={0: {"kept": list(range(n)), "bits": [16] * n,
                                                 "ranks": [[10_000, 1]] * n}})
    with pytest.raises(PlanError, match="above the full rank"):
        apply(model, plan, calibration=CALIB)


def test_cli_ranks_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    plan_file = tmp_path / "joint.json"
    assert main(["plan", "joint", str(tiny_model_dir), "--target-ratio", "0.93", "--ranks", "0.25,0.5",
                 "--quantizer", "rtn", *calib, "--out", str(plan_file)]) == 0
    data = json.loads(plan_file.read_text())
    assert data["provenance"]["config"]["ranks"] == [0.25, 0.5]
    assert all("rank" in entry for entry in data["summary"]["bytes"].values())
    assert data["summary"]["held_bytes"] <= data["summary"]["target_bytes"]
