"""``moeslim export --stream`` (moeslim.export.streamed): a checkpoint folder exported one decoder layer at a time
gives what the in-memory export of ``moeslim.load(folder)`` gives: the same GGUF bytes, the same compressed-tensors
tensors and config. Peak memory is measured by benchmarks/scale.py, not here."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from test_export_gguf import _runnable_model, export_model
from tiny_models import sample_ids
from tiny_tokenizers import byte_level_bpe

import moeslim
from moeslim.export import export_gguf, read_gguf_types
from moeslim.export.streamed import StreamingExportError, export_gguf_streamed
from moeslim.io import load, save
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.driver import plan_quantize
from moeslim.models import resolve_model_path, select_experts

IDS = sample_ids(0, 4, 16)


@pytest.fixture(scope="module")
def tokenizer():
    """A 400-token byte-level BPE: the files' vocabulary stays small (the demo model's is tested on its own)."""
    return byte_level_bpe()


def _folder(model: torch.nn.Module, tokenizer, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """``model`` saved as a several-shard checkpoint (layers span files), with the demo tokenizer."""
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size="60KB")
    tokenizer.save_pretrained(folder)
    return folder


def _in_memory_gguf(folder: Path, out: Path, **options) -> Path:
    model, tok = load(str(folder))
    export_gguf(model, tok, out, **options)
    return out


@pytest.mark.parametrize(("family", "dtype"), [("mixtral", None), ("qwen3_moe", torch.bfloat16),
                                               ("deepseek_v3", None), ("gpt_oss", None)])
def test_streamed_gguf_is_the_in_memory_file(family: str, dtype, tokenizer, tmp_path: Path) -> None:
    folder = _folder(_runnable_model(family, len(tokenizer)), tokenizer, tmp_path / "src", dtype)
    assert len(list(folder.glob("*.safetensors"))) > 1
    ref = _in_memory_gguf(folder, tmp_path / "ref.gguf", qtype="Q8_0")
    got = export_gguf_streamed(str(folder), tmp_path / "got.gguf", qtype="Q8_0")
    assert got.path.read_bytes() == ref.read_bytes()
    assert got.expert_count == 8 and got.tensor_types == read_gguf_types(ref)
    assert {"Q8_0", "F32"} <= set(got.tensor_types.values())


def test_streamed_gguf_of_the_demo_model(tmp_path: Path) -> None:
    ref = _in_memory_gguf(Path(resolve_model_path("demo")), tmp_path / "ref.gguf", qtype="F16")
    got = export_gguf_streamed("demo", tmp_path / "got.gguf", qtype="F16")
    assert got.path.read_bytes() == ref.read_bytes()


def test_streamed_gguf_of_a_pruned_and_of_a_quantized_checkpoint(tokenizer, tmp_path: Path) -> None:
    model = export_model("mixtral", len(tokenizer))
    select_experts(model, {i: [0, 2, 5, 7] for i in range(model.config.num_hidden_layers)})
    pruned = _folder(model, tokenizer, tmp_path / "pruned")
    ref = _in_memory_gguf(pruned, tmp_path / "pruned-ref.gguf", qtype="F16")
    got = export_gguf_streamed(str(pruned), tmp_path / "pruned.gguf", qtype="F16")
    assert got.expert_count == 4 and got.path.read_bytes() == ref.read_bytes()

    model = export_model("qwen3_moe", len(tokenizer))
    moeslim.apply(model, plan_quantize(model, IDS, QuantizeConfig(method="uniform", bits=3, group_size=16,
                                                                  quantizer="rtn")), calibration=IDS)
    quantized = save(model, tmp_path / "quantized", tokenizer=tokenizer)
    ref = _in_memory_gguf(quantized, tmp_path / "q-ref.gguf", qtype="F32")
    got = export_gguf_streamed(str(quantized), tmp_path / "q.gguf", qtype="F32")
    assert got.path.read_bytes() == ref.read_bytes()


def test_streamed_gguf_with_a_gguf_scope_plan(tokenizer, tmp_path: Path) -> None:
    model = _runnable_model("qwen3_moe", len(tokenizer))
    plan = plan_quantize(model, IDS, QuantizeConfig(scope="gguf", bits=6.0, candidates=(2, 4, 8)))
    folder = _folder(model, tokenizer, tmp_path / "src")
    ref = _in_memory_gguf(folder, tmp_path / "ref.gguf", qtype="Q8_0", plan=plan)
    got = export_gguf_streamed(str(folder), tmp_path / "got.gguf", qtype="Q8_0", plan=plan)
    assert got.path.read_bytes() == ref.read_bytes()
    assert len(set(got.tensor_types.values())) > 2  # the plan's mix, not one type


def _recording_quantizer(folder: Path) -> Path:
    """A stand-in for llama-quantize that keeps the file it is given (and writes it as its output)."""
    script = folder / "llama-quantize"
    script.write_text('#!/bin/sh\neval src=\\${$(($# - 2))} dst=\\${$(($# - 1))}\n'
                      f'cp "$src" "{folder}/intermediate.gguf"\ncp "$src" "$dst"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_llama_quantize_gets_a_bf16_intermediate_of_a_bf16_checkpoint(tokenizer, tmp_path: Path) -> None:
    model = _runnable_model("mixtral", len(tokenizer))
    folder = _folder(model, tokenizer, tmp_path / "src", torch.bfloat16)
    quantizer = _recording_quantizer(tmp_path)
    export_gguf_streamed(str(folder), tmp_path / "q.gguf", qtype="Q4_K_M", llama_quantize=quantizer)
    types = read_gguf_types(tmp_path / "intermediate.gguf")
    assert types["blk.0.ffn_down_exps.weight"] == types["token_embd.weight"] == "BF16"
    assert types["blk.0.ffn_gate_inp.weight"] == types["output_norm.weight"] == "F32"  # as llama.cpp keeps them
    assert "F16" not in types.values()
    # exact: the same values as the F32 file of the in-memory export
    f32 = _in_memory_gguf(folder, tmp_path / "f32.gguf", qtype="F32")
    from gguf.quants import dequantize

    full = {t.name: t for t in GGUFReader(str(f32)).tensors}
    for t in GGUFReader(str(tmp_path / "intermediate.gguf")).tensors:
        assert (dequantize(t.data, t.tensor_type) == dequantize(full[t.name].data, full[t.name].tensor_type)).all()


def test_stream_refuses_what_it_cannot_read(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(StreamingExportError, match="local checkpoint folder"):
        export_gguf_streamed("no/such/folder", tmp_path / "x.gguf")
    folder = _folder(export_model("mixtral", len(tokenizer)), tokenizer, tmp_path / "skip")
    raw = json.loads((folder / "config.json").read_text())
    raw["moeslim"] = {"skip": {"threshold": 0.1}}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(StreamingExportError, match="skipping: export it without --stream"):
        export_gguf_streamed(str(folder), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def _ct_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _same_ct(a: Path, b: Path) -> None:
    ta, tb = _ct_tensors(a), _ct_tensors(b)
    assert ta.keys() == tb.keys()
    for key, tensor in ta.items():
        assert tensor.dtype == tb[key].dtype and torch.equal(tensor, tb[key]), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert (a / "generation_config.json").read_text() == (b / "generation_config.json").read_text()


@pytest.mark.parametrize(("family", "config", "scheme"), [
    ("mixtral", QuantizeConfig(method="uniform", bits=3, group_size=16, quantizer="rtn"), "symmetric"),
    ("qwen3_moe", QuantizeConfig(method="uniform", bits=4, group_size=16, symmetric=True), "symmetric"),
    ("qwen3_moe", QuantizeConfig(method="uniform", bits=4, group_size=16, quantizer="rtn"), "asymmetric"),
])
def test_streamed_compressed_tensors_is_the_in_memory_checkpoint(family: str, config: QuantizeConfig, scheme: str,
                                                                 tokenizer, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from moeslim.export import export_compressed_tensors
    from moeslim.export.streamed import export_compressed_tensors_streamed

    model = export_model(family, len(tokenizer))
    moeslim.apply(model, plan_quantize(model, IDS, config), calibration=IDS)
    folder = save(model, tmp_path / "quantized", tokenizer=tokenizer)
    loaded, tok = load(str(folder))
    ref = export_compressed_tensors(loaded, tok, tmp_path / "ref", scheme=scheme)
    got = export_compressed_tensors_streamed(str(folder), tmp_path / "got", scheme=scheme)
    assert got == dataclasses.replace(ref, path=got.path)
    assert got.quantized_tensors == model.config.num_hidden_layers * 8 * 3
    _same_ct(tmp_path / "ref", tmp_path / "got")
    assert (tmp_path / "got" / "tokenizer.json").is_file()
    if scheme == "symmetric":  # loads in stock transformers with moeslim's logits
        ct = AutoModelForCausalLM.from_pretrained(tmp_path / "got", dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(ct(IDS).logits, loaded(IDS).logits, rtol=0, atol=1e-5)


def test_streamed_compressed_tensors_of_a_pruned_checkpoint_and_refusals(tokenizer, tmp_path: Path) -> None:
    from moeslim.export import UnsupportedExportError, export_compressed_tensors
    from moeslim.export.streamed import export_compressed_tensors_streamed

    model = export_model("mixtral", len(tokenizer))
    select_experts(model, {i: [1, 3, 4, 6] for i in range(model.config.num_hidden_layers)})
    folder = _folder(model, tokenizer, tmp_path / "pruned")
    loaded, tok = load(str(folder))
    export_compressed_tensors(loaded, tok, tmp_path / "ref")
    got = export_compressed_tensors_streamed(str(folder), tmp_path / "got")
    assert got.bits is None and got.quantized_tensors == 0
    _same_ct(tmp_path / "ref", tmp_path / "got")

    model = export_model("qwen3_moe", len(tokenizer))
    moeslim.apply(model, plan_quantize(model, IDS, QuantizeConfig(method="pmq", bits=2.5, candidates=(2, 3),
                                                                  group_size=16)), calibration=IDS)
    mixed = save(model, tmp_path / "mixed", tokenizer=tokenizer)
    with pytest.raises(UnsupportedExportError, match="per-expert widths.*--granularity layer --scope global"):
        export_compressed_tensors_streamed(str(mixed), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_streamed_compressed_tensors_with_one_width_per_layer(scheme: str, tokenizer, tmp_path: Path) -> None:
    """PMQ ``--granularity layer`` checkpoints: the config groups (one per width, a 16-bit layer in none) and the
    tensors are the in-memory export's, the config written after the layers were streamed."""
    from moeslim.export import export_compressed_tensors
    from moeslim.export.streamed import export_compressed_tensors_streamed
    from moeslim.plans import Plan

    model = export_model("qwen3_moe", len(tokenizer))
    base = plan_quantize(model, IDS, QuantizeConfig(method="uniform", bits=4, group_size=16, quantizer="rtn"))
    n_layers = model.config.num_hidden_layers
    assert n_layers >= 3
    widths = {i: (3, 2, 16)[i % 3] for i in range(n_layers)}
    plan = Plan("quantize", {i: {"bits": [widths[i]] * 8} for i in range(n_layers)}, base.provenance, base.summary)
    moeslim.apply(model, plan, calibration=IDS)
    folder = save(model, tmp_path / "quantized", tokenizer=tokenizer)
    loaded, tok = load(str(folder))
    ref = export_compressed_tensors(loaded, tok, tmp_path / "ref", scheme=scheme)
    got = export_compressed_tensors_streamed(str(folder), tmp_path / "got", scheme=scheme)
    assert got == dataclasses.replace(ref, path=got.path)
    extra = 1 if scheme == "symmetric" else 0  # asymmetric GPTQ grids stored one bit wider, signed
    quantized = {i: (b, b + extra) for i, b in widths.items() if b != 16}
    assert got.bits is None and got.layers == quantized
    assert got.quantized_tensors == len(quantized) * 8 * 3
    assert "one width per layer" in got.describe()
    _same_ct(tmp_path / "ref", tmp_path / "got")
    groups = json.loads((tmp_path / "got" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["weights"]["num_bits"] for g in groups.values()] == sorted({s for _, s in quantized.values()})


def test_cli_export_stream_writes_what_export_writes(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from moeslim.cli import main

    base = ["export", str(tiny_model_dir), "--format"]
    assert main([*base, "gguf", "--type", "Q8_0", "--out", str(tmp_path / "a.gguf")]) == 0
    assert main([*base, "gguf", "--type", "Q8_0", "--stream", "--out", str(tmp_path / "b.gguf")]) == 0
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    plan = tmp_path / "u3.json"
    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    assert main(["plan", "quantize", str(tiny_model_dir), "--method", "uniform", "--bits", "3", "--group-size",
                 "16", *calib, "--out", str(plan)]) == 0
    capsys.readouterr()
    ct = [*base, "compressed-tensors", "--plan", str(plan)]
    assert main([*ct, "--out", str(tmp_path / "ct")]) == 0
    assert main([*ct, "--stream", "--out", str(tmp_path / "ct-stream")]) == 0  # GPTQ applied streamed, then exported
    assert "4-bit symmetric" in " ".join(capsys.readouterr().out.split())
    _same_ct(tmp_path / "ct", tmp_path / "ct-stream")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    assert main([*ct, "--stream", "--out", str(tmp_path / "ct-stream")]) == 2  # exists: before any GPTQ work
    assert "overwrite" in capsys.readouterr().err


def test_at_most_one_decoder_layer_is_resident_while_streaming(tokenizer, tmp_path: Path) -> None:
    from moeslim.export.streamed import open_checkpoint
    from moeslim.models import decoder_layers

    folder = _folder(_runnable_model("deepseek_v3", len(tokenizer)), tokenizer, tmp_path / "src")
    checkpoint = open_checkpoint(str(folder))
    layers = decoder_layers(checkpoint.model)
    seen = []
    for _ in checkpoint.tensors():
        resident = [i for i, layer in enumerate(layers) if any(not p.is_meta for p in layer.parameters())]
        assert len(resident) <= 1
        seen.extend(resident)
    assert sorted(set(seen)) == list(range(len(layers)))  # every layer was read, in turn
    assert all(p.is_meta for p in layers.parameters())  # and freed
