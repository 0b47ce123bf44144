"""No file lost, no silent wrong answer: one ``--out`` rule for every command, plans checked before any work,
damaged inputs refused with one clean line, temp files of killed runs removed by the next run."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_checks import error_line, never_load

from moeslim.cli import main
from moeslim.outputs import OutputError, check_output_dir, check_output_file, output_lock

CALIB = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]




@pytest.fixture()
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def quant_plan(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan = tmp_path_factory.mktemp("qplan") / "u3.json"
    assert main(["plan", "quantize", str(tiny_model_dir), "--method", "uniform", "--bits", "3", "--group-size", "16",
                 *CALIB, "--out", str(plan)]) == 0
    return plan


# -- 1. one rule for every command that writes ---------------------------------------------------------------

def test_a_plan_never_replaces_a_file_inside_the_input_model(model_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    config = (model_copy / "config.json").read_bytes()
    never_load(monkeypatch)
    for extra in ([], ["--overwrite"]):
        assert main(["plan", "skip", str(model_copy), *CALIB, "--out", str(model_copy / "config.json"), *extra]) == 2
        assert "inside the input folder" in error_line(capsys)
    # a new file inside the model folder is refused too: the folder is an input, never written into
    assert main(["plan", "skip", str(model_copy), *CALIB, "--out", str(model_copy / "skip.json")]) == 2
    assert "inside the input folder" in error_line(capsys)
    assert (model_copy / "config.json").read_bytes() == config
    assert not (model_copy / "skip.json").exists()


@pytest.mark.parametrize("command", [
    ["plan", "prune", "{model}", "--keep", "4", *CALIB],
    ["plan", "skip", "{model}", *CALIB],
    ["eval", "{model}", "--tasks", "none"],
    ["export", "{model}", "--format", "gguf"],
])
def test_an_existing_output_file_is_refused_without_overwrite(command: list[str], tiny_model_dir: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("an unrelated file")
    args = [a.replace("{model}", str(tiny_model_dir)) for a in command]
    with monkeypatch.context() as patch:
        never_load(patch)
        start = time.perf_counter()
        assert main([*args, "--out", str(existing)]) == 2
        assert time.perf_counter() - start < 2.0  # refused before any work
    assert "already exists" in error_line(capsys) and existing.read_text() == "an unrelated file"
    out = tmp_path / "again.out"
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(out)]) == 2
    assert "--overwrite" in error_line(capsys)
    assert main([*args, "--out", str(out), "--overwrite"]) == 0  # gguf takes --overwrite like every command
    assert out.is_file() and out.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.out", "notes.txt"]  # no temp file left


def test_an_input_file_is_never_an_output(tiny_model_dir: Path, prune_plan: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "p.json"
    shutil.copy(prune_plan, plan)
    before = plan.read_bytes()
    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--plan", str(plan), "--out", str(plan),
                 "--overwrite"]) == 2
    assert "input of this run" in error_line(capsys)
    assert plan.read_bytes() == before


def test_out_through_a_symlinked_folder_is_refused(tiny_model_dir: Path, prune_plan: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    never_load(monkeypatch)
    assert main(["plan", "prune", str(tiny_model_dir), "--keep", "4", *CALIB,
                 "--out", str(tmp_path / "via" / "p.json")]) == 2
    assert "goes through the symbolic link" in error_line(capsys)
    assert main(["apply", str(tiny_model_dir), str(prune_plan), "--out", str(tmp_path / "via" / "ck")]) == 2
    assert "goes through the symbolic link" in error_line(capsys)
    assert list(real.iterdir()) == []
    # a link to the input model folder cannot smuggle a write into it
    (tmp_path / "model-link").symlink_to(tiny_model_dir)
    with pytest.raises(OutputError, match="symbolic link"):
        check_output_file(tmp_path / "model-link" / "x.json", overwrite=True)


# -- 2. two runs that write one output -----------------------------------------------------------------------

_HOLD = """
import sys, time
from moeslim.outputs import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_apply_to_the_same_out_fails_while_the_first_runs(tiny_model_dir: Path, prune_plan: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ck"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["apply", str(tiny_model_dir), str(prune_plan), "--out", str(out)]) == 2
        line = error_line(capsys)
        assert "being written by another moeslim run" in line and f"pid {holder.pid}" in line
        assert not out.exists()
    finally:
        holder.kill()  # a killed holder's lock is released by the kernel
        holder.wait()
    assert main(["apply", str(tiny_model_dir), str(prune_plan), "--out", str(out)]) == 0
    assert (out / "config.json").is_file()


def test_the_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    with output_lock(out), output_lock(out):
        pass
    with output_lock(out):  # released: taken again
        pass


# -- 3./4. plans checked before any work ---------------------------------------------------------------------

def _edited(plan: Path, tmp_path: Path, edit: Any) -> Path:
    data = json.loads(plan.read_text())
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    return bad


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"]["0"]["bits"].__setitem__(1, 2.5), "layers.0.bits[1] = 2.5 is not an integer"),
    (lambda d: d["layers"]["1"]["bits"].__setitem__(0, float("nan")), "layers.1.bits[0] = nan is not an integer"),
    (lambda d: d["layers"]["0"]["bits"].__setitem__(2, 9), "layers.0.bits[2] = 9 is out of range"),
    (lambda d: d["layers"]["0"].__setitem__("bits", "3,3,3"), "layers.0.bits must be a non-empty array"),
])
def test_bad_quantize_widths_fail_before_gptq(edit: Any, message: str, tiny_model_dir: Path, quant_plan: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = _edited(quant_plan, tmp_path, edit)
    never_load(monkeypatch)
    assert main(["apply", str(tiny_model_dir), str(bad), "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert message in line and str(bad) in line


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"]["0"].__setitem__(1, 5.5), "layers.0[1] = 5.5 is not an integer"),
    (lambda d: d["layers"].__setitem__("0", "0,1,2,3"), "layers.0 must be a non-empty array of integers"),
    (lambda d: d["layers"]["0"].__setitem__(1, "3"), "layers.0[1] = '3' is not an integer"),
    (lambda d: d["layers"]["0"].__setitem__(1, d["layers"]["0"][0]), "lists an expert more than once"),
    (lambda d: d["layers"].__setitem__("one", [0, 1]), "key 'one' is not a decoder layer index"),
])
def test_bad_prune_plans_fail_before_any_work(edit: Any, message: str, tiny_model_dir: Path, prune_plan: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = _edited(prune_plan, tmp_path, edit)
    never_load(monkeypatch)
    assert main(["apply", str(tiny_model_dir), str(bad), "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert message in line and str(bad) in line


def test_a_rank_above_full_rank_fails_before_the_svd(tiny_model_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "lr.json"
    assert main(["plan", "lowrank", str(tiny_model_dir), "--ratio", "0.5", *CALIB, "--out", str(plan)]) == 0
    bad = _edited(plan, tmp_path, lambda d: d["layers"]["1"]["down_ranks"].__setitem__(3, 100000))

    def no_svd(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the SVD pass ran before the ranks were checked")

    monkeypatch.setattr("moeslim.appliers.lowrank.calibrated_pass", no_svd)
    assert main(["apply", str(tiny_model_dir), str(bad), "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert "layers.1.down_ranks[3] = 100000 is above the full rank 32" in line and str(bad) in line


def test_compressed_tensors_refuses_mixed_widths_before_gptq(tiny_model_dir: Path, quant_plan: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    mixed = _edited(quant_plan, tmp_path, lambda d: d["layers"]["0"]["bits"].__setitem__(0, 2))
    never_load(monkeypatch)
    assert main(["export", str(tiny_model_dir), "--format", "compressed-tensors", "--plan", str(mixed),
                 "--out", str(tmp_path / "ct")]) == 2
    line = error_line(capsys)
    assert "(layer 0: [2, 3])" in line and "--granularity layer --scope global" in line
    assert "--bits B, B from 1 to 7" in line and "4|8" not in line
    assert str(mixed) in line and not (tmp_path / "ct").exists()


# -- 5./6. damaged inputs: one clean line, never a NaN result -------------------------------------------------

def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real command in a fresh process: what a user sees on the terminal, third-party loggers included."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "moeslim.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_a_truncated_shard_with_stream_gets_the_clean_error(model_copy: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    weights = next(model_copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["plan", "prune", str(model_copy), "--keep", "4", "--stream", *CALIB,
                 "--out", str(tmp_path / "p.json")]) == 2
    line = error_line(capsys)
    assert "damaged or truncated" in line and str(weights) in line


def test_a_missing_tensor_prints_one_line_and_no_load_report(model_copy: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = next(model_copy.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors.pop("model.layers.1.input_layernorm.weight")
    save_file(tensors, weights, metadata={"format": "pt"})
    done = _cli("eval", str(model_copy), "--tasks", "none", "--out", str(tmp_path / "r.json"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: cannot load {str(model_copy)!r}: 1 weight(s) are missing from the checkpoint (e.g. "
        "model.layers.1.input_layernorm.weight); it would run with random weights"]


def _overwrite_tensor(folder: Path, key: str) -> None:
    """Overwrite the first bytes of ``key``'s data with 0xFF, as a damaged copy would."""
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    start = 8 + size + json.loads(data[8:8 + size])[key]["data_offsets"][0]
    data[start:start + 64] = b"\xff" * 64
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize("stream", [False, True])
def test_corrupted_weights_are_refused_not_evaluated_to_nan(stream: bool, model_copy: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _overwrite_tensor(model_copy, "model.layers.0.self_attn.q_proj.weight")
    if stream:
        args = ["plan", "prune", str(model_copy), "--keep", "4", "--stream", *CALIB, "--out", str(tmp_path / "p.json")]
    else:
        args = ["eval", str(model_copy), "--tasks", "none", "--out", str(tmp_path / "r.json")]
    assert main(args) == 2
    line = error_line(capsys)
    assert "model.layers.0.self_attn.q_proj.weight holds NaN or infinite values" in line
    assert not any(tmp_path.glob("*.json"))


def test_a_nan_perplexity_is_an_error(tiny_model_dir: Path) -> None:
    from moeslim.evaluate.perplexity import perplexity
    from moeslim.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # what a broken compression would leave
    with pytest.raises(ValueError, match="NaN or infinite"):
        perplexity(model, torch.randint(0, 100, (2, 16)), progress=False)


def test_settings_and_text_errors_name_the_field_or_file(tiny_model_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "skip", str(tiny_model_dir), *CALIB, "--protect", "nan",
                 "--out", str(tmp_path / "s.json")]) == 2
    assert "protect=nan: use a finite number" in error_line(capsys)
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n\xff\xfe\x00binary\n')
    assert main(["plan", "prune", str(tiny_model_dir), "--keep", "4", "--data", str(binary), "--samples", "2",
                 "--seq-len", "4", "--out", str(tmp_path / "p.json")]) == 2
    line = error_line(capsys)
    assert f"{binary}:2 is not UTF-8 text" in line


# -- 7. temp files of killed runs ----------------------------------------------------------------------------

_KILLED_EXPORT = """
import os, sys
import moeslim.export.gguf as gguf
def die(*args, **kwargs):
    os._exit(9)  # killed while writing: no cleanup runs
gguf._write_file = die
from moeslim.io import load
model, tok = load(sys.argv[1])
gguf.export_gguf(model, tok, sys.argv[2])
"""


def test_a_killed_export_leaves_a_temp_folder_the_next_run_removes(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    killed = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(tiny_model_dir), str(out)], timeout=300)
    assert killed.returncode == 9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".moeslim-tmp-")
    check_output_file(out)
    assert list(tmp_path.iterdir()) == []


_KILLED_STREAM = """
import os, sys
import moeslim.workflows.streamed_apply as streamed
from moeslim.plans import Plan
original = streamed._LayerParts.write
def write(self, index, *tensors):
    original(self, index, *tensors)
    os._exit(9)  # killed after the first layer's parts
streamed._LayerParts.write = write
streamed.stream_apply(sys.argv[1], [Plan.load(sys.argv[2])], sys.argv[3])
"""


def test_a_killed_streamed_apply_leaves_parts_the_next_run_removes(tiny_model_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "rtn.json"
    assert main(["plan", "quantize", str(tiny_model_dir), "--method", "uniform", "--bits", "4", "--group-size", "16",
                 "--quantizer", "rtn", *CALIB, "--out", str(plan)]) == 0
    work = tmp_path / "work"
    work.mkdir()
    killed = subprocess.run([sys.executable, "-c", _KILLED_STREAM, str(tiny_model_dir), str(plan), str(work / "ck")],
                            timeout=300)
    assert killed.returncode == 9
    left = sorted(p.name for p in work.iterdir())
    assert left and all(name.startswith(".moeslim-tmp-") for name in left), left
    check_output_dir(work / "ck")
    assert list(work.iterdir()) == []
