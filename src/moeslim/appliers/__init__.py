"""``moeslim.apply`` (this package's ``apply``): the only place that turns (model, plan) into a compressed model.

One handler per plan kind; each handler mutates the model in place and returns the entries it
adds to the ``moeslim`` section of config.json (what stock transformers cannot express).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from moeslim.plans import Plan, PlanError

Handler = Callable[[nn.Module, Plan], dict[str, Any]]


def _handlers() -> dict[str, Handler]:
    # Imported lazily so that importing moeslim does not import every method's runtime.
    from moeslim.appliers.prune import apply_prune
    from moeslim.appliers.quantize import apply_quantize
    from moeslim.appliers.skip import apply_skip

    return {"prune": apply_prune, "skip": apply_skip, "quantize": apply_quantize}


def apply(model: nn.Module, plan: Plan) -> nn.Module:
    """Apply ``plan`` to ``model`` in place; record it in ``config.moeslim`` and return the model."""
    handlers = _handlers()
    if plan.kind not in handlers:
        raise PlanError(f"no handler for plan kind {plan.kind!r}; known kinds: {', '.join(handlers)}")
    section = dict(getattr(model.config, "moeslim", None) or {})
    section.update(handlers[plan.kind](model, plan))
    history = list(section.get("applied", []))
    history.append({"kind": plan.kind, "method": plan.provenance.method, "data": plan.provenance.data})
    section["applied"] = history
    model.config.moeslim = section
    return model
