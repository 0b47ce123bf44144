"""Save and load models with packed low-bit experts (per-expert widths, PMQ).

Layout of a saved checkpoint (``save_quantized``):

- ``config.json``: the model config with its ``moeslim.quantize`` section (widths, group size, averages);
- ``moeslim_base.safetensors``: every other tensor of the state dict under the model's own names (tied
  aliases written once, listed in the file metadata);
- ``moeslim_lowbit.safetensors``: each quantized parameter ``{name}`` as ``LowBitTensor.to_state_dict``
  tensors ``{name}.qmeta``, ``.qbits``, ``.qcodes.{e}`` (bit-packed codes), ``.qscales.{e}`` (float16 group
  scales), ``.qzeros.{e}`` (bit-packed zero points), ``.qdense.{e}`` (experts kept at 16 bits).
  Its payload is exactly the bits that ``bits_accounting`` reports (plus a few int64 metadata tensors), so
  bytes on disk match the accounting.

Neither file is named ``model.safetensors`` on purpose: stock ``from_pretrained`` would otherwise load a
model with randomly initialised experts and only a warning. ``load_quantized`` (used by ``moeslim.load``)
builds the model from its config, loads the base tensors, dequantizes the experts once and re-attaches
the packed tensors as ``moeslim_lowbit`` (so the model can be saved again without re-quantizing).

Stock transformers integrations that were checked for loading such a checkpoint (transformers 5.23):
- bitsandbytes, HQQ, quanto, AWQ, GPTQ (gptqmodel), EETQ, AQLM, VPTQ, SpQR, HIGGS, BitNet: they replace
  ``nn.Linear`` modules; fused 3D expert tensors (``gate_up_proj [E, 2I, H]``) are not Linear modules, so
  they are not covered.
- MXFP4 / FP8 / NVFP4 have fused-experts support but are fixed float formats (not 1-3-bit integers with
  groups of 128), and MXFP4 is gpt-oss specific.
- compressed-tensors is the only one that dequantizes fused experts at load (``CompressedTensorsDequantize``),
  from per-expert ``weight_packed`` / ``weight_scale`` / ``weight_shape`` tensors. Its experts path reads no
  ``weight_zero_point``, i.e. it is symmetric, while GPTQ/MC-MoE (and this module) use asymmetric min-max
  groups with zero points; exporting would re-quantize (changing the weights), needs the
  ``compressed-tensors`` package (not a moeslim dependency, not installed here), and it supports one width
  per scheme, not one per expert. So no stock integration is implemented; a future export could target it
  for symmetric uniform-width results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moeslim.methods.quant.fused import LowBitTensor

__all__ = [
    "BASE_FILE",
    "LOWBIT_ATTR",
    "LOWBIT_FILE",
    "load_quantized",
    "lowbit_tensors",
    "quantized_nbytes",
    "save_quantized",
]

LOWBIT_ATTR = "moeslim_lowbit"  # module attribute: {parameter name: LowBitTensor}
BASE_FILE = "moeslim_base.safetensors"
LOWBIT_FILE = "moeslim_lowbit.safetensors"
_META_SUFFIX = ".qmeta"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def install_lowbit(module: nn.Module, name: str, packed: LowBitTensor) -> None:
    """Keep ``packed`` as the storage of parameter ``name`` and compute with its dequantized values."""
    param = getattr(module, name)
    with torch.no_grad():
        param.copy_(packed.dequantize().reshape(param.shape).to(param.dtype))
    store = dict(getattr(module, LOWBIT_ATTR, None) or {})
    store[name] = packed
    object.__setattr__(module, LOWBIT_ATTR, store)


def lowbit_tensors(model: nn.Module) -> dict[str, LowBitTensor]:
    """{qualified parameter name: LowBitTensor} of every quantized parameter of ``model``."""
    found: dict[str, LowBitTensor] = {}
    for module_name, module in model.named_modules():
        for param_name, packed in (getattr(module, LOWBIT_ATTR, None) or {}).items():
            found[f"{module_name}.{param_name}" if module_name else param_name] = packed
    return found


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes of the packed low-bit storage (codes, scales, zeros, kept 16-bit slices) of ``model``."""
    return sum(packed.nbytes() for packed in lowbit_tensors(model).values())


def _base_tensors(model: nn.Module, skip: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without ``skip``; tensors sharing storage (tied weights) are written once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors, aliases


def save_quantized(model: nn.Module, out_dir: str | Path) -> None:
    """Write config.json, the base tensors and the packed low-bit tensors into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    packed = lowbit_tensors(model)
    if not packed:
        raise ValueError("model has no low-bit parameters: apply a quantize plan before save_quantized")
    lowbit: dict[str, torch.Tensor] = {}
    for name, tensor in packed.items():
        lowbit.update({k: v.cpu() for k, v in tensor.to_state_dict(name).items()})
    base, aliases = _base_tensors(model, set(packed))
    save_file(base, str(out / BASE_FILE), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    save_file(lowbit, str(out / LOWBIT_FILE), metadata={"format": "moeslim-lowbit"})
    model.config.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                   ) -> tuple[nn.Module, Any]:
    """(model with dequantized experts and ``moeslim_lowbit`` re-attached, tokenizer or None)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(path)
    for name in (BASE_FILE, LOWBIT_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root} is not a moeslim quantized checkpoint: {name} is missing")
    config = AutoConfig.from_pretrained(root)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base, meta = _read(root / BASE_FILE)
    lowbit, _ = _read(root / LOWBIT_FILE)
    prefixes = [k[: -len(_META_SUFFIX)] for k in lowbit if k.endswith(_META_SUFFIX)]
    missing, unexpected = model.load_state_dict(base, strict=False)
    aliases: dict[str, str] = json.loads(meta.get("aliases", "{}"))
    state = model.state_dict()
    for alias, source in aliases.items():
        if state[alias].data_ptr() != state[source].data_ptr():  # not tied in the rebuilt model
            with torch.no_grad():
                state[alias].copy_(base[source])
    left = set(missing) - set(prefixes) - set(aliases)
    if left or unexpected:
        raise ValueError(f"{root}: tensors missing {sorted(left)} / unexpected {sorted(unexpected)}")
    for prefix in prefixes:
        packed = LowBitTensor.from_state_dict(lowbit, prefix)
        module_name, _, param_name = prefix.rpartition(".")
        install_lowbit(model.get_submodule(module_name), param_name, packed)
    model = model.to(device).eval()
    return model, _tokenizer(root)


def _tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    # Without tokenizer files some model types build an empty tokenizer from config.json alone.
    if not any((root / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(root)
    except (OSError, ValueError, KeyError, TypeError):
        return None
