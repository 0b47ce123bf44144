"""Dynamic expert skipping: per-layer thresholds calibrated from routing weights."""

from moeslim.methods.skip.driver import SkipConfig, plan_skip
from moeslim.methods.skip.thresholds import (
    SKIP_RULES,
    calibrate_beta,
    keep_mask,
    rescale_kept,
    skip_rates,
    skip_statistic,
)

__all__ = [
    "SKIP_RULES",
    "SkipConfig",
    "calibrate_beta",
    "keep_mask",
    "plan_skip",
    "rescale_kept",
    "skip_rates",
    "skip_statistic",
]
