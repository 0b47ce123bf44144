"""compressed-tensors export (moeslim.export.compressed_tensors): GPTQ experts in the pack-quantized layout.

The symmetric folders load through stock transformers + compressed-tensors (``from_pretrained``) with logits
equal to moeslim's quantized model; the asymmetric layout is checked with compressed-tensors' own
decompressor, expert by expert, against moeslim's dequantized weights (bit-exact).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_export_gguf import export_model
from tiny_models import sample_ids
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.export import UnsupportedExportError, export_compressed_tensors
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.driver import plan_quantize
from moeslim.models import select_experts
from moeslim.runtime.lowbit_io import lowbit_tensors

IDS = sample_ids(0, 4, 16)


def quantized(family: str, bits: int, method: str = "uniform", group: int = 16) -> torch.nn.Module:
    model = export_model(family, 128)
    config = QuantizeConfig(method=method, bits=bits, group_size=group, **({"candidates": (2, 3)} if
                                                                           method == "pmq" else {}))
    moeslim.apply(model, plan_quantize(model, IDS, config), calibration=IDS)
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(("family", "bits", "stored"), [("qwen3_moe", 3, 4), ("mixtral", 3, 4), ("qwen3_moe", 4, 5)])
def test_symmetric_folder_loads_in_transformers_with_equal_logits(family: str, bits: int, stored: int,
                                                                  tmp_path: Path) -> None:
    model = quantized(family, bits)
    out = export_compressed_tensors(model, None, tmp_path / "ct")
    assert (out.bits, out.stored_bits, out.symmetric) == (bits, stored, True)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    assert (weights["num_bits"], weights["symmetric"], weights["strategy"], weights["group_size"]) == (
        stored, True, "group", 16)
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    packed = [k for k in tensors if k.endswith(".weight_packed")]
    assert len(packed) == out.quantized_tensors == model.config.num_hidden_layers * 8 * 3
    assert tensors[packed[0]].dtype == torch.int32 and not any("zero_point" in k for k in tensors)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-5)
    # the loaded experts are moeslim's dequantized experts, exactly
    for name, t in lowbit_tensors(model).items():
        assert torch.equal(loaded.get_parameter(name), t.dequantize())


def test_asymmetric_layout_decompresses_to_moeslims_weights(tmp_path: Path) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = quantized("qwen3_moe", 4)
    out = export_compressed_tensors(model, None, tmp_path / "ct", scheme="asymmetric")
    assert (out.stored_bits, out.symmetric) == (4, False)
    config = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())[
        "quantization_config"])
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config.format)
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    fused = lowbit_tensors(model)
    for layer in range(model.config.num_hidden_layers):
        gate_up = fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"].dequantize()
        down = fused[f"model.layers.{layer}.mlp.experts.down_proj"].dequantize()
        half = gate_up.shape[1] // 2
        for e in range(8):
            for proj, want in (("gate_proj", gate_up[e, :half]), ("up_proj", gate_up[e, half:]),
                               ("down_proj", down[e])):
                prefix = f"model.layers.{layer}.mlp.experts.{e}.{proj}."
                local = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
                assert "weight_zero_point" in local
                assert torch.equal(compressor.decompress(local, scheme)["weight"], want)


def test_pruned_model_is_a_plain_checkpoint(tmp_path: Path) -> None:
    model = export_model("mixtral", 128)
    select_experts(model, {i: [1, 3, 4, 6] for i in range(model.config.num_hidden_layers)})
    out = export_compressed_tensors(model, None, tmp_path / "ct")
    assert out.bits is None and out.quantized_tensors == 0
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert "quantization_config" not in config and config["num_local_experts"] == 4
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-6)


def test_export_ct_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedExportError, match="one width per MoE layer"):
        export_compressed_tensors(quantized("qwen3_moe", 2.5, method="pmq"), None, tmp_path / "a")
    with pytest.raises(UnsupportedExportError, match="9 signed bits"):
        export_compressed_tensors(quantized("qwen3_moe", 8), None, tmp_path / "b")
    with pytest.raises(UnsupportedExportError, match="group size 24 must divide"):
        export_compressed_tensors(quantized("qwen3_moe", 4, group=24), None, tmp_path / "c")
    with pytest.raises(UnsupportedExportError, match="scheme="):
        export_compressed_tensors(quantized("qwen3_moe", 4), None, tmp_path / "d", scheme="other")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_cli_export_ct_applies_a_uniform_plan(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from moeslim.cli import main

    plan = tmp_path / "u3.json"
    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    assert main(["plan", "quantize", str(tiny_model_dir), "--method", "uniform", "--bits", "3", "--group-size",
                 "16", *calib, "--out", str(plan)]) == 0
    out = tmp_path / "ct"
    assert main(["export", str(tiny_model_dir), "--format", "compressed-tensors", "--plan", str(plan),
                 "--out", str(out)]) == 0
    assert "4-bit symmetric" in " ".join(capsys.readouterr().out.split())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # loads
    assert (out / "tokenizer.json").is_file()
    assert main(["export", str(tiny_model_dir), "--format", "compressed-tensors", "--plan", str(plan),
                 "--out", str(out)]) == 2  # exists: needs --overwrite
    assert "overwrite" in capsys.readouterr().err
