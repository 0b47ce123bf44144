"""The committed family table is the one the code generates (so the docs cannot drift from the code)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import moeslim
from moeslim.models.catalog import discover
from moeslim.models.readme import markdown

ROOT = Path(__file__).resolve().parents[1]
README = Path(moeslim.__file__).parent / "models" / "README.md"


def test_committed_readme_equals_generated_table() -> None:
    expected = markdown(discover())
    assert README.read_text() == expected, (
        "src/moeslim/models/README.md is stale: run `python scripts/moe_families.py --markdown > "
        "src/moeslim/models/README.md`"
    )


def test_script_prints_the_same_markdown(capsys) -> None:
    spec = importlib.util.spec_from_file_location("moe_families", ROOT / "scripts" / "moe_families.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["moe_families"] = module
    spec.loader.exec_module(module)
    assert module.main(["--markdown"]) == 0
    assert capsys.readouterr().out == README.read_text()
    assert module.main([]) == 0
    plain = capsys.readouterr().out
    rows = discover()
    assert f"{sum(r.supported for r in rows)} supported of {len(rows)} MoE model types" in plain
