"""Validated configs shared by the CLI, recipes and the Python API.

Every config fails in ``__post_init__`` (before any model is loaded) with a message that says
what to change.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

DEFAULT_CALIBRATION_DATA = ("demo:code", "demo:prose")
Spacing = Literal["random", "even"]
SPACINGS: tuple[str, ...] = get_args(Spacing)
# How calibration windows are spread over a source by default (benchmarks/prune_modes.py, docs/results-pruning.md).
DEFAULT_SPACING: Spacing = "random"
SPACING_WHY = ("even windows gave +0.9 % held-out perplexity on average over 72 paired plans, lower in only 32, "
               "though they move 1.8 % over seeds against 5.2 % for random draws")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what to change."""


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if origin is tuple:
        item = get_args(hint)[0]
        return f"a list of {_PLURALS.get(item, _type_name(item))}"
    if hint is type(None):
        return "null"
    return _NAMES.get(hint, str(hint))


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _matches(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(hint))
    if origin is tuple:
        args = get_args(hint)
        return isinstance(value, tuple) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # NaN and infinity are floats, but no setting means them
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def check_types(config: Any) -> None:
    """Refuse a dataclass whose field values do not have their annotated types (bool is not an int).

    Recipes and the Python API hand configs values of any type; without this, ``keep: 6.5`` or
    ``save: 'no'`` would surface as a TypeError deep inside a method, or be taken as true.
    """
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name not in hints or _matches(value, hints[f.name]):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}={value}: use a finite number")
        if get_origin(hints[f.name]) is Literal:  # an enumeration: say what to write instead
            raise ConfigError(f"{f.name}={value!r}: use one of {', '.join(map(str, get_args(hints[f.name])))}")
        raise ConfigError(f"{f.name}={value!r}: expected {_type_name(hints[f.name])}, "
                              f"got {type(value).__name__}")


def from_mapping(cls: type, values: Any, where: str) -> Any:
    """Build config dataclass ``cls`` from a recipe/JSON mapping, naming ``where`` in every error.

    Lists become tuples; unknown and missing required fields are named before construction, so the
    message says what to write, not which Python call failed.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(values).__name__} {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(sorted(known))}")
    required = [name for name, f in known.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} is required (no default); add e.g. "
                          f"{missing[0]}: ... to this section")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text a method observes: sources, how many windows, how long, which seed, how they are spread.

    ``spacing``: ``random`` (a seeded draw) or ``even`` (one window from each of ``samples`` equal stretches of
    a source, at a seed-chosen offset). A plan records it; a plan recorded before the field existed was drawn
    at random (``data.calibration_set.calibration_config``).
    """

    data: tuple[str, ...] = DEFAULT_CALIBRATION_DATA
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    spacing: Spacing = DEFAULT_SPACING

    def __post_init__(self) -> None:
        check_types(self)
        if not self.data:
            raise ConfigError("data: give at least one source, e.g. --data demo:code")
        if self.samples < 1:
            raise ConfigError(f"samples={self.samples}: use at least 1 calibration sample")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len}: use at least 2 tokens per sample")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: use at least 1")
        if self.spacing not in SPACINGS:
            raise ConfigError(f"spacing={self.spacing!r}: use 'random' (seeded draw) or 'even' (evenly spaced)")


@dataclass(frozen=True)
class EvalConfig:
    """What ``moeslim eval`` measures."""

    data: tuple[str, ...] = field(default=("demo:code:test", "demo:prose:test"), metadata={
        "help": "text sources to score (default demo:code and demo:prose, test split)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per fixed, non-overlapping window"})
    max_windows: int | None = field(default=64, metadata={"help": "windows per source (seeded draw; None: all)"})
    tasks: tuple[str, ...] = field(default_factory=tuple, metadata={"help": "lm-eval task names"})
    task_limit: int | None = field(default=None, metadata={"help": "items per task (None: all)"})
    speed: bool = field(default=False, metadata={"help": "also time prefill and decode"})
    speed_repeats: int = field(default=3, metadata={"help": "timed repeats (the median is reported)"})
    speed_new_tokens: int = field(default=32, metadata={"help": "decode steps timed per repeat"})
    generate_tokens: int = field(default=24, metadata={
        "help": "greedy continuations of fixed prompts, side by side (0: none)"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    seed: int = field(default=0, metadata={"help": "which windows are drawn"})
    kl: bool = field(default=True, metadata={
        "help": "KL divergence and top-1 agreement to the original (side-by-side runs) or to --reference"})
    kl_top_k: int = field(default=0, metadata={
        "help": "reference tokens kept per position: 0 every token (exact KL, N x L x vocab x 2 bytes), k the top "
                "k and one bucket for the rest (a lower bound of the KL, for large vocabularies)"})

    def __post_init__(self) -> None:
        check_types(self)
        if self.kl_top_k < 0:
            raise ConfigError(f"kl_top_k={self.kl_top_k}: use 0 (every token) or the number of top tokens to keep")
        if not self.data and not self.tasks:
            raise ConfigError("eval: give --data sources, --tasks, or both")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len}: use at least 2 tokens per window")
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"max_windows={self.max_windows}: use at least 1 (or leave unset for all)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: use at least 1")
        if self.speed_repeats < 1:
            raise ConfigError(f"speed_repeats={self.speed_repeats}: use at least 1")
        if self.speed_new_tokens < 1:
            raise ConfigError(f"speed_new_tokens={self.speed_new_tokens}: time at least 1 decode step")
        if self.generate_tokens < 0:
            raise ConfigError(f"generate_tokens={self.generate_tokens}: use 0 (no generations) or more")
