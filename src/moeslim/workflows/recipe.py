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
        kinds = [stage.kind for stage in self.stages]
        if "lowrank" in kinds and "quantize" in kinds[kinds.index("lowrank"):]:
            # Refused here, before the low-rank stage runs, not when the quantize stage meets the factors.
            raise ConfigError(f"stages[{kinds.index('quantize', kinds.index('lowrank'))}].quantize: quantizing after "
                              f"the low-rank stage stages[{kinds.index('lowrank')}] is not supported (GPTQ quantizes "
                              "dense expert weights; low-rank experts are factors A (out, r) and B (r, in), with no "
                              "packed format for quantized factors): drop one of the two stages")


def recipe_from_dict(raw: Any, where: str = "recipe") -> Recipe:
    """Validate the whole recipe (every field's type and range, every stage) before any work starts.

    One typed validation for every level, the one every config uses (``config.from_mapping``): unknown and
    missing fields are named, each value is checked against its annotation (``check_types``: Literal choices,
    bool is not an int, lists of the right items), then the dataclass checks its ranges. Every message starts
    with ``where`` and names the field, e.g. ``r.yaml.stages[0].prune: keep=6.5: expected an integer``.
    (Not pydantic: the configs are frozen dataclasses shared with the Python API and the CLI, and a second
    schema would have to be kept in step with them.)
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    values = dict(raw)
    if "stages" in values:
        stages_raw = values["stages"]
        if not isinstance(stages_raw, list) or not stages_raw:
            raise ConfigError(f"{where}.stages: expected a non-empty list of stages, e.g. "
                              "[{prune: {method: enumerate, keep: 6}}]")
        values["stages"] = tuple(parse_stage(entry, f"{where}.stages[{i}]") for i, entry in enumerate(stages_raw))
    for key, config_cls in (("calibration", CalibrationConfig), ("eval", EvalConfig)):
        if key in values:
            values[key] = from_mapping(config_cls, values[key], f"{where}.{key}")
    recipe: Recipe = from_mapping(Recipe, values, where)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML/JSON: {err}") from err
    return recipe_from_dict(raw, where=path.name)
