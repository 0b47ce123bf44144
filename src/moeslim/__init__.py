"""moeslim: make Mixture-of-Experts language models smaller and faster without retraining.

The public API mirrors the flow (data -> calibrate -> plan -> apply -> evaluate -> save):

    model, tokenizer = moeslim.load("demo")
    plan = moeslim.plan_prune(model, calibration_ids, moeslim.PruneConfig(method="enumerate", keep=6))
    moeslim.apply(model, plan)
    moeslim.save(model, "out/pruned", tokenizer)

A GPTQ quantize plan holds widths only; its GPTQ pass runs in ``apply``, on the windows it was planned on:

    qplan = moeslim.plan_quantize(model, calib, moeslim.QuantizeConfig(method="pmq", bits=2.5))
    moeslim.apply(model, qplan, calibration=calib)

Names are imported lazily so that ``import moeslim`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from moeslim._package import __version__

_EXPORTS = {
    "load": "moeslim.io",
    "save": "moeslim.io",
    "apply": "moeslim.appliers",
    "calibrate": "moeslim.calibrate",
    "run_layerwise": "moeslim.calibrate",
    "evaluate": "moeslim.evaluate",
    "evaluate_model": "moeslim.evaluate",
    "Plan": "moeslim.plans",
    "PruneConfig": "moeslim.methods.prune",
    "plan_prune": "moeslim.methods.prune",
    "SkipConfig": "moeslim.methods.skip",
    "plan_skip": "moeslim.methods.skip",
    "QuantizeConfig": "moeslim.methods.quant.driver",
    "plan_quantize": "moeslim.methods.quant.driver",
    "CalibrationConfig": "moeslim.config",
    "build_calibration_set": "moeslim.data.calibration_set",
    "load_source": "moeslim.data",
    "token_windows": "moeslim.data",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moeslim' has no attribute {name!r}")
    module = import_module(_EXPORTS[name])
    if name in ("calibrate", "evaluate"):
        return module
    return getattr(module, name)
