"""Run folders: a recipe (or the demo) -> plans, checkpoint, results, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from moeslim.recipe import Recipe
from moeslim.variants import Variant, evaluate_variants, print_table


def write_results(results: list[Any], run_dir: Path) -> Path:
    path = run_dir / "results.json"
    path.write_text(json.dumps([r.to_dict() for r in results], indent=1, default=str) + "\n")
    return path


def run_recipe(recipe: Recipe, out_root: str | Path = "runs", overwrite: bool = True) -> Path:
    """Original vs the recipe's stages; saves the final checkpoint (if ``save``) and the report."""
    from moeslim.evaluate import disk_bytes, write_report
    from moeslim.io import save
    from moeslim.models import load_model

    console = Console()
    run_dir = Path(out_root) / recipe.name
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(recipe.model)
    if tokenizer is None:
        raise ValueError(f"{recipe.model} has no tokenizer; a recipe needs one for calibration text")
    variant = Variant(name=recipe.name, stages=recipe.stages)
    results, models = evaluate_variants(recipe.model, model, tokenizer, [variant], recipe.calibration,
                                        recipe.eval, run_dir, keep_models=True)
    if recipe.save:
        checkpoint = save(models[recipe.name], run_dir / "model", tokenizer, overwrite=overwrite)
        results[-1].disk_bytes = disk_bytes(checkpoint)
        console.print(f"wrote checkpoint {checkpoint}")
    write_results(results, run_dir)
    report = write_report(results, run_dir, title=f"moeslim run: {recipe.name} on {recipe.model}")
    print_table(results, f"{recipe.name}: original vs compressed")
    console.print(f"wrote {report} and plots in {run_dir}")
    return run_dir
