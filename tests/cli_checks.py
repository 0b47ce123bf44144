"""Checks the CLI tests share: one clean error line, and no model loaded before the inputs were checked."""

from __future__ import annotations

import pytest


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one ``error: ...`` line a refused command printed on stderr (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def never_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command gets as far as loading a model."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output / plan was checked")

    monkeypatch.setattr("moeslim.io.load", refuse)
    monkeypatch.setattr("moeslim.models.load_model", refuse)
    monkeypatch.setattr("moeslim.models.lazy.load_streamed", refuse)
