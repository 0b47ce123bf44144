"""Apply a "skip" plan: install the skipping experts forward with the planned per-layer thresholds."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from moeslim.plans import Plan, PlanError


def apply_skip(model: nn.Module, plan: Plan) -> dict[str, Any]:
    """Install dynamic skipping in place; return the ``skip`` entry of the moeslim config section."""
    from moeslim.runtime.odp import install_odp
    from moeslim.runtime.skipping import install_skipping

    if plan.kind != "skip":
        raise PlanError(f"apply_skip got a {plan.kind!r} plan")
    rule = str(plan.summary.get("rule") or plan.provenance.config.get("rule", "top2"))
    try:
        betas = {int(idx): float(entry["beta"]) for idx, entry in plan.layers.items()}
    except (KeyError, TypeError, ValueError) as err:
        raise PlanError(f"skip plan layers must be {{idx: {{'beta': float}}}}: {err}") from err
    bad = {idx: b for idx, b in betas.items() if not math.isfinite(b) or b < 0}
    if bad:
        raise PlanError(f"skip plan thresholds must be finite and >= 0 (0 skips nothing); got {bad}")
    protect = float(plan.summary.get("protect") or plan.provenance.config.get("protect", 0.0))
    try:
        if protect > 0:
            install_odp(model, betas, rule, protect)
        else:
            install_skipping(model, betas, rule)
    except ValueError as err:
        raise PlanError(f"skip plan does not fit this model: {err}") from err
    section: dict[str, Any] = {"rule": rule, "betas": {str(idx): b for idx, b in sorted(betas.items())}}
    if protect > 0:
        section["protect"] = protect
    return {"skip": section}
