"""Evaluate variants side by side: perplexity, multiple-choice tasks, size / compute / speed, report."""

from moeslim.evaluate.cost import (
    activated_params,
    compare_speed,
    disk_bytes,
    expert_calls_per_token,
    param_bytes,
    peak_memory,
)
from moeslim.evaluate.driver import evaluate_model
from moeslim.evaluate.generation import side_by_side
from moeslim.evaluate.perplexity import perplexity, sliding_perplexity
from moeslim.evaluate.report import load_results, write_report
from moeslim.evaluate.results import VariantResult
from moeslim.evaluate.tasks import OFFLINE_TASKS, build_offline_tasks, lm_eval_available, run_tasks

__all__ = [
    "OFFLINE_TASKS",
    "VariantResult",
    "activated_params",
    "build_offline_tasks",
    "compare_speed",
    "disk_bytes",
    "evaluate_model",
    "expert_calls_per_token",
    "lm_eval_available",
    "load_results",
    "param_bytes",
    "peak_memory",
    "perplexity",
    "run_tasks",
    "side_by_side",
    "sliding_perplexity",
    "write_report",
]
