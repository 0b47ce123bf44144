"""The one layer-wise calibration runner every method uses, and its observers."""

from moeslim.calibrate.observers import (
    ExpertOutputs,
    ExpertOutputSample,
    Observer,
    RoutingStats,
    RoutingSummary,
    result_of,
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
    "result_of",
    "run_layerwise",
]
