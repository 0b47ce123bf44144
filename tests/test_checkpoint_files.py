"""Saved checkpoints as users expect them: every file with the usual permissions, tied weights stored once."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import sample_ids, tiny_config
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.appliers.prune import apply_prune
from moeslim.methods.prune import PruneConfig, plan_prune
from moeslim.runtime.checkpoint_files import read_tensors, saved_tokenizer, tensors_written_once, write_tensors

IDS = sample_ids(seed=3, batch=4, seq=16)


@pytest.fixture
def umask_027() -> Iterator[int]:
    """A umask other than the usual 022, so a test can tell "follows the umask" from "always 0644"."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _tied_pruned_model() -> torch.nn.Module:
    """A tiny Mixtral whose config ties ``lm_head`` to the embedding, pruned 8 -> 6 experts."""
    config = tiny_config("mixtral")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    apply_prune(model, plan_prune(model, IDS, PruneConfig(method="frequency", keep=6), progress=False))
    return model


def _payload_bytes(file: Path) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the JSON header."""
    with file.open("rb") as handle:
        (header,) = struct.unpack("<Q", handle.read(8))
    return file.stat().st_size - 8 - header


def _distinct_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the model's distinct tensors (tied ones counted once) stored in ``dtype``."""
    seen: dict[tuple[int, int, tuple[int, ...]], int] = {}
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        size = dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
        seen[key] = tensor.numel() * size
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_tied_embeddings_are_stored_once(dtype: torch.dtype | None, tmp_path: Path) -> None:
    model = _tied_pruned_model()
    out = moeslim.save(model, tmp_path / "pruned", dtype=dtype)
    files = sorted(out.glob("*.safetensors"))
    assert [f.name for f in files] == ["model.safetensors"]
    stored = dtype or torch.float32
    assert _payload_bytes(files[0]) == _distinct_bytes(model, stored)

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        for param in model.parameters():  # what the file holds (buffers such as inv_freq are not stored)
            param.copy_(param.to(stored).float())
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_every_saved_file_follows_the_umask(dtype: torch.dtype | None, umask_027: int, tmp_path: Path) -> None:
    out = moeslim.save(_tied_pruned_model(), tmp_path / "pruned", dtype=dtype)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert "model.safetensors" in modes and "config.json" in modes
    assert modes == {name: (0o777 if (out / name).is_dir() else 0o666) & ~umask_027 for name in modes}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask_027


def test_cli_apply_writes_weights_readable_like_the_rest(tiny_model_dir: Path, prune_plan: Path,
                                                         tmp_path: Path) -> None:
    from moeslim.cli import main

    out = tmp_path / "pruned"
    assert main(["apply", str(tiny_model_dir), str(prune_plan), "--out", str(out)]) == 0
    expected = 0o666 & ~_current_umask()
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {expected}, modes
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- the writer and reader of moeslim's own forms (compact, low-bit, low-rank) ----------------------------------

def _shared_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    embed = torch.randn(6, 4)
    fused = torch.randn(2, 3, 4)  # two rows of one storage: same shape, other offsets
    return {"embed.weight": embed, "lm_head.weight": embed, "first": fused[0], "second": fused[1],
            "steps": torch.arange(3)}


def test_tied_tensors_are_written_once_and_views_are_not_taken_for_ties() -> None:
    tensors, aliases = tensors_written_once(_shared_state())
    assert aliases == {"lm_head.weight": "embed.weight"}
    assert sorted(tensors) == ["embed.weight", "first", "second", "steps"]


def test_round_trip_in_a_storage_dtype(tmp_path: Path) -> None:
    state = _shared_state()
    file = tmp_path / "t.safetensors"
    write_tensors(state, file, torch.bfloat16)
    with safe_open(str(file), framework="pt") as handle:
        assert sorted(handle.keys()) == ["embed.weight", "first", "second", "steps"]  # noqa: SIM118
    back, aliases = read_tensors(file)
    assert aliases == {"lm_head.weight": "embed.weight"}
    assert sorted(back) == sorted(state)
    for name, tensor in state.items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert back[name].dtype == expected.dtype
        assert torch.equal(back[name], expected), name
    assert back["lm_head.weight"] is back["embed.weight"]


def test_no_tokenizer_files_no_tokenizer(tmp_path: Path) -> None:
    assert saved_tokenizer(tmp_path) is None
