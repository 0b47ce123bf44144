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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moeslim.config import CalibrationConfig, ConfigError, EvalConfig
from moeslim.pipeline import StageSpec, parse_stage

_TOP_LEVEL = {"name", "model", "calibration", "stages", "eval", "save"}


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    stages: tuple[StageSpec, ...]
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save: bool = True

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"name={self.name!r}: give a short name without '/' (it names the run folder)")
        if not self.model:
            raise ConfigError("model: give a local directory, a hub id, or 'demo'")


def _section(raw: dict[str, Any], key: str, cls: type, where: str) -> Any:
    values = raw.get(key) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}.{key}: expected a mapping, got {type(values).__name__}")
    for list_key in ("data", "tasks"):
        if list_key in values:
            values[list_key] = tuple(values[list_key]) if isinstance(values[list_key], list) else (values[list_key],)
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{where}.{key}: {err}") from err
    except ConfigError as err:
        raise ConfigError(f"{where}.{key}: {err}") from err


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    unknown = sorted(set(raw) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_TOP_LEVEL))}")
    stages_raw = raw.get("stages") or []
    if not isinstance(stages_raw, list):
        raise ConfigError(f"{where}.stages: expected a list of stages")
    stages = tuple(parse_stage(entry, f"{where}.stages[{i}]") for i, entry in enumerate(stages_raw))
    return Recipe(
        name=str(raw.get("name", "")),
        model=str(raw.get("model", "")),
        stages=stages,
        calibration=_section(raw, "calibration", CalibrationConfig, where),
        eval=_section(raw, "eval", EvalConfig, where),
        save=bool(raw.get("save", True)),
    )


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML/JSON: {err}") from err
    return recipe_from_dict(raw, where=path.name)
