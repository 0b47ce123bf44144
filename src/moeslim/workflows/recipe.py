"""Recipes: one YAML/JSON file = model + calibration data + stages + evaluation settings.

```yaml
name: prune6-skip
model: demo
calibration: {data: [demo:code, demo:prose], samples: 64, seq_len: 256, seed: 0}
stages:
  - prune: {method: enumerate, keep: 6}
  - skip: {quantile: 0.5}
eval: {data: [demo:code:test, demo:prose:test], max_windows: 32, tasks: [moeslim_code_nextline]}
```
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moeslim.config import CalibrationConfig, ConfigError, EvalConfig, check_types, from_mapping
from moeslim.workflows.stages import StageSpec, parse_stage

_TOP_LEVEL = {"name", "model", "calibration", "stages", "eval", "save"}


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    stages: tuple[StageSpec, ...]
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        if not _NAME.match(self.name):
            raise ConfigError(f"name={self.name!r}: give a short folder name of letters, digits, '.', '_' or '-' "
                              "that starts with a letter or digit (it names the run folder under the run root)")
        if not self.model:
            raise ConfigError("model: give a local directory, a hub id, or 'demo'")


def recipe_from_dict(raw: Any, where: str = "recipe") -> Recipe:
    """Validate the whole recipe (every field's type and range, every stage) before any work starts."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(raw) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(sorted(_TOP_LEVEL))}")
    missing = sorted({"name", "model", "stages"} - set(raw))
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} is required")
    stages_raw = raw["stages"]
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{where}.stages: expected a non-empty list of stages, e.g. "
                          "[{prune: {method: enumerate, keep: 6}}]")
    stages = tuple(parse_stage(entry, f"{where}.stages[{i}]") for i, entry in enumerate(stages_raw))
    for key in ("name", "model"):
        if not isinstance(raw[key], str):
            raise ConfigError(f"{where}.{key}: expected a string, got {type(raw[key]).__name__} {raw[key]!r}")
    save = raw.get("save", True)
    if not isinstance(save, bool):
        raise ConfigError(f"{where}.save: expected true or false, got {save!r}")
    try:
        return Recipe(
            name=raw["name"],
            model=raw["model"],
            stages=stages,
            calibration=from_mapping(CalibrationConfig, raw.get("calibration"), f"{where}.calibration"),
            eval=from_mapping(EvalConfig, raw.get("eval"), f"{where}.eval"),
            save=save,
        )
    except ConfigError as err:
        raise ConfigError(err if str(err).startswith(where) else f"{where}: {err}") from err


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML/JSON: {err}") from err
    return recipe_from_dict(raw, where=path.name)
