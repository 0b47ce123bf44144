"""Outputs lose nothing: --overwrite only replaces checkpoints, atomically; bad --out fails before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_checks import never_load
from transformers import AutoModelForCausalLM

from moeslim.cli import main
from moeslim.outputs import OutputError, atomic_dir, check_output_dir, check_output_file, clean_stale

CALIB = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}



def test_overwrite_refuses_the_working_directory_and_keeps_its_files(
        tiny_model_dir: Path, prune_plan: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "a.txt").write_text("mine")
    (work / "config.json").write_text("{}")  # even a folder that looks like a checkpoint
    before = _tree(work)
    monkeypatch.chdir(work)
    never_load(monkeypatch)
    for out in (".", str(work), str(tmp_path)):
        assert main(["apply", str(tiny_model_dir), str(prune_plan), "--out", out, "--overwrite"]) == 2
        assert "working directory" in capsys.readouterr().err
    assert _tree(work) == before


def test_overwrite_refuses_non_checkpoints_and_inputs(tiny_model_dir: Path, prune_plan: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    never_load(monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep.txt").write_text("do not delete")
    assert main(["apply", str(tiny_model_dir), str(prune_plan), "--out", str(data), "--overwrite"]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert (data / "keep.txt").read_text() == "do not delete"
    # the input model itself, and a folder holding the plan
    for out in (tiny_model_dir, tiny_model_dir.parent, prune_plan.parent):
        assert main(["apply", str(tiny_model_dir), str(prune_plan), "--out", str(out), "--overwrite"]) == 2
        assert "input of this run" in capsys.readouterr().err
    assert (tiny_model_dir / "config.json").is_file() and prune_plan.is_file()


def test_existing_out_needs_overwrite_and_is_swapped_whole(tiny_model_dir: Path, prune_plan: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "stale-extra.bin").write_text("old")
    assert main(["apply", str(tiny_model_dir), str(prune_plan), "--out", str(out)]) == 2
    assert (out / "stale-extra.bin").exists()
    assert main(["apply", str(tiny_model_dir), str(prune_plan), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale-extra.bin").exists()  # replaced whole, not merged
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old folder left beside it


def test_failed_save_leaves_old_checkpoint_and_names_user_path(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("boom")
    assert json.loads((out / "config.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(OSError, match=f"cannot write {out}"), atomic_dir(out, overwrite=True) as tmp:
        raise OSError(28, "No space left on device")


def test_unwritable_or_symlinked_out_fails_before_loading(tiny_model_dir: Path, prune_plan: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    never_load(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["apply", str(tiny_model_dir), str(prune_plan), "--out", str(blocker / "ckpt")]) == 2
    assert f"cannot write {blocker / 'ckpt'}" in capsys.readouterr().err
    assert main(["plan", "prune", str(tiny_model_dir), "--keep", "4", *CALIB, "--out", str(blocker / "p.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    target = tmp_path / "elsewhere.json"
    target.write_text("precious")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert main(["plan", "prune", str(tiny_model_dir), "--keep", "4", *CALIB, "--out", str(link)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--out", str(link)]) == 2
    assert target.read_text() == "precious"
    link_dir = tmp_path / "link-dir"
    link_dir.symlink_to(tmp_path)
    with pytest.raises(OutputError, match="symbolic link"):
        check_output_dir(link_dir, overwrite=True)


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".moeslim-tmp-{pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / f".moeslim-tmp-{os.getpid()}-abc"
    mine.mkdir()
    other = tmp_path / ".hidden-user-folder"
    other.mkdir()
    check_output_dir(tmp_path / "ckpt")
    assert not stale.exists() and mine.exists() and other.exists()
    assert clean_stale(tmp_path) == []


def test_long_valid_name_works_and_too_long_is_refused(tmp_path: Path) -> None:
    name = "m" * 250
    with atomic_dir(tmp_path / name) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / name / "config.json").is_file()
    assert check_output_file(tmp_path / ("p" * 250 + ".json")).name.startswith("p")
    with pytest.raises(OutputError, match="longer than 255 bytes"):
        check_output_dir(tmp_path / ("x" * 256))


def _bf16_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny checkpoint stored in bfloat16 (its config.json still says float32: the tensors decide)."""
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bf16 / name).write_bytes((tiny_model_dir / name).read_bytes())
    return bf16


def test_pruned_checkpoint_keeps_the_source_dtype(tiny_model_dir: Path, tmp_path: Path) -> None:
    bf16 = _bf16_copy(tiny_model_dir, tmp_path)
    plan = tmp_path / "p.json"
    assert main(["plan", "prune", str(bf16), "--method", "frequency", "--keep", "6", *CALIB, "--out", str(plan)]) == 0
    out = tmp_path / "pruned"
    assert main(["apply", str(bf16), str(plan), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert size < sum(p.stat().st_size for p in bf16.glob("*.safetensors"))


def test_quantized_checkpoint_keeps_the_source_dtype(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    import moeslim

    bf16 = _bf16_copy(tiny_model_dir, tmp_path)
    plan = tmp_path / "q.json"
    assert main(["plan", "quantize", str(bf16), "--method", "uniform", "--bits", "4", *CALIB, "--out", str(plan)]) == 0
    out = tmp_path / "q4"
    assert main(["apply", str(bf16), str(plan), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "moeslim_base.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    model, _ = moeslim.load(out)  # computes in float32 again
    assert model.get_input_embeddings().weight.dtype == torch.float32
