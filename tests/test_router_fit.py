"""Router re-calibration: the fit itself, and prune plans with ``recalibrate_router`` through plan + apply."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from moeslim.appliers import apply, needs_calibration
from moeslim.methods.prune import PruneConfig
from moeslim.methods.router_fit import block_loss, fit_router, routed_output
from moeslim.models import find_moe_layers
from moeslim.models.routing import softmax_topk
from moeslim.plans import PlanError
from moeslim.workflows.stages import StageSpec, plan_stage


def _ids(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_fit_recovers_a_perturbed_router_and_never_gets_worse() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=gen)
    outputs = torch.randn(512, 4, 16, generator=gen)  # (T, K, H) fixed expert outputs
    true_w = torch.randn(4, 16, generator=gen)

    def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return softmax_topk(logits, top_k=2, renormalize=False)

    target = routed_output(outputs, *route(x @ true_w.T))
    start = true_w + 0.5 * torch.randn(4, 16, generator=gen)
    fit = fit_router(x, outputs, target, route, start)
    assert fit.loss_before == pytest.approx(block_loss(x, outputs, target, route, start))
    assert fit.loss_after < 0.5 * fit.loss_before
    again = fit_router(x, outputs, target, route, start)  # deterministic
    assert torch.equal(again.weight, fit.weight)
    exact = fit_router(x, outputs, target, route, true_w, steps=5)  # already optimal: best iterate = start
    assert exact.loss_after == 0.0 and torch.equal(exact.weight, true_w)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe"])  # softmax; sigmoid groups; shared
def test_prune_refit_is_reported_and_reproduced_by_apply(family: str) -> None:
    model = tiny_model(family)
    ids = _ids()
    stage = StageSpec("prune", PruneConfig(keep=4, method="reap", recalibrate_router=True))
    plan = plan_stage(model, stage, ids, "tiny")
    assert needs_calibration(plan)
    fits = plan.summary["router_fit"]
    assert all(f["loss_after"] <= f["loss_before"] for f in fits.values())
    assert any(f["loss_after"] < 0.99 * f["loss_before"] for f in fits.values())
    pruned = copy.deepcopy(model)
    apply(pruned, plan, calibration=ids)
    assert pruned.config.moeslim["prune"]["router_fit"] == fits
    # The applied first block has the refitted loss; the plain pruned block has the loss before the fit.
    old = find_moe_layers(model)[0]
    seen: list[torch.Tensor] = []
    handle = old.block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    plain = copy.deepcopy(model)
    apply(plain, plan_stage(model, StageSpec("prune", PruneConfig(keep=4, method="reap")), ids, "tiny"))
    first = str(old.layer_idx)
    for m, want in ((pruned, fits[first]["loss_after"]), (plain, fits[first]["loss_before"])):
        new = find_moe_layers(m)[0]
        with torch.no_grad():
            diff = new.block_output(new.block(seen[0])) - old.block_output(old.block(seen[0]))
        assert float(diff.double().norm()) == pytest.approx(want, rel=1e-4)


def test_prune_refit_needs_the_plan_windows() -> None:
    model = tiny_model("mixtral")
    ids = _ids()
    plan = plan_stage(model, StageSpec("prune", PruneConfig(keep=4, method="frequency", recalibrate_router=True)),
                      ids, "tiny")
    with pytest.raises(PlanError, match="calibration"):
        apply(copy.deepcopy(model), plan)
    plain = plan_stage(model, StageSpec("prune", PruneConfig(keep=4, method="frequency")), ids, "tiny")
    assert not needs_calibration(plain)
    apply(copy.deepcopy(model), plain)  # no refit: no data needed
