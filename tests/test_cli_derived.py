"""``moeslim plan <kind>`` flags are derived from the registered config dataclasses (no hand-written mapping)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from moeslim import cli
from moeslim.config import ConfigError, check_types
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.skip import SkipConfig
from moeslim.workflows import stages


def _plan_parser(kind: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    plan = sub.choices["plan"]
    plan_sub = next(a for a in plan._actions if isinstance(a, argparse._SubParsersAction))
    return plan_sub.choices[kind]


def _parse(*argv: str) -> tuple[argparse.Namespace, dict[str, object]]:
    args = cli.build_parser().parse_args(["plan", *argv])
    return args, cli._config_values(args, args.config_cls)


def test_every_registered_kind_has_one_flag_per_config_field() -> None:
    for kind, config_cls in stages.stage_configs().items():
        options = {opt for action in _plan_parser(kind)._actions for opt in action.option_strings}
        for f in dataclasses.fields(config_cls):
            flag = f"--{f.name.replace('_', '-')}"
            assert flag in options, f"plan {kind} lacks {flag}"
            if f.name not in cli._SHARED_FIELDS and f.metadata.get("help"):
                action = next(a for a in _plan_parser(kind)._actions if flag in a.option_strings)
                assert f.metadata["help"].replace("%", "%%") in (action.help or "")


def test_unset_flags_leave_config_defaults_and_given_flags_are_typed() -> None:
    _, values = _parse("prune", "demo", "--keep", "6", "--out", "p.json")
    assert values == {"keep": 6}  # everything else: PruneConfig's defaults
    _, values = _parse("prune", "demo", "--keep", "6", "--method", "search", "--beam", "3", "--no-local-search",
                       "--max-tokens", "100", "--seed", "5", "--out", "p.json")
    assert values == {"keep": 6, "method": "search", "beam": 3, "local_search": False, "max_tokens": 100, "seed": 5}
    _, values = _parse("prune", "demo", "--keep", "6", "--budget", "none", "--out", "p.json")
    assert values == {"keep": 6, "budget": None}  # 'none' sets an optional field to None (no limit)
    assert stages.parse_stage({"prune": values}, "cli").config.budget is None
    args, values = _parse("quantize", "demo", "--bits", "2.5", "--candidates", "2,3,4", "--act-order",
                          "--batch-size", "2", "--out", "q.json")
    assert values == {"bits": 2.5, "candidates": (2, 3, 4), "act_order": True, "batch_size": 2}
    assert args.batch_size == 2  # the shared flag also sets the calibration batch size
    config = stages.parse_stage({"quantize": values}, "cli").config
    assert config == QuantizeConfig(bits=2.5, candidates=(2, 3, 4), act_order=True, batch_size=2)


@pytest.mark.parametrize("argv", [
    ["prune", "demo", "--out", "p.json"],  # keep has no default: a required flag
    ["quantize", "demo", "--out", "q.json"],  # bits: metadata required_flag
    ["prune", "demo", "--keep", "6", "--method", "magic", "--out", "p.json"],  # Literal -> choices
    ["quantize", "demo", "--bits", "3", "--candidates", "2,x", "--out", "q.json"],  # tuple[int, ...]
    ["skip", "demo", "--quantile", "half", "--out", "s.json"],  # float
])
def test_bad_flags_exit_2_before_any_work(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["plan", *argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@dataclass(frozen=True)
class _NewConfig:
    """A kind registered after the CLI was written."""

    width: int = field(metadata={"help": "how wide"})
    flavour: Literal["sweet", "sour"] = field(default="sweet", metadata={"help": "which taste"})
    sizes: tuple[int, ...] = field(default=(1, 2), metadata={"help": "sizes to try"})
    fast: bool = field(default=True, metadata={"help": "go fast"})
    cap: float | None = field(default=None, metadata={"help": "upper bound, 100% at most"})
    seed: int = 7

    def __post_init__(self) -> None:
        check_types(self)


def test_a_newly_registered_kind_gets_its_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = stages._registry()
    monkeypatch.setattr(stages, "_registry", lambda: {**real, "novel": (_NewConfig, real["skip"][1])})
    help_text = " ".join(_plan_parser("novel").format_help().split())
    assert "--width WIDTH how wide (required)" in help_text
    assert "upper bound, 100% at most (default None; 'none' for None)" in help_text
    _, values = _parse("novel", "demo", "--width", "3", "--flavour", "sour", "--sizes", "4,5", "--no-fast",
                       "--cap", "0.5", "--out", "n.json")
    assert values == {"width": 3, "flavour": "sour", "sizes": (4, 5), "fast": False, "cap": 0.5}
    assert stages.parse_stage({"novel": values}, "cli").config == _NewConfig(3, "sour", (4, 5), False, 0.5)
    _, values = _parse("novel", "demo", "--width", "3", "--out", "n.json")
    assert stages.parse_stage({"novel": values}, "cli").config.seed == 7  # --seed not given: the config's own
    with pytest.raises(SystemExit):
        _parse("novel", "demo", "--width", "3", "--flavour", "bitter", "--out", "n.json")


def test_literal_fields_are_checked_from_python_too() -> None:
    with pytest.raises(ConfigError, match="rule='top3': use one of top2, topk"):
        SkipConfig(rule="top3")  # type: ignore[arg-type]  # the mistake under test
    with pytest.raises(ConfigError, match="scope='model': use one of layer, global"):
        QuantizeConfig(scope="model")  # type: ignore[arg-type]


def test_eval_flags_come_from_eval_config() -> None:
    from moeslim.config import EvalConfig

    args = cli.build_parser().parse_args(["eval", "demo", "--max-windows", "none", "--speed", "--speed-repeats", "1",
                                          "--generate-tokens", "0", "--data", "demo:code:test"])
    values = cli._config_values(args, EvalConfig, shared=())
    assert values == {"max_windows": None, "speed": True, "speed_repeats": 1, "generate_tokens": 0}
    assert args.data == ["demo:code:test"] and args.tasks is None  # repeatable flags, handled by cmd_eval
    options = {opt for action in cli.build_parser()._subparsers._group_actions[0].choices["eval"]._actions
               for opt in action.option_strings}
    assert {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(EvalConfig)} <= options
