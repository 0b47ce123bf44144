"""Quantize plans on models larger than memory: streamed apply (GPTQ and RTN), resume after a kill, 2 processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import sample_ids, tiny_model

from moeslim.appliers import apply
from moeslim.io import load, save
from moeslim.methods.quant.driver import QuantizeConfig, plan_quantize
from moeslim.plans import Plan
from moeslim.runtime.lowbit_io import BASE_FILE, LOWBIT_FILE
from moeslim.runtime.shard_files import merge_safetensors
from moeslim.workflows.streamed_apply import apply_quantize_streamed

CALIB = sample_ids(0, 4, 16)
PROBE = sample_ids(7, 2, 12)


def _checkpoint(family: str, folder: Path) -> torch.nn.Module:
    model = tiny_model(family)
    model.save_pretrained(folder, max_shard_size="40KB")  # several shards: layers span files
    return model


def _reference(folder: Path, plan: Plan, out: Path) -> None:
    """What `moeslim apply` writes without --stream: the whole model loaded, quantized, saved."""
    model, _ = load(str(folder))
    apply(model, plan, calibration=CALIB)
    save(model, out)


def _same_checkpoint(a: Path, b: Path) -> None:
    for name in (BASE_FILE, LOWBIT_FILE):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys(), name
        for key, tensor in ta.items():  # byte-identical tensors
            assert tensor.dtype == tb[key].dtype and torch.equal(tensor, tb[key]), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    ma, _ = load(str(a))
    mb, _ = load(str(b))
    with torch.no_grad():
        assert torch.equal(ma(PROBE).logits, mb(PROBE).logits)


@pytest.mark.parametrize(("family", "config"), [
    ("mixtral", QuantizeConfig(method="pmq", bits=2.5, group_size=16)),
    ("deepseek_v3", QuantizeConfig(method="pmq", bits=2.5, group_size=16, quantize_attention=4)),  # dense layer 0
    ("qwen3_moe", QuantizeConfig(method="uniform", bits=3, group_size=16, quantizer="rtn")),
])
def test_streamed_quantize_apply_writes_the_same_checkpoint(family: str, config: QuantizeConfig,
                                                             tmp_path: Path) -> None:
    model = _checkpoint(family, tmp_path / "src")
    plan = plan_quantize(model, CALIB, config, "m")
    _reference(tmp_path / "src", plan, tmp_path / "ref")
    out = apply_quantize_streamed(str(tmp_path / "src"), plan, tmp_path / "streamed", calibration=CALIB)
    assert out == tmp_path / "streamed"
    _same_checkpoint(tmp_path / "ref", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "src", "streamed"]  # no parts left behind


def test_streamed_gptq_apply_needs_the_plans_windows(tmp_path: Path) -> None:
    model = _checkpoint("mixtral", tmp_path / "src")
    plan = plan_quantize(model, CALIB, QuantizeConfig(method="uniform", bits=4, group_size=16), "m")
    with pytest.raises(ValueError, match="hash"):
        apply_quantize_streamed(str(tmp_path / "src"), plan, tmp_path / "out", calibration=sample_ids(3, 4, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no per-layer parts left


def test_merged_safetensors_holds_every_part(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    parts = {"a": {"x": torch.arange(5, dtype=torch.int64), "y": torch.randn(3, 2)},
             "b": {"z": torch.randn(4).half(), "w": torch.zeros(0)}}
    for name, tensors in parts.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    merge_safetensors([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "m.safetensors",
                      {"format": "pt", "note": "x"})
    merged = load_file(tmp_path / "m.safetensors")
    want = {**parts["a"], **parts["b"]}
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], v) for k, v in want.items())
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}
    with pytest.raises(ValueError, match="several parts"):
        merge_safetensors([tmp_path / "a.safetensors"] * 2, tmp_path / "d.safetensors", {})


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


class Killed(Exception):
    pass


def _kill_after_layer(monkeypatch: pytest.MonkeyPatch, layer: int, seen: list[int]) -> None:
    """Make every LayerCheckpoint record its layers in ``seen`` and die right after committing ``layer``."""
    from moeslim.calibrate.resume import LayerCheckpoint

    original = LayerCheckpoint.save_layer

    def save_layer(self: LayerCheckpoint, index: int, results: dict[int, Any], outputs: list[torch.Tensor]) -> None:
        original(self, index, results, outputs)
        seen.append(index)
        if index == layer:
            raise Killed  # as if the process died right after the layer was committed

    monkeypatch.setattr(LayerCheckpoint, "save_layer", save_layer)


def test_a_killed_plan_quantize_resumes_at_the_next_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moeslim.calibrate.resume import LayerCheckpoint
    from moeslim.models.lazy import load_streamed

    _checkpoint("deepseek_v3", tmp_path / "ds")  # layer 0 dense, 1-2 MoE
    model, _ = load_streamed(str(tmp_path / "ds"))
    config = QuantizeConfig(method="pmq", bits=2.5, group_size=16)
    seen: list[int] = []
    with monkeypatch.context() as patch:
        _kill_after_layer(patch, 1, seen)
        with pytest.raises(Killed):
            plan_quantize(model, CALIB, config, "m", checkpoint=LayerCheckpoint(tmp_path / "state", "k"))
    assert seen == [0, 1]
    resumed_state = LayerCheckpoint(tmp_path / "state", "k")
    resumed = plan_quantize(model, CALIB, config, "m", checkpoint=resumed_state)
    assert resumed_state.resumed_from == 2
    again = plan_quantize(model, CALIB, config, "m")

    def text(plan: Plan) -> str:
        return json.dumps(_without_timings(plan.to_dict()), indent=1)

    assert text(resumed) == text(again)  # the restored factors are exact: byte-identical plan but for timings


@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
def test_a_killed_streamed_quantize_apply_resumes(quantizer: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import moeslim.workflows.streamed_apply as streamed

    model = _checkpoint("deepseek_v3", tmp_path / "src")
    plan = plan_quantize(model, CALIB, QuantizeConfig(method="pmq", bits=2.5, group_size=16, quantizer=quantizer), "m")
    source, out = str(tmp_path / "src"), tmp_path / "out"
    seen: list[int] = []
    with monkeypatch.context() as patch:
        if quantizer == "gptq":
            _kill_after_layer(patch, 1, seen)
        else:  # RTN keeps no calibration state: its layers are the written parts
            original = streamed._LayerParts.write

            def write(self: Any, index: int, *tensors: Any) -> None:
                original(self, index, *tensors)
                seen.append(index)
                if index == 1:
                    raise Killed

            patch.setattr(streamed._LayerParts, "write", write)
        with pytest.raises(Killed):
            apply_quantize_streamed(source, plan, out, calibration=CALIB, resume="key")
    assert seen == [0, 1] and not out.exists()
    state = tmp_path / ".out.layers"
    # GPTQ writes each MoE layer as it is quantized (layer 1), the dense layer 0 at the end; RTN layer by layer.
    written = ["layer-1.base.safetensors"] if quantizer == "gptq" else ["layer-0.base.safetensors",
                                                                         "layer-1.base.safetensors"]
    assert sorted(p.name for p in state.glob("layer-*.base.safetensors")) == written
    computed: list[int] = []
    with monkeypatch.context() as patch:
        if quantizer == "gptq":
            _kill_after_layer(patch, -1, computed)  # records the layers the GPTQ pass runs
        else:
            original_write = streamed._LayerParts.write

            def record(self: Any, index: int, *tensors: Any) -> None:
                computed.append(index)
                original_write(self, index, *tensors)

            patch.setattr(streamed._LayerParts, "write", record)
        apply_quantize_streamed(source, plan, out, calibration=CALIB, resume="key")
    assert computed == [2]  # only the layer after the kill
    assert not state.exists()
    apply_quantize_streamed(source, plan, tmp_path / "once", calibration=CALIB)
    _same_checkpoint(tmp_path / "once", out)
    # Another run's parts (a different key: other arguments) are not reused.
    stale = tmp_path / ".third.layers"
    stale.mkdir()
    (stale / "parts.key").write_text("other")
    (stale / "layer-2.base.safetensors").write_bytes(b"not a layer")
    apply_quantize_streamed(source, plan, tmp_path / "third", calibration=CALIB, resume="key")
    _same_checkpoint(tmp_path / "once", tmp_path / "third")


class _ThreadComm:
    """Rank ``rank`` of ``size`` threads: the collectives a torchrun job's processes use, in memory."""

    def __init__(self, rank: int, size: int, barrier: Any, slots: list[Any]) -> None:
        self.rank, self.size, self._barrier, self._slots = rank, size, barrier, slots

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        gathered = self.all_gather(tensor.clone())
        total = gathered[0].clone()
        for part in gathered[1:]:
            total += part
        tensor.copy_(total)

    def all_gather(self, value: Any) -> list[Any]:
        self._barrier.wait()
        self._slots[self.rank] = value
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()
        return out


def _on_threads(size: int, work: Any) -> list[Any]:
    import threading

    barrier, slots = threading.Barrier(size), [None] * size
    results: list[Any] = [None] * size

    def run(rank: int) -> None:
        results[rank] = work(_ThreadComm(rank, size, barrier, slots))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_gptq_split_over_processes_equals_one_process() -> None:
    """Hessians merged over processes equal one process's bit for bit; each process GPTQs every W-th quantized
    expert, and gathered, the packed experts are the same bytes."""
    from moeslim.calibrate.hessians import ExpertHessians
    from moeslim.methods.quant.transform import quantize_layer_experts
    from moeslim.models import find_moe_layers

    model = tiny_model("mixtral")
    layer = find_moe_layers(model)[0]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(24, layer.hidden_size, generator=gen) for _ in range(4)]
    config = QuantizeConfig(method="uniform", bits=3, group_size=16, sequential=False)
    bits = [3, 16, 2, 3, 4, 3, 16, 2]  # kept experts are copied locally, the rest split over 3 processes

    one = ExpertHessians(layer.num_experts)
    for x in batches:
        one.observe(layer, x)
    want, want_fallback = quantize_layer_experts(layer, bits, one.result(), config)

    def rank_work(comm: Any) -> Any:
        observer = ExpertHessians(layer.num_experts)
        for x in batches[comm.rank::comm.size]:
            observer.observe(layer, x)
        observer.sync(comm)
        summary = observer.result()
        # Summed in another order than one process, in float64: the same float32 Hessians, bit for bit.
        exact = one.result()
        assert torch.equal(summary.counts, exact.counts)
        for h, g in zip([*summary.up, *summary.down], [*exact.up, *exact.down], strict=True):
            assert (h is None) == (g is None) and (h is None or torch.equal(h, g))
        return quantize_layer_experts(layer, bits, summary, config, comm)

    for packed, fallback in _on_threads(3, rank_work):
        assert fallback == want_fallback
        for got, ref in ((packed.up, want.up), (packed.down, want.down)):
            sa, sb = got.to_state_dict("w"), ref.to_state_dict("w")
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_torchrun_two_gloo_processes_apply_a_gptq_plan(tmp_path: Path) -> None:
    """`torchrun -n 2 moeslim apply --stream` splits the windows and the GPTQ work; rank 0 writes the checkpoint
    one process writes."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    from moeslim.config import CalibrationConfig
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.models import resolve_model_path

    demo, tokenizer = load("demo")
    windows = build_calibration_set(CalibrationConfig(samples=16, seq_len=32, batch_size=8), tokenizer)
    plan = tmp_path / "q.json"  # one batch of 8 windows per process
    plan_quantize(demo, windows, QuantizeConfig(method="uniform", bits=4), "demo").save(plan)
    one, two = tmp_path / "one", tmp_path / "two"
    apply_quantize_streamed(resolve_model_path("demo"), Plan.load(plan), one)  # redraws the plan's windows
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    cli = str(Path(sys.executable).parent / "moeslim")
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", cli, "apply", "demo",
                             str(plan), "--stream", "--out", str(two)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-2000:]
    # The Hessians are float64 sums (exact, order-free), so the 2-process checkpoint is the 1-process one.
    _same_checkpoint(one, two)
