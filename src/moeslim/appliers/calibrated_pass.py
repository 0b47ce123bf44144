"""The calibration pass some appliers run (merge / low-rank / router re-calibration), on the plan's own windows.

Such plans store decisions (groups, ranks), not tensors: the tensors they imply (merged router rows, whitened
SVD factors, refitted router rows) are recomputed here from the same calibration windows, as GPTQ is
(``appliers/quantize.py``). The windows must be the plan's (hashes checked); without them apply raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from moeslim.calibrate import LayerDecision, Observer, run_layerwise
from moeslim.calibrate.runner import BlockOverride
from moeslim.data.calibration_set import CalibrationSet, check_same_calibration
from moeslim.models import MoELayer
from moeslim.plans import Plan, PlanError

__all__ = ["calibrated_pass", "missing_calibration"]


def missing_calibration(plan: Plan, why: str) -> PlanError:
    spec = plan.summary.get("calibration") or {}
    how = (f"moeslim.build_calibration_set(CalibrationConfig(data={tuple(spec['data'])!r}, samples="
           f"{spec.get('samples')}, seq_len={spec.get('seq_len')}, seed={spec.get('seed')}), tokenizer)"
           if "data" in spec else "the (N, L) input ids the plan was made on")
    return PlanError(f"this {plan.kind} plan {why}, which runs when the plan is applied on the plan's calibration "
                     f"windows: call apply(model, plan, calibration=...) with {how} (`moeslim apply` redraws them)")


def calibrated_pass(model: nn.Module, plan: Plan, calibration: CalibrationSet | torch.Tensor | None, why: str,
                    make_observers: Callable[[MoELayer], list[Observer]],
                    on_layer: Callable[[MoELayer, Sequence[Observer]], Any],
                    device: torch.device | str | None = None, progress: bool = False, label: str = "apply",
                    override: Callable[[MoELayer, Any], BlockOverride] | None = None) -> dict[int, Any]:
    """{layer index: on_layer(layer, observers)} over the plan's calibration windows; the model is not modified.

    ``override`` (progressive plans): the compressed block of a layer from its ``on_layer`` result; later
    layers then see the compressed model's outputs, as they did when the plan was made.
    """
    if calibration is None:
        raise missing_calibration(plan, why)
    try:
        input_ids = check_same_calibration(calibration, plan.summary.get("calibration"), plan.provenance.data_hash)
    except ValueError as err:
        raise PlanError(str(err)) from err
    def decide(layer: MoELayer, observers: Sequence[Observer]) -> LayerDecision:
        result = on_layer(layer, observers)
        return LayerDecision(result=result, override=None if override is None else override(layer, result))

    return run_layerwise(model, input_ids, make_observers=make_observers, on_layer=decide,
                         propagate="original" if override is None else "compressed", device=device,
                         progress=progress, label=label)
