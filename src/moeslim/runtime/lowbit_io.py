"""Save and load models with packed low-bit experts (per-expert widths, PMQ).

Layout of a saved checkpoint (``save_quantized``):

- ``config.json``: the model config with its ``moeslim.quantize`` section (widths, group size, averages);
- ``moeslim_base.safetensors``: every other tensor of the state dict under the model's own names (tied
  aliases written once, listed in the file metadata);
- ``moeslim_lowbit.safetensors``: each quantized parameter ``{name}`` as ``LowBitTensor.to_state_dict``
  tensors ``{name}.qmeta``, ``.qbits``, ``.qcodes.{e}`` (bit-packed codes), ``.qscales.{e}`` (float16 group
  scales), ``.qzeros.{e}`` (bit-packed zero points; none in a symmetric tensor, whose qmeta says so),
  ``.qdense.{e}`` (experts kept at 16 bits).
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
  groups with zero points, and it supports one width per scheme, not one per expert. So mixed-width
  checkpoints keep this module's own format; ``moeslim export --format compressed-tensors``
  (``moeslim.export.compressed_tensors``) writes uniform-width results for it, storing the asymmetric codes
  exactly as symmetric codes one bit wider.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moeslim.methods.quant.fused import LowBitTensor
from moeslim.runtime.checkpoint_files import (
    materialize_buffers,
    read_tensors,
    saved_tokenizer,
    write_config,
    write_tensors,
)
from moeslim.runtime.lowbit_forward import STORE, install_packed, packed_storage
from moeslim.runtime.nonuniform import cut_compact
from moeslim.runtime.packed import PackedExperts
from moeslim.runtime.packed_rows import PackedRows, install_rows, packed_rows

__all__ = [
    "BASE_FILE",
    "LOWBIT_ATTR",
    "LOWBIT_FILE",
    "load_quantized",
    "lowbit_tensors",
    "packed_experts",
    "quantized_nbytes",
    "rows_names",
    "save_quantized",
]

LOWBIT_ATTR = STORE  # child module of each quantized module: {parameter name: PackedExperts}
BASE_FILE = "moeslim_base.safetensors"
LOWBIT_FILE = "moeslim_lowbit.safetensors"
_META_SUFFIX = ".qmeta"


def install_lowbit(module: nn.Module, name: str, packed: LowBitTensor) -> None:
    """Replace float parameter ``name`` of ``module`` by the packed storage of ``packed`` and compute from it.

    The float parameter is removed (a meta placeholder of the same shape stays, holding no bytes); the module
    computes through the ``moeslim_lowbit`` experts forward (or ``LowBitLinear`` for an nn.Linear), see
    runtime/lowbit_forward.py.
    """
    install_packed(module, name, packed)


def packed_experts(model: nn.Module) -> dict[str, PackedExperts]:
    """{qualified parameter name: PackedExperts} of every packed parameter of ``model``."""
    found: dict[str, PackedExperts] = {}
    for module_name, module in model.named_modules():
        for param_name, storage in packed_storage(module).items():
            found[f"{module_name}.{param_name}" if module_name else param_name] = storage
    return found


def lowbit_tensors(model: nn.Module) -> dict[str, LowBitTensor]:
    """{qualified parameter name: LowBitTensor} of every quantized parameter, rebuilt bit-exactly from storage."""
    return {name: storage.to_lowbit() for name, storage in packed_experts(model).items()}


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes of ``model``'s low-bit tensors in the canonical packed format (codes, scales, zeros, kept 16-bit
    slices): the bytes on disk. The runtime layouts hold a little more (``PackedExperts.nbytes``)."""
    return sum(storage.canonical_bytes for storage in packed_experts(model).values())


def save_quantized(model: nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json, the base tensors and the packed low-bit tensors into ``out_dir``.

    ``dtype``: storage dtype of the floating base tensors (the source checkpoint's, so a bfloat16 model
    computed in float32 is not written back twice as large); None keeps them as held.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    packed = lowbit_tensors(model)
    rows = _rows_once(model)
    if not packed and not rows:
        raise ValueError("model has no low-bit parameters: apply a quantize plan before save_quantized")
    lowbit: dict[str, torch.Tensor] = {}
    for name, tensor in [*packed.items(), *((name, storage.to_lowbit()) for name, storage in rows.items())]:
        lowbit.update({k: v.cpu() for k, v in tensor.to_state_dict(name).items()})
    write_tensors({k: v for k, v in model.state_dict().items() if k not in packed}, out / BASE_FILE, dtype)
    save_file(lowbit, str(out / LOWBIT_FILE), metadata={"format": "moeslim-lowbit"})
    write_config(model, out, dtype)


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                   ) -> tuple[nn.Module, Any]:
    """(model computing from its packed experts, tokenizer or None).

    The model is built on the meta device, so no float expert tensor is ever allocated: base tensors are
    loaded into it (``assign``), buffers that no file holds (rotary frequencies) are computed by the model's
    own initialisation, and the packed experts are installed one parameter at a time (its canonical tensors
    are read, laid out and dropped before the next), so peak memory is about base + packed tensors.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(path)
    for name in (BASE_FILE, LOWBIT_FILE):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root} is not a moeslim quantized checkpoint: {name} is missing")
    config = AutoConfig.from_pretrained(root, trust_remote_code=False)  # never run code from a folder
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    cut_compact(model, config)
    _install_lowrank_layers(model, config, dtype)
    base, aliases = read_tensors(root / BASE_FILE)
    with safe_open(str(root / LOWBIT_FILE), framework="pt") as handle:
        lowbit_keys = list(handle.keys())  # noqa: SIM118 - safe_open handles are not iterable
    prefixes = [k[: -len(_META_SUFFIX)] for k in lowbit_keys if k.endswith(_META_SUFFIX)]
    rows = _rows_section(config)  # {stored prefix: every weight name computing from it}
    prefixes = [p for p in prefixes if p not in rows]
    state = model.state_dict(keep_vars=True)
    left = set(state) - set(base) - set(prefixes) - {n for names in rows.values() for n in names}
    unexpected = set(base) - set(state)
    if left or unexpected:
        raise ValueError(f"{root}: tensors missing {sorted(left)} / unexpected {sorted(unexpected)}")
    # Cast to the dtypes the model was built with (it keeps some modules in float32 on purpose).
    base = {k: v.to(state[k].dtype) if v.is_floating_point() else v for k, v in base.items()}
    model.load_state_dict(base, strict=False, assign=True)
    target = torch.device(device)
    for prefix in prefixes:
        # One parameter's canonical tensors in memory at a time, and the file mapped only while they are read
        # (mapped pages count in the process's RSS until unmapped): no load temporaries beyond one parameter.
        with safe_open(str(root / LOWBIT_FILE), framework="pt") as handle:
            part = {k: handle.get_tensor(k) for k in lowbit_keys if k.startswith(f"{prefix}.q")}
        packed = LowBitTensor.from_state_dict(part, prefix)
        del part
        if target.type != "cpu":  # the packed layouts depend on the device (int4pack is a CPU layout)
            packed = _packed_to(packed, target)
        module_name, _, param_name = prefix.rpartition(".")
        install_lowbit(model.get_submodule(module_name), param_name, packed)
        del packed
    for prefix, names in rows.items():  # a tied head takes the embedding's one storage
        with safe_open(str(root / LOWBIT_FILE), framework="pt") as handle:
            part = {k: handle.get_tensor(k) for k in lowbit_keys if k.startswith(f"{prefix}.q")}
        storage = PackedRows(LowBitTensor.from_state_dict(part, prefix)).to(target)
        for name in names:
            install_rows(model.get_submodule(name.rpartition(".")[0]), storage)
    materialize_buffers(model, root)
    if any(aliases):
        model.tie_weights()
    model = model.to(device).eval()
    return model, saved_tokenizer(root)


def _rows_once(model: nn.Module) -> dict[str, PackedRows]:
    """{first weight name: PackedRows} of the packed embedding / head, each storage once (a tied pair: one)."""
    seen: dict[int, str] = {}
    out: dict[str, PackedRows] = {}
    for name, storage in packed_rows(model).items():
        if id(storage) not in seen:
            seen[id(storage)] = name
            out[name] = storage
    return out


def rows_names(model: nn.Module) -> dict[str, list[str]]:
    """{stored prefix: every weight name computing from it}: what ``packed_nonexpert.rows`` records for load."""
    first = {id(storage): name for name, storage in _rows_once(model).items()}
    out: dict[str, list[str]] = {name: [] for name in first.values()}
    for name, storage in packed_rows(model).items():
        out[first[id(storage)]].append(name)
    return out


def _rows_section(config: Any) -> dict[str, list[str]]:
    section = ((getattr(config, "moeslim", None) or {}).get("packed_nonexpert") or {}).get("rows") or {}
    return {str(k): [str(n) for n in v] for k, v in section.items()}


def _install_lowrank_layers(model: nn.Module, config: Any, dtype: torch.dtype) -> None:
    """A joint plan's low-rank layers beside the quantized ones: their empty projections of the recorded ranks,
    filled from the base file (the factors are ordinary tensors of the state dict)."""
    section = (getattr(config, "moeslim", None) or {}).get("lowrank")
    if section:
        from moeslim.runtime.lowrank import install_empty

        install_empty(model, section.get("layers", {}), dtype)


def _packed_to(packed: LowBitTensor, device: torch.device) -> LowBitTensor:
    def move(ts: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        return [None if t is None else t.to(device) for t in ts]

    return LowBitTensor(packed.shape, packed.bits, packed.group_size, packed.transposed, packed.dtype,
                        move(packed.codes), move(packed.scales), move(packed.zeros), move(packed.dense),
                        packed.symmetric)
