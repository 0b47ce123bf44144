"""The one layer-wise calibration runner every method uses, and its observers."""

from moeslim.calibrate.observers import (
    ExpertOutputs,
    ExpertOutputSample,
    Observer,
    RoutingStats,
    RoutingSummary,
)
from moeslim.calibrate.runner import LayerDecision, Propagate, run_layerwise

__all__ = [
    "ExpertOutputSample",
    "ExpertOutputs",
    "LayerDecision",
    "Observer",
    "Propagate",
    "RoutingStats",
    "RoutingSummary",
    "run_layerwise",
]
