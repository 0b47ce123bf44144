"""Validated configs shared by the CLI, recipes and the Python API.

Every config fails in ``__post_init__`` (before any model is loaded) with a message that says
what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_CALIBRATION_DATA = ("demo:code", "demo:prose")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what to change."""


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text a method observes: sources, how many windows, how long, which seed."""

    data: tuple[str, ...] = DEFAULT_CALIBRATION_DATA
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data: give at least one source, e.g. --data demo:code")
        if self.samples < 1:
            raise ConfigError(f"samples={self.samples}: use at least 1 calibration sample")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len}: use at least 2 tokens per sample")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: use at least 1")


@dataclass(frozen=True)
class EvalConfig:
    """What ``moeslim eval`` measures."""

    data: tuple[str, ...] = ("demo:code:test", "demo:prose:test")
    seq_len: int = 256
    max_windows: int | None = 64
    tasks: tuple[str, ...] = field(default_factory=tuple)
    task_limit: int | None = None
    speed: bool = False
    speed_repeats: int = 3
    generate_tokens: int = 24  # greedy continuations of fixed prompts, side by side (0: none)
    batch_size: int = 8

    def __post_init__(self) -> None:
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
        if self.generate_tokens < 0:
            raise ConfigError(f"generate_tokens={self.generate_tokens}: use 0 (no generations) or more")
