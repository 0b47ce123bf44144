"""Build compressed variants of one model and evaluate them side by side with the original.

Shared by ``moeslim run`` (a recipe: original vs its stages) and ``moeslim demo`` (original vs a set of
variants). Every variant starts from a deep copy of the original, so variants never leak into each
other, and all of them are timed together in one process for the speed ratios.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from torch import nn
from transformers import PreTrainedTokenizerBase

from moeslim.config import CalibrationConfig, EvalConfig
from moeslim.data.calibration_set import CalibrationSet, build_calibration_set
from moeslim.evaluate.divergence import Reference
from moeslim.evaluate.table import print_table as print_table  # the one table builder; re-exported for callers
from moeslim.plans import Plan
from moeslim.workflows.stages import StageSpec, describe, run_stage


@dataclass(frozen=True)
class Variant:
    name: str
    stages: tuple[StageSpec, ...] = ()
    calibration: CalibrationConfig | None = None  # None: the run's default calibration
    description: str = ""


class CalibrationCache:
    """Token windows depend only on (config, tokenizer): build each set once per run."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._sets: dict[CalibrationConfig, CalibrationSet] = {}

    def get(self, config: CalibrationConfig) -> CalibrationSet:
        if config not in self._sets:
            self._sets[config] = build_calibration_set(config, self._tokenizer)
        return self._sets[config]


def build_variant(base: nn.Module, variant: Variant, calibrations: CalibrationCache,
                  default: CalibrationConfig, model_name: str, plan_dir: Path | None) -> tuple[nn.Module, list[Plan]]:
    """Deep-copy ``base`` and run the variant's stages on the copy; plans go to ``plan_dir``."""
    model = copy.deepcopy(base)
    config = variant.calibration or default
    plans = []
    for i, stage in enumerate(variant.stages):
        path = plan_dir / f"{i:02d}-{stage.kind}.json" if plan_dir is not None else None
        plans.append(run_stage(model, stage, calibrations.get(config), model_name, path))
    return model, plans


def plan_for_report(plans: list[Plan]) -> dict[str, Any] | None:
    """The plan the report draws: pruning (kept-experts heatmap) before skipping (skip rates)."""
    by_kind = {p.kind: p for p in plans}
    for kind in ("prune", "skip", "quantize"):
        if kind in by_kind:
            plan = by_kind[kind]
            return {**plan.summary, **plan.to_dict()}
    return None


def evaluate_variants(
    model_name: str,
    base: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    variants: list[Variant],
    calibration: CalibrationConfig,
    evaluation: EvalConfig,
    out_dir: Path,
    keep_models: bool = False,
    log: TextIO | None = None,
    reference: Reference | None = None,
) -> tuple[list[Any], dict[str, nn.Module]]:
    """Evaluate the original plus every variant; returns results (original first) and, if asked, models.

    The console gets one line per variant (what it is, then its headline numbers); lm-eval's own output goes to
    ``log`` (None: nowhere). ``reference``: the original's KL reference on ``evaluation``'s windows, when the
    caller built it (``evaluate.driver.build_reference``) to score more models against it; None: built here
    when ``evaluation`` asks for KL."""
    from moeslim.evaluate import compare_speed
    from moeslim.evaluate.driver import build_reference

    console = Console(soft_wrap=True)  # paths and headlines stay on one line off a terminal
    calibrations = CalibrationCache(tokenizer)
    models: dict[str, nn.Module] = {"original": base}
    total = len(variants) + 1
    console.print(f"[bold]1/{total} original[/]: evaluating")
    # Every variant's KL is measured against the original's next-token distribution on the same windows.
    if reference is None and evaluation.kl and evaluation.data:
        reference = build_reference(base, tokenizer, evaluation, model_name)
    results = [_evaluate(base, tokenizer, evaluation, "original", "the model as loaded", None, log, reference)]
    console.print(f"  {headline(results[-1])}")
    for i, variant in enumerate(variants, start=2):
        console.print(f"[bold]{i}/{total} {variant.name}[/]: {describe(list(variant.stages))}")
        plan_dir = out_dir / "plans" / variant.name
        model, plans = build_variant(base, variant, calibrations, calibration, model_name, plan_dir)
        description = variant.description or describe(list(variant.stages))
        results.append(_evaluate(model, tokenizer, evaluation, variant.name, description, plan_for_report(plans),
                                 log, reference))
        console.print(f"  {headline(results[-1])}")
        models[variant.name] = model
    if evaluation.speed:
        console.print(f"timing decode speed of {len(models)} models together (interleaved, median of "
                      f"{evaluation.speed_repeats})")
        _add_speed(results, models, tokenizer, evaluation, compare_speed)
    if evaluation.generate_tokens:
        _add_generations(results, models, tokenizer, evaluation.generate_tokens)
    return results, (models if keep_models else {})


def _evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, evaluation: EvalConfig, name: str,
              description: str, plan: dict[str, Any] | None, log: TextIO | None, reference: Reference | None
              ) -> Any:
    from moeslim.evaluate import evaluate_model

    # speed is timed for all variants together (interleaved), not one by one; a per-batch perplexity line for
    # each of a dozen variants would bury the one line per variant the console shows
    return evaluate_model(model, tokenizer, dataclasses.replace(evaluation, speed=False), name=name,
                          description=description, plan=plan, progress=False, log=log, reference=reference)


def headline(result: Any) -> str:
    """One line of a variant's numbers for the console while the run goes on (the table comes at the end)."""
    parts = [f"ppl {domain} {value:.1f}" for domain, value in result.perplexity.items()]
    if result.kl_divergence:
        parts.append(f"KL {sum(result.kl_divergence.values()) / len(result.kl_divergence):.4f}")
    parts += [f"{task.removeprefix('moeslim_')} {100 * acc:.0f} %" for task, acc in result.tasks.items()]
    if result.param_bytes:
        parts.append(f"weights {result.param_bytes / 2**20:.1f} MiB")
    return ", ".join(parts) or "evaluated"


def _add_speed(results: list[Any], models: dict[str, nn.Module], tokenizer: PreTrainedTokenizerBase,
               evaluation: EvalConfig, compare_speed: Any) -> None:
    from moeslim.data import load_source, token_windows

    source = load_source(evaluation.data[0], split="test")
    prompt = token_windows(source, tokenizer, min(evaluation.seq_len, 64), num_samples=1)
    timing = compare_speed(models, prompt, new_tokens=evaluation.speed_new_tokens, repeats=evaluation.speed_repeats,
                           show=False)
    for result in results:
        t = timing[result.name]
        result.decode_tps, result.prefill_tps, result.speed_ratio = t["decode_tps"], t["prefill_tps"], t["decode_ratio"]
        result.extra["speed"] = t


def _add_generations(results: list[Any], models: dict[str, nn.Module], tokenizer: PreTrainedTokenizerBase,
                     new_tokens: int) -> None:
    from moeslim.evaluate import side_by_side

    texts = side_by_side(models, tokenizer, max_new_tokens=new_tokens)  # {prompt: {name: text}}
    for result in results:
        result.extra["generations"] = {prompt: by_name[result.name] for prompt, by_name in texts.items()}
