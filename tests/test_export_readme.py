"""The README's GGUF family / tokenizer-kind list is the one the registries generate (the docs cannot drift)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from moeslim.export.gguf_arch import GGUF_ARCHS
from moeslim.export.gguf_readme import BEGIN, END, gguf_support_markdown, replace_block

ROOT = Path(__file__).resolve().parents[1]


def test_readme_block_equals_generated() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(BEGIN):readme.index(END) + len(END) + 1]
    assert block == gguf_support_markdown(), "README.md's GGUF list is stale: run python scripts/gguf_support.py " \
                                             "--write-readme"
    for arch in GGUF_ARCHS.values():
        assert f"`{arch.name}`" in block and all(f"`{t}`" in block for t in arch.model_types)


def test_script_rewrites_only_the_block(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("gguf_support", ROOT / "scripts" / "gguf_support.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gguf_support"] = module
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    assert capsys.readouterr().out == gguf_support_markdown()
    stale = f"before\n{BEGIN}\nold rows\n{END}\nafter\n"
    assert replace_block(stale, gguf_support_markdown()) == f"before\n{gguf_support_markdown()}after\n"
