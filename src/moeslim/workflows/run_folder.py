"""Run folders: a recipe (or the demo) -> plans, checkpoint, results, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from moeslim.evaluate.table import print_table
from moeslim.workflows.recipe import Recipe
from moeslim.workflows.variants import Variant, evaluate_variants


def write_results(results: list[Any], run_dir: Path) -> Path:
    from moeslim.outputs import write_text_atomic

    return write_text_atomic(run_dir / "results.json",
                             json.dumps([r.to_dict() for r in results], indent=1, default=str) + "\n")


def run_recipe(recipe: Recipe, out_root: str | Path = "runs", overwrite: bool = False) -> Path:
    """Original vs the recipe's stages; saves the final checkpoint (if ``save``) and the report.

    ``overwrite``: replace an earlier run of the recipe in ``out_root/<name>`` (refused otherwise, before any work).
    """
    from moeslim.outputs import output_lock

    with output_lock(Path(out_root) / recipe.name):
        return _run_recipe(recipe, out_root, overwrite)


def _run_recipe(recipe: Recipe, out_root: str | Path, overwrite: bool) -> Path:
    from moeslim.evaluate import disk_bytes, write_report
    from moeslim.io import checkpoint_dtype, save
    from moeslim.models import load_model, resolve_model_path
    from moeslim.outputs import check_output_dir, check_output_file

    console = Console(soft_wrap=True)  # paths and headlines stay on one line off a terminal
    run_dir = Path(out_root) / recipe.name
    inputs = [resolve_model_path(recipe.model)]
    for name in ("results.json", "report.md"):  # fail before any work, not after the evaluation
        check_output_file(run_dir / name, overwrite=overwrite, inputs=inputs)
    if recipe.save:
        check_output_dir(run_dir / "model", overwrite=overwrite, inputs=inputs)
    model, tokenizer = load_model(recipe.model)
    if tokenizer is None:
        raise ValueError(f"{recipe.model} has no tokenizer; a recipe needs one for calibration text")
    run_dir.mkdir(parents=True, exist_ok=True)
    variant = Variant(name=recipe.name, stages=recipe.stages)
    results, models = evaluate_variants(recipe.model, model, tokenizer, [variant], recipe.calibration,
                                        recipe.eval, run_dir, keep_models=True)
    if recipe.save:
        checkpoint = save(models[recipe.name], run_dir / "model", tokenizer, overwrite=overwrite, inputs=inputs,
                          dtype=checkpoint_dtype(recipe.model))
        results[-1].disk_bytes = disk_bytes(checkpoint)
        console.print(f"wrote checkpoint {checkpoint}")
    write_results(results, run_dir)
    report = write_report(results, run_dir, title=f"moeslim run: {recipe.name} on {recipe.model}")
    print_table(results, f"{recipe.name}: original vs compressed")
    console.print(f"wrote {report} and plots in {run_dir}")
    return run_dir
