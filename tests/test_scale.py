"""Models larger than memory: streamed layers, bounded samples, --dtype/--device, torchrun data parallelism."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import sample_ids, tiny_model

from moeslim.calibrate import ExpertOutputs, RoutingStats, run_layerwise
from moeslim.cli import main
from moeslim.config import ConfigError
from moeslim.devices import resolve_device, resolve_dtype
from moeslim.methods.prune import PruneConfig, plan_prune
from moeslim.methods.prune.enumerate import SubsetLossAccumulator, best_subset, enumerate_best, enumerate_subsets
from moeslim.models import decoder_layers, find_moe_layers
from moeslim.models.lazy import CheckpointIndex, ShardedLayers, is_streamed, load_streamed

# Mixtral: legacy per-expert layout on disk; deepseek_v3: a dense first layer, correction-bias buffers;
# qwen3_moe: per-expert layout fused at load; gpt_oss: fused + transposed experts with biases.
STREAM_FAMILIES = ("mixtral", "deepseek_v3", "qwen3_moe", "gpt_oss")


def _checkpoint(family: str, folder: Path) -> tuple[torch.nn.Module, Path]:
    model = tiny_model(family)
    model.save_pretrained(folder, max_shard_size="40KB")  # several shards: layers span files
    return model, folder


@pytest.mark.parametrize("family", STREAM_FAMILIES)
def test_streamed_load_equals_full_load(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, folder = _checkpoint(family, tmp_path / family)
    assert len(list(folder.glob("*.safetensors"))) > 1
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    skeleton, _ = load_streamed(str(folder))
    assert is_streamed(skeleton)
    assert all(p.is_meta for p in decoder_layers(skeleton).parameters())  # nothing of a layer is resident
    reference = dict(full.named_parameters())
    store = ShardedLayers(skeleton)
    for index in range(len(decoder_layers(skeleton))):
        with store.on_device(index, torch.device("cpu")) as layer:
            prefix = next(n for n, m in skeleton.named_modules() if m is layer)
            for name, param in layer.named_parameters():
                assert torch.equal(param, reference[f"{prefix}.{name}"]), (family, index, name)
        assert all(p.is_meta for p in decoder_layers(skeleton)[index].parameters())  # freed after its turn

    # Same plan from the streamed skeleton as from the whole model.
    ids = sample_ids(batch=4, seq=16)
    config = PruneConfig(keep=4, method="enumerate")
    streamed_plan = plan_prune(skeleton, ids, config, "m", batch_size=2)
    full_plan = plan_prune(full, ids, config, "m", batch_size=2)
    assert streamed_plan.layers == full_plan.layers
    for idx, entry in full_plan.summary["layers"].items():
        assert math.isclose(streamed_plan.summary["layers"][idx]["loss"], entry["loss"], rel_tol=1e-12)

    # Same logits once every layer is read in through the streaming path.
    index = CheckpointIndex(folder, skeleton)
    index.load(skeleton, [k for keys in index.layer_keys for k in keys], "cpu", "all layers")
    assert not is_streamed(skeleton)
    ids = sample_ids(batch=2, seq=12)
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, full(ids).logits)


def test_streaming_refuses_a_checkpoint_missing_a_layer(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from moeslim.models.lazy import StreamingError

    _, folder = _checkpoint("qwen3_moe", tmp_path / "q")
    for file in folder.glob("*.safetensors"):
        tensors = load_file(file)
        kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.1.")}
        if len(kept) != len(tensors):
            save_file(kept, file, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.startswith("model.layers.1.")}
    index.write_text(json.dumps(data))
    with pytest.raises(StreamingError, match=r"decoder layer\(s\) \[1\]"):
        load_streamed(str(folder))


def test_enumeration_accumulated_per_batch_equals_the_cached_sample() -> None:
    """The bounded (batch by batch) enumeration scores every kept set exactly as the full (T, E, H) cache."""
    model = tiny_model("mixtral")
    ids = sample_ids(batch=6, seq=16)
    subsets = enumerate_subsets(8, 5)

    def observers(_layer: Any) -> list[Any]:
        return [SubsetLossAccumulator(subsets, chunk_tokens=7), ExpertOutputs(max_tokens=None)]

    results = run_layerwise(model, ids, observers, batch_size=2, progress=False)
    moe = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    for idx, summary in results.items():
        streamed, cached = summary["subset_losses"], summary["expert_outputs"]
        full = enumerate_best(cached, moe[idx].route, keep=5)
        assert best_subset(subsets, streamed).kept == full.kept
        assert math.isclose(float(streamed.min()), full.loss, rel_tol=1e-12)


def test_expert_output_sample_is_bounded_and_does_not_depend_on_batching() -> None:
    model = tiny_model("qwen3_moe")
    ids = sample_ids(batch=8, seq=16)  # 128 tokens

    def sample(batch_size: int, cap: int | None) -> Any:
        out = run_layerwise(model, ids, lambda _l: [ExpertOutputs(max_tokens=cap, seed=3)],
                            batch_size=batch_size, progress=False)
        return next(iter(out.values()))["expert_outputs"]

    whole = sample(8, None)
    assert whole.tokens == 128
    capped = [sample(b, 40) for b in (1, 3, 8)]
    for s in capped:
        assert s.tokens == 40
        assert torch.equal(s.x, capped[0].x) and torch.equal(s.outputs, capped[0].outputs)
    # The capped sample is a subset of the tokens, in their original order.
    rows = [int((whole.x == row).all(dim=1).nonzero()[0]) for row in capped[0].x]
    assert rows == sorted(rows) and len(set(rows)) == 40


def test_demo_kept_sets_unchanged_by_the_bounded_statistics() -> None:
    """Enumeration without a (tokens, E, H) cache keeps the same experts on the demo model as with it."""
    from moeslim.config import DEFAULT_CALIBRATION_DATA, CalibrationConfig
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.io import load

    model, tokenizer = load("demo")
    calib = build_calibration_set(CalibrationConfig(data=tuple(DEFAULT_CALIBRATION_DATA), samples=24, seq_len=128),
                                  tokenizer)
    bounded = plan_prune(model, calib, PruneConfig(keep=6, method="enumerate"))
    # score=True makes enumerate score from the cached sample (the path every run took before).
    cached = plan_prune(model, calib, PruneConfig(keep=6, method="enumerate", score=True, max_tokens=None))
    assert bounded.layers == cached.layers
    for idx, entry in cached.summary["layers"].items():
        assert math.isclose(bounded.summary["layers"][idx]["loss"], entry["loss"], rel_tol=1e-9)


class _ThreadWorld:
    """Two ranks as two threads: enough to check that observers merge to what one process sees."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size)
        self._slots: list[Any] = [None] * size

    def comm(self, rank: int) -> Any:
        world = self

        class Comm:
            def all_reduce_sum(self, tensor: torch.Tensor) -> None:
                gathered = self.all_gather(tensor.clone())
                tensor.copy_(sum(gathered[1:], gathered[0]))

            def all_gather(self, value: Any) -> list[Any]:
                world._barrier.wait()
                world._slots[rank] = value
                world._barrier.wait()
                out = list(world._slots)
                world._barrier.wait()
                return out

        return Comm()


def test_observers_merged_over_ranks_equal_one_process() -> None:
    model = tiny_model("mixtral")
    layer = find_moe_layers(model)[0]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2 * 8, layer.hidden_size, generator=gen) for _ in range(4)]  # 4 batches of 2 windows

    def make() -> list[Any]:
        return [RoutingStats(layer.num_experts), ExpertOutputs(max_tokens=20, fraction=0.8),
                SubsetLossAccumulator(enumerate_subsets(8, 6))]

    def feed(observers: list[Any], share: range) -> None:
        for b in share:
            for o in observers:
                if hasattr(o, "at_batch"):
                    o.at_batch(2 * b, 2)
                o.observe(layer, batches[b])

    single = make()
    feed(single, range(4))
    world = _ThreadWorld(2)
    ranks = [make(), make()]

    def run(rank: int) -> None:
        feed(ranks[rank], range(2 * rank, 2 * rank + 2))
        for o in ranks[rank]:
            o.sync(world.comm(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for merged in ranks:
        one, two = single[0].result(), merged[0].result()
        assert torch.equal(one.counts, two.counts) and torch.equal(one.topk_weights, two.topk_weights)
        assert torch.allclose(one.weight_sums, two.weight_sums, rtol=1e-12)
        assert torch.equal(single[1].result().outputs, merged[1].result().outputs)
        assert torch.allclose(single[2].losses(), merged[2].losses(), rtol=1e-12)


def test_device_and_dtype_flags(tmp_path: Path) -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ConfigError, match="--dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    calib = ["--samples", "4", "--seq-len", "32"]
    out32, out16 = tmp_path / "f32.json", tmp_path / "bf16.json"
    assert main(["plan", "skip", "demo", *calib, "--stream", "--device", "cpu", "--out", str(out32)]) == 0
    assert main(["plan", "skip", "demo", *calib, "--stream", "--dtype", "bfloat16", "--out", str(out16)]) == 0
    f32, bf16 = (json.loads(p.read_text()) for p in (out32, out16))
    for idx, entry in f32["layers"].items():  # bfloat16 weights route (almost) like float32 ones
        assert abs(bf16["layers"][idx]["beta"] - entry["beta"]) < 0.1
    assert main(["plan", "skip", "demo", *calib, "--dtype", "int4", "--out", str(tmp_path / "x.json")]) == 2


def test_torchrun_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    args = ["plan", "prune", "demo", "--keep", "6", "--stream", "--samples", "16", "--seq-len", "32"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main([*args, "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Own session: on a timeout the whole group (torchrun and its workers) is killed, no orphan stays behind.
    cli = str(Path(sys.executable).parent / "moeslim")  # CI runs pytest without the venv on PATH
    proc = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", cli,
                             *args, "--out", str(two)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-2000:]
    a, b = (json.loads(p.read_text()) for p in (one, two))
    assert a["layers"] == b["layers"]
    for idx, entry in a["summary"]["layers"].items():  # identical windows and order: only sums may round
        assert math.isclose(b["summary"]["layers"][idx]["loss"], entry["loss"], rel_tol=1e-12)
        assert b["summary"]["layers"][idx]["tokens"] == entry["tokens"] == 16 * 32


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_a_killed_plan_resumes_at_the_next_layer(tmp_path: Path) -> None:
    from moeslim.calibrate.resume import LayerCheckpoint
    from moeslim.plans import Plan

    class Killed(Exception):
        pass

    class KilledAfterLayer1(LayerCheckpoint):
        def save_layer(self, layer: int, results: dict[int, Any], outputs: list[torch.Tensor]) -> None:
            super().save_layer(layer, results, outputs)
            if layer == 1:
                raise Killed  # as if the process died right after layer 1 was committed

    _, folder = _checkpoint("deepseek_v3", tmp_path / "ds")  # layer 0 dense, 1-2 MoE
    model, _ = load_streamed(str(folder))
    ids = sample_ids(batch=4, seq=16)
    config = PruneConfig(keep=4, method="enumerate", mode="progressive")
    state = tmp_path / "state"
    with pytest.raises(Killed):
        plan_prune(model, ids, config, "m", batch_size=2, checkpoint=KilledAfterLayer1(state, "k"))
    assert json.loads((state / "progress.rank0.json").read_text())["last"] == 1
    resumed_state = LayerCheckpoint(state, "k")
    resumed = plan_prune(model, ids, config, "m", batch_size=2, checkpoint=resumed_state)
    assert resumed_state.resumed_from == 2
    fresh = LayerCheckpoint(tmp_path / "other", "k")
    again = plan_prune(model, ids, config, "m", batch_size=2, checkpoint=fresh)
    assert fresh.resumed_from is None

    def text(plan: Plan) -> str:
        return json.dumps(_without_timings(plan.to_dict()), indent=1)

    assert text(resumed) == text(again)  # byte-identical but for the wall-clock timings
    resumed_state.finish()
    assert not state.exists()
    # Another run's state (a different key) is not reused.
    other = LayerCheckpoint(tmp_path / "other", "different")
    plan_prune(model, ids, config, "m", batch_size=2, checkpoint=other)
    assert other.resumed_from is None


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_streamed_apply_writes_the_same_checkpoint(family: str, tmp_path: Path) -> None:
    from moeslim.appliers import apply
    from moeslim.io import load, save
    from moeslim.methods.skip import SkipConfig, plan_skip

    model, folder = _checkpoint(family, tmp_path / "src")
    ids = sample_ids(batch=2, seq=8)
    prune = plan_prune(model, ids, PruneConfig(keep=4, method="frequency"), "m")
    plan_path = tmp_path / "prune.json"
    prune.save(plan_path)
    reference, _ = load(str(folder))
    apply(reference, prune)
    skip = plan_skip(reference, ids, SkipConfig(), "m")
    skip_path = tmp_path / "skip.json"
    skip.save(skip_path)
    apply(reference, skip)
    save(reference, tmp_path / "ref")
    out = tmp_path / "streamed"
    assert main(["apply", str(folder), str(plan_path), str(skip_path), "--stream", "--out", str(out)]) == 0
    assert len(list(out.glob("*.safetensors"))) == len(decoder_layers(model)) + 1  # one shard per layer
    a, _ = load(str(tmp_path / "ref"))
    b, _ = load(str(out))
    assert a.config.moeslim == b.config.moeslim
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    # A quantize plan streams on its own (tests/test_scale_quant.py); mixed with others it is refused.
    from moeslim.methods.quant.driver import QuantizeConfig, plan_quantize

    quantize_path = tmp_path / "q.json"
    plan_quantize(model, None, QuantizeConfig(method="uniform", bits=4, quantizer="rtn"), "m").save(quantize_path)
    both = [str(plan_path), str(quantize_path)]
    assert main(["apply", str(folder), *both, "--stream", "--out", str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q").exists()
    assert main(["apply", str(folder), str(quantize_path), "--stream", "--out", str(tmp_path / "q")]) == 0
    assert main(["apply", str(folder), str(plan_path), "--resume", "--out", str(tmp_path / "r")]) == 2


def test_device_map_is_validated_and_passes_through_to_accelerate(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from moeslim.devices import resolve_device_map

    assert resolve_device_map(None) is None
    assert resolve_device_map("balanced") == "balanced"
    assert resolve_device_map('{"": "cpu"}') == {"": "cpu"}
    for bad in ("everywhere", '{"": "tpu"}', "{nope", '{"": true}', "{}"):
        with pytest.raises(ConfigError, match="--device"):
            resolve_device_map(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="GPU 0"):
            resolve_device_map('{"model.layers": 0}')
    with monkeypatch.context() as patch:
        real = importlib.util.find_spec
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
        with pytest.raises(ConfigError, match="accelerate"):
            resolve_device_map("auto")

    # A whole-model map goes through transformers' device_map loading: same plan, same checkpoint.
    calib = ["--samples", "4", "--seq-len", "32"]
    placed = ["--device-map", '{"": "cpu"}']
    plans = [tmp_path / "plain.json", tmp_path / "mapped.json"]
    assert main(["plan", "prune", "demo", "--keep", "6", "--method", "frequency", *calib, "--out", str(plans[0])]) == 0
    assert main(["plan", "prune", "demo", "--keep", "6", "--method", "frequency", *calib, *placed,
                 "--out", str(plans[1])]) == 0
    a, b = (json.loads(p.read_text()) for p in plans)
    assert a["layers"] == b["layers"]
    assert main(["apply", "demo", str(plans[0]), "--out", str(tmp_path / "p")]) == 0
    assert main(["apply", "demo", str(plans[0]), *placed, "--out", str(tmp_path / "m")]) == 0
    from moeslim.io import load

    pa, _ = load(str(tmp_path / "p"))
    pb, _ = load(str(tmp_path / "m"))
    sa, sb = pa.state_dict(), pb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # Refused: with --stream, an unknown value, or a checkpoint moeslim's runtime loads itself.
    assert main(["plan", "skip", "demo", *calib, "--stream", "--device-map", "auto", "--out", str(tmp_path / "x")]) == 2
    assert main(["apply", "demo", str(plans[0]), "--device-map", "nowhere", "--out", str(tmp_path / "y")]) == 2
    from moeslim.methods.skip import SkipConfig, plan_skip

    skip = plan_skip(pa, sample_ids(batch=2, seq=8), SkipConfig(), "m")
    skip.save(tmp_path / "skip.json")
    assert main(["apply", str(tmp_path / "p"), str(tmp_path / "skip.json"), "--out", str(tmp_path / "s")]) == 0
    assert main(["eval", str(tmp_path / "s"), *placed, "--tasks", "none", "--out", str(tmp_path / "e.json")]) == 2


def test_a_command_leaves_the_process_group_it_joined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI destroys torchrun's process group before returning (gloo's threads left to interpreter teardown
    can abort a finished run), and only when one was joined: here a group of one joined as torchrun would."""
    import torch.distributed as dist

    from moeslim.calibrate.distributed import init_from_env

    for name, value in {"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert init_from_env(torch.device("cpu")).size == 1 and dist.is_initialized()
    out = tmp_path / "plan.json"
    assert main(["plan", "prune", "demo", "--keep", "6", "--samples", "2", "--seq-len", "16", "--out", str(out)]) == 0
    assert out.exists() and not dist.is_initialized()
