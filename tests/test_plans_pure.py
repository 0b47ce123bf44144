"""Planners are pure: every ``plan_*`` leaves the model's tensors and its module attributes exactly as they were.

Methods only decide; ``apply`` is the only step that mutates (DESIGN.md, the one-way flow). A planner that
stashed results on the model, left a hook behind, moved a layer or changed a flag would fail here.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import sample_ids, tiny_model
from torch import nn
from transformers import GenerationConfig, PretrainedConfig

from moeslim.methods.prune import PRUNE_METHODS, PruneConfig, plan_prune
from moeslim.methods.quant.driver import QuantizeConfig, plan_quantize
from moeslim.methods.skip import SkipConfig, plan_skip
from moeslim.plans import Plan

CALIB = sample_ids(0, 4, 24)
SRC = Path(__file__).resolve().parents[1] / "src" / "moeslim"


def _freeze(value: Any) -> Any:
    """A comparable deep copy of a module attribute (submodules by identity: their own vars are checked)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.detach().clone(), value.dtype, value.device, value.requires_grad,
                isinstance(value, nn.Parameter))
    if isinstance(value, nn.Module):
        return ("module", id(value))
    if isinstance(value, (PretrainedConfig, GenerationConfig)):
        # transformers 5 configs are dataclasses whose == ignores attributes set later (e.g. config.moeslim)
        return ("config", type(value), _freeze(dict(vars(value))))
    if isinstance(value, dict):
        return ("dict", type(value), [(k, _freeze(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return ("seq", type(value), [_freeze(v) for v in value])
    try:
        return ("value", copy.deepcopy(value))
    except Exception:  # noqa: BLE001 - some attributes cannot be copied; their repr still shows a change
        return ("repr", repr(value))


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==
        return repr(a) == repr(b)


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    attrs = {name: {k: _freeze(v) for k, v in vars(module).items()} for name, module in model.named_modules()}
    return state, attrs


def _assert_unchanged(model: nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]) -> None:
    state, attrs = before
    now_state, now_attrs = _snapshot(model)
    assert sorted(now_state) == sorted(state)
    changed = [k for k, v in state.items() if not torch.equal(now_state[k], v)]
    assert not changed, f"tensors changed: {changed[:5]}"
    assert sorted(now_attrs) == sorted(attrs), "modules were added or removed"
    for name, values in attrs.items():
        now = now_attrs[name]
        assert sorted(now) == sorted(values), f"{name or 'model'}: attributes {set(now) ^ set(values)} added/removed"
        diff = [k for k in values if not _same(values[k], now[k])]
        assert not diff, f"{name or 'model'}: attributes changed: {diff}"


Planner = Callable[[nn.Module], Plan]

PLANNERS: dict[str, Planner] = {
    **{f"prune-{m}": (lambda model, m=m: plan_prune(model, CALIB, PruneConfig(method=m, keep=6, seed=0)))
       for m in PRUNE_METHODS},
    "prune-enumerate-progressive": lambda model: plan_prune(model, CALIB, PruneConfig(keep=6, mode="progressive")),
    "skip-top2": lambda model: plan_skip(model, CALIB, SkipConfig(rule="top2")),
    "skip-topk": lambda model: plan_skip(model, CALIB, SkipConfig(rule="topk", quantile=0.3)),
    "odp": lambda model: plan_skip(model, CALIB, SkipConfig(protect=0.1)),
    "quantize-pmq-gptq": lambda model: plan_quantize(model, CALIB, QuantizeConfig(method="pmq", bits=2.5,
                                                                                  group_size=16)),
    "quantize-pmq-global-authors": lambda model: plan_quantize(
        model, CALIB, QuantizeConfig(method="pmq", bits=2.5, cost="authors", scope="global", group_size=16)),
    "quantize-uniform-gptq": lambda model: plan_quantize(model, CALIB, QuantizeConfig(method="uniform", bits=3,
                                                                                      group_size=16)),
    "quantize-uniform-rtn": lambda model: plan_quantize(model, None, QuantizeConfig(method="uniform", bits=4,
                                                                                    quantizer="rtn")),
    "quantize-random": lambda model: plan_quantize(model, CALIB, QuantizeConfig(method="random", bits=2.5, seed=1,
                                                                                group_size=16)),
}


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("planner", sorted(PLANNERS))
def test_planner_leaves_the_model_unchanged(planner: str, family: str) -> None:
    model = tiny_model(family)
    model.train()  # the runner switches to eval for calibration: it must switch back
    before = _snapshot(model)
    plan = PLANNERS[planner](model)
    assert plan.layers
    _assert_unchanged(model, before)
    plan.to_dict()  # plain JSON: no tensors hidden in the plan either
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


def test_the_check_sees_a_stash_and_a_weight_change() -> None:
    # The test above cannot pass vacuously: a stashed attribute or a touched weight fails the comparison.
    model = tiny_model("mixtral")
    before = _snapshot(model)
    object.__setattr__(model, "moeslim_gptq_results", {"token": 1})
    with pytest.raises(AssertionError, match="added/removed"):
        _assert_unchanged(model, before)
    model = tiny_model("mixtral")
    before = _snapshot(model)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[0, 0, 0] += 1.0
    with pytest.raises(AssertionError, match="tensors changed"):
        _assert_unchanged(model, before)
    model = tiny_model("mixtral")
    before = _snapshot(model)
    model.model.layers[0].mlp.register_forward_hook(lambda *_: None)
    with pytest.raises(AssertionError, match="_forward_hooks"):
        _assert_unchanged(model, before)
    model = tiny_model("mixtral")
    before = _snapshot(model)
    model.config.moeslim = {"quantize": {}}
    with pytest.raises(AssertionError, match="config"):
        _assert_unchanged(model, before)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize(("package", "forbidden"), [
    ("methods", ("moeslim.runtime", "moeslim.appliers")),
    ("calibrate", ("moeslim.runtime", "moeslim.appliers", "moeslim.methods")),
])
def test_one_way_imports(package: str, forbidden: tuple[str, ...]) -> None:
    # data -> calibrate -> methods -> plan -> apply -> runtime: no step imports a later one.
    files = sorted((SRC / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(SRC)): sorted(m for m in _imports(f) if m.startswith(forbidden)) for f in files}
    assert not {k: v for k, v in bad.items() if v}


# The smallest valid settings of every registered stage kind: a kind added to workflows.stages._registry
# without an entry here fails test_every_registered_kind_is_checked, so no planner escapes the purity check.
MINIMAL: dict[str, dict[str, Any]] = {
    "prune": {"keep": 6},
    "skip": {},
    "quantize": {"method": "uniform", "bits": 3, "group_size": 16},
    "merge": {"keep": 6},
    "lowrank": {"ratio": 0.5},
    "joint": {"target_ratio": 0.5, "quantizer": "rtn"},
}


def test_every_registered_kind_is_checked() -> None:
    from moeslim.workflows.stages import stage_kinds

    assert sorted(stage_kinds()) == sorted(MINIMAL)


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_registered_planner_leaves_the_model_unchanged(kind: str) -> None:
    # Through the registry the CLI and recipes use (for prune: plan_prune plus its optional router fit).
    from moeslim.workflows.stages import _registry, parse_stage

    model = tiny_model("mixtral")
    model.train()
    before = _snapshot(model)
    _, planner = _registry()[kind]
    plan = planner(model, CALIB, parse_stage({kind: MINIMAL[kind]}, "test").config, "tiny")
    assert plan.kind == kind and plan.layers
    _assert_unchanged(model, before)
