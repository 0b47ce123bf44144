"""Bad input gets one clear error line (exit 2), never a traceback, and never a silent wrong answer."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_checks import error_line

from moeslim.cli import main
from moeslim.config import ConfigError
from moeslim.hub import hub_reachable
from moeslim.workflows.recipe import recipe_from_dict

CALIB = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]



def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _copy(tiny_model_dir, tmp_path / "broken")
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["eval", str(broken), "--tasks", "none", "--out", str(tmp_path / "r.json")]) == 2
    assert "damaged or truncated" in error_line(capsys)


def test_pickle_weights_are_refused(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, folder / "pytorch_model.bin")
    assert main(["inspect", str(folder), "--out", str(tmp_path / "i")]) == 2
    assert "does not unpickle" in error_line(capsys)


def test_missing_weights_are_refused(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    partial = _copy(tiny_model_dir, tmp_path / "partial")
    weights = next(partial.glob("*.safetensors"))
    tensors = load_file(weights)
    dropped = [k for k in tensors if k.endswith("layers.1.input_layernorm.weight")]
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, weights, metadata={"format": "pt"})
    assert main(["inspect", str(partial), "--out", str(tmp_path / "i")]) == 2
    assert "missing from the checkpoint" in error_line(capsys)


def test_remote_code_is_never_run(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy(tiny_model_dir, tmp_path / "remote")
    marker = tmp_path / "code-ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="moeslim_untrusted",
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert main(["inspect", str(folder), "--out", str(tmp_path / "i")]) == 2
    error_line(capsys)
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda d: [d], "expected a JSON object, got a JSON array"),
    (lambda d: {**d, "provenance": {k: v for k, v in d["provenance"].items() if k != "model"}}, "lacks model"),
    (lambda d: {**d, "provenance": {**d["provenance"], "extra": 1}}, "unknown field(s) extra"),
    (lambda d: {**d, "provenance": "x"}, "'provenance' must be an object"),
    (lambda d: {**d, "layers": [1, 2]}, "'layers' must be an object"),
    (lambda d: {**d, "surprise": 1}, "unknown field(s) surprise"),
])
def test_malformed_plans(tiny_model_dir: Path, prune_plan: Path, tmp_path: Path, edit, message: str,
                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(edit(json.loads(prune_plan.read_text()))))
    assert main(["apply", str(tiny_model_dir), str(bad), "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert message in line and str(bad) in line
    assert not (tmp_path / "o").exists()


def test_plan_for_another_model_is_refused_unless_forced(tiny_model_dir: Path, prune_plan: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(prune_plan.read_text())
    data["provenance"]["model_config_hash"] = "0" * 16
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    assert main(["apply", str(tiny_model_dir), str(other), "--out", str(tmp_path / "o")]) == 2
    assert "--force" in error_line(capsys)
    assert not (tmp_path / "o").exists()
    assert main(["apply", str(tiny_model_dir), str(other), "--out", str(tmp_path / "o"), "--force"]) == 0


def test_skip_plan_checks(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "skip.json"
    assert main(["plan", "skip", str(tiny_model_dir), *CALIB, "--out", str(plan)]) == 0
    data = json.loads(plan.read_text())
    negative = {**data, "layers": {k: {"beta": -0.5} for k in data["layers"]}}
    bad = tmp_path / "neg.json"
    bad.write_text(json.dumps(negative))
    assert main(["apply", str(tiny_model_dir), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert ">= 0" in error_line(capsys)
    # a skip plan made on the 8-expert model does not fit a 4-expert pruned one
    pruned_plan = tmp_path / "p.json"
    assert main(["plan", "prune", str(tiny_model_dir), "--method", "frequency", "--keep", "4", *CALIB,
                 "--out", str(pruned_plan)]) == 0
    assert main(["apply", str(tiny_model_dir), str(pruned_plan), str(plan), "--out", str(tmp_path / "o")]) == 2
    assert "config hash" in error_line(capsys)


def test_quantize_plan_for_another_model_is_refused(tiny_model_dir: Path, prune_plan: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "q.json"
    assert main(["plan", "quantize", str(tiny_model_dir), "--method", "uniform", "--bits", "4", *CALIB,
                 "--out", str(plan)]) == 0
    assert main(["apply", str(tiny_model_dir), str(prune_plan), str(plan), "--out", str(tmp_path / "o")]) == 2
    assert "config hash" in error_line(capsys)


def test_jsonl_lines_must_be_objects(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n[1, 2]\n')
    assert main(["plan", "prune", str(tiny_model_dir), "--keep", "4", "--data", str(data), "--samples", "1",
                 "--seq-len", "8", "--out", str(tmp_path / "p.json")]) == 2
    assert f"{data}:2 is a JSON list, not an object" in error_line(capsys)
    data.write_text('{"text": "hello"}\n{broken\n')
    assert main(["plan", "prune", str(tiny_model_dir), "--keep", "4", "--data", str(data), "--samples", "1",
                 "--seq-len", "8", "--out", str(tmp_path / "p.json")]) == 2
    assert f"{data}:2 is not valid JSON" in error_line(capsys)


def test_seq_len_beyond_the_model_is_refused(tiny_model_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # the tiny model has max_position_embeddings=512
    assert main(["eval", str(tiny_model_dir), "--seq-len", "600", "--tasks", "none",
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "maximum of 512 positions" in error_line(capsys)
    assert main(["plan", "skip", str(tiny_model_dir), "--seq-len", "1024", "--samples", "1",
                 "--out", str(tmp_path / "s.json")]) == 2
    assert "maximum of 512 positions" in error_line(capsys)
    assert not (tmp_path / "s.json").exists()


BASE = {"name": "r", "model": "demo", "stages": [{"prune": {"method": "frequency", "keep": 6}}]}


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"prune": {"method": "frequency", "keep": 6.5}}]}, "keep=6.5: expected an integer, got float"),
    ({"stages": [{"prune": {"method": "frequency"}}]}, "keep is required"),
    ({"stages": [{"prune": {"method": "frequency", "keep": "6"}}]}, "expected an integer, got str"),
    ({"stages": [{"quantize": {"bits": "3"}}]}, "bits='3': expected a number"),
    ({"stages": []}, "non-empty list"),
    ({"save": "no"}, "save='no': expected true or false"),
    ({"stages": [{"prune": {"keep": 6, "method": "magic"}}]}, "method='magic' is not a pruning method"),
    ({"stages": [{"skip": {"rule": "top3"}}]}, "rule='top3': use one of top2, topk"),
    ({"surprise": 1}, "unknown field(s) surprise"),
    ({"model": None}, "model=None: expected a string"),
    ({"name": ".."}, "name='..'"),
    ({"name": "a/b"}, "name='a/b'"),
    ({"name": 7}, "expected a string"),
    ({"calibration": {"samples": "many"}}, "samples='many': expected an integer"),
    ({"calibration": [1]}, "expected a mapping"),
    ({"eval": {"max_windows": 1.5}}, "max_windows=1.5"),
    ({"eval": {"speed": "yes"}}, "speed='yes': expected true or false"),
])
def test_recipe_validation(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        recipe_from_dict({**BASE, **change}, "r.yaml")
    assert message in str(err.value) and str(err.value).startswith("r.yaml")


def test_bad_recipe_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("work started before the recipe was validated")

    monkeypatch.setattr("moeslim.models.load_model", refuse)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: demo\nstages:\n  - prune: {method: frequency, keep: 6.5}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "runs")]) == 2
    assert "keep=6.5" in error_line(capsys)
    assert not (tmp_path / "runs").exists()  # no empty run folder


def test_offline_hub_probe_is_bounded_when_packets_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    release = threading.Event()

    def black_hole(*_args: object, **_kwargs: object) -> socket.socket:
        release.wait(30)  # a name lookup / SYN that is never answered
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", black_hole)
    start = time.perf_counter()
    try:
        assert hub_reachable(timeout_s=0.5) is False
        assert time.perf_counter() - start < 1.5
    finally:
        release.set()


def test_tokenizer_larger_than_the_model_vocab(tiny_model_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    config.vocab_size = 64  # far below the demo tokenizer's 8192 ids
    small = tmp_path / "small-vocab"
    AutoModelForCausalLM.from_config(config).save_pretrained(small)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, small / name)
    assert main(["plan", "prune", str(small), "--keep", "4", *CALIB, "--out", str(tmp_path / "p.json")]) == 2
    assert "does not belong to this model" in error_line(capsys)
    assert main(["eval", str(small), "--tasks", "none", "--max-windows", "1", "--seq-len", "16",
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "does not belong to this model" in error_line(capsys)
