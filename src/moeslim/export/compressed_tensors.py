"""``export_compressed_tensors``: moeslim's quantized (or pruned) model as a compressed-tensors folder (vLLM).

Layout (compressed-tensors ``pack-quantized``, as llm-compressor writes a W{b}A16 GPTQ MoE): a transformers
checkpoint whose per-expert Linear weights (the legacy names ``save_pretrained`` writes: Mixtral
``block_sparse_moe.experts.{e}.w1/w2/w3``, Qwen3-MoE ``mlp.experts.{e}.gate_proj/up_proj/down_proj``) are
replaced by ``weight_packed`` (int32, codes packed by compressed-tensors' own ``pack_to_int32``),
``weight_scale`` (out, groups) float32, ``weight_zero_point`` (packed along the output dim) and
``weight_shape`` [out, in], and ``config.json`` carries ``quantization_config`` (format "pack-quantized",
strategy "group", one config group whose targets are the expert projections; router, attention and
lm_head stay dense).

The codes, scales and zero points are moeslim's own (the GPTQ result applied by ``moeslim.apply``), not a
requantization: compressed-tensors stores signed codes, so a code c and zero point z in [0, 2^b) become
c - 2^(b-1) and z - 2^(b-1), and (q - zp) * scale = (c - z) * scale is bit-for-bit moeslim's dequantization
(scales written in float32, the exact value of moeslim's float16 scales).

Schemes. vLLM's fused-MoE kernels (WNA16 Marlin / Triton) and transformers 5's experts loader read no zero
points: MoE experts must be symmetric there. GPTQ/MC-MoE (and moeslim) quantize asymmetrically, so
``scheme="symmetric"`` (the default) stores c - z exactly as a signed code: it fits b bits when every zero
point is 2^(b-1) (a symmetric grid), else b + 1 bits (|c - z| <= 2^b - 1): a 3-bit GPTQ result becomes an
exact W4A16 checkpoint, a 7-bit one W8A16 (vLLM serves 4 and 8 bits). A plan made with ``--symmetric`` has
symmetric grids (no zero points stored at all): it is written in exactly b bits, so a symmetric 4-bit plan is a
native W4A16 checkpoint and an 8-bit one W8A16, as llm-compressor writes them. ``scheme="asymmetric"`` keeps b bits
and packed ``weight_zero_point`` (``symmetric: false``), which compressed-tensors itself decompresses
exactly but vLLM and transformers 5.24 refuse for MoE experts.

Limits: one width for all experts (a compressed-tensors scheme has one num_bits; plan with
``--method uniform``), input dimension divisible by the group size, experts only (quantized attention is
refused).
A model without quantized experts (e.g. pruned) is written as a plain checkpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.export.errors import UnsupportedExportError
from moeslim.methods.quant.fused import KEEP_BITS, LowBitTensor
from moeslim.methods.quant.gptq import dequantize
from moeslim.methods.quant.pack import unpack_bits
from moeslim.plans import Plan

__all__ = ["CT_EXPERT_TARGET", "CT_SCHEMES", "CtExport", "check_ct_plan", "export_compressed_tensors", "expert_scheme",
           "on_grid", "stored_scheme", "uniform_width"]

# Per-expert Linear names in the saved checkpoint: (decoder layer, expert, projection).
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.[\w.]*experts\.(\d+)\."
                         r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PROJ = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
CT_SCHEMES = ("symmetric", "asymmetric")
CT_EXPERT_TARGET = r"re:.*experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)$"


@dataclass(frozen=True)
class CtExport:
    path: Path
    bits: int | None  # moeslim's code width
    stored_bits: int | None  # num_bits of the compressed-tensors scheme
    symmetric: bool
    group_size: int | None
    quantized_tensors: int


UNIFORM_HINT = ("plan with: moeslim plan quantize --method uniform --symmetric --bits 4 or 8 (stored as W4A16 / "
                "W8A16, the widths vLLM's MoE kernels serve); or without --symmetric, --bits B, B from 1 to 7 (3 is "
                "stored as W4A16 and 7 as W8A16)")


def check_ct_plan(plan: Plan, where: str) -> None:
    """Refuse, before any GPTQ work, a plan whose result compressed-tensors cannot hold: not a quantize plan, per-
    tensor GGUF types, or more than one expert width (a scheme has one ``num_bits``)."""
    if plan.kind != "quantize":
        raise UnsupportedExportError(f"{where}: compressed-tensors export takes a quantize plan, not a {plan.kind} "
                                     "plan; apply that plan first (moeslim apply) and export the checkpoint")
    widths: set[int] = set()
    for entry in plan.layers.values():
        if not isinstance(entry, dict) or "bits" not in entry:
            raise UnsupportedExportError(f"{where}: a --scope gguf plan has llama.cpp types, not widths; export it "
                                         f"with --format gguf, or {UNIFORM_HINT}")
        widths.update(int(b) for b in entry["bits"])
    if len(widths) != 1 or KEEP_BITS in widths:
        raise UnsupportedExportError(f"{where}: compressed-tensors holds one width for every expert; this plan has "
                                     f"widths {sorted(widths)}; {UNIFORM_HINT}")


def _uniform_width(lowbit: dict[str, LowBitTensor]) -> tuple[int, int]:
    return uniform_width({b for t in lowbit.values() for b in t.bits}, {t.group_size for t in lowbit.values()})


def uniform_width(widths: set[int], groups: set[int]) -> tuple[int, int]:
    """(width, group size) of experts with these ``widths`` and ``groups``; refuses more than one of either."""
    if len(widths) != 1 or KEEP_BITS in widths:
        raise UnsupportedExportError(f"compressed-tensors holds one width per scheme; this model's experts have "
                                     f"widths {sorted(widths)}; {UNIFORM_HINT}")
    if len(groups) != 1:
        raise UnsupportedExportError(f"one group size is needed, this model has {sorted(groups)}")
    return next(iter(widths)), next(iter(groups))


def expert_scheme(bits: int, group_size: int, symmetric: bool) -> Any:
    """The compressed-tensors QuantizationConfig of the experts (int groups, pack-quantized)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=[CT_EXPERT_TARGET], weights=args, format="pack-quantized")
    return QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                              quantization_status="compressed", ignore=["lm_head"])


def _expert_streams(t: LowBitTensor, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert e of a fused tensor: codes (out, in) int64, scales (out, G) float16, zeros (out, G) int64."""
    n_out, n_in = t.out_in
    b = t.bits[e]
    codes = unpack_bits(t.stream("codes", e), b, n_out * n_in).reshape(n_out, n_in)
    return codes, t.stream("scales", e), t.zero_points(e)


def _packed_linear(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, stored_bits: int,
                   symmetric: bool) -> dict[str, torch.Tensor]:
    """One expert Linear (out, in) in compressed-tensors' pack-quantized tensors.

    codes (out, in), zeros (out, G) in [0, 2^b); symmetric: signed q = c - z at ``stored_bits``; asymmetric:
    q = c - 2^(b-1) and zp = z - 2^(b-1) at b = ``stored_bits`` (compressed-tensors' signed int domain).
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = {"weight_scale": scales.float().contiguous(),
           "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64)}
    if symmetric:
        per_col = zeros.to(torch.int16).repeat_interleave(group, dim=1)[:, : codes.shape[1]]
        q = codes.to(torch.int16) - per_col
        lo, hi = -(1 << (stored_bits - 1)), (1 << (stored_bits - 1)) - 1
        if int(q.min()) < lo or int(q.max()) > hi:  # impossible by construction of stored_bits
            raise RuntimeError(f"codes do not fit {stored_bits} signed bits")
        out["weight_packed"] = pack_to_int32(q.to(torch.int8), stored_bits)
        return out
    offset = 1 << (stored_bits - 1)
    out["weight_packed"] = pack_to_int32((codes.to(torch.int16) - offset).to(torch.int8), stored_bits)
    zp = (zeros.to(torch.int16) - offset).to(torch.int8)
    out["weight_zero_point"] = pack_to_int32(zp, stored_bits, packed_dim=0).contiguous()
    return out


def _storage(experts: dict[str, LowBitTensor], bits: int, scheme: str) -> tuple[int, bool]:
    """(num_bits, symmetric) of the written scheme for moeslim codes of ``bits`` bits."""
    symmetric = all(t.symmetric for t in experts.values())
    return stored_scheme(bits, scheme, symmetric, symmetric or on_grid(experts, bits))


def on_grid(experts: dict[str, LowBitTensor], bits: int) -> bool:
    """Every zero point of ``experts`` is 2^(bits-1): asymmetric codes on a symmetric grid."""
    mid = 1 << (bits - 1)
    return all(bool((t.zero_points(e) == mid).all()) for t in experts.values() for e in range(t.shape[0]))


def stored_scheme(bits: int, scheme: str, symmetric: bool, grid: bool) -> tuple[int, bool]:
    """(num_bits, symmetric) of the written scheme for moeslim codes of ``bits`` bits; ``symmetric``: planned with
    --symmetric (no zero points); ``grid``: every zero point is 2^(bits-1)."""
    if scheme == "asymmetric":
        return bits, False
    if symmetric or grid:  # b bits exactly
        return bits, True
    if bits + 1 > 8:
        raise UnsupportedExportError(f"{bits}-bit asymmetric codes need {bits + 1} signed bits in a symmetric "
                                     "scheme (compressed-tensors packs at most 8): plan with --bits 7 or less, or "
                                     "export with scheme='asymmetric' (not loadable by vLLM's MoE kernels)")
    return bits + 1, True


def _split(t: LowBitTensor, e: int, proj: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of expert e's fused gate_up (gate first) or its down projection."""
    codes, scales, zeros = _expert_streams(t, e)
    if proj == "down":
        return codes, scales, zeros
    half = codes.shape[0] // 2
    rows = slice(0, half) if proj == "gate" else slice(half, None)
    return codes[rows], scales[rows], zeros[rows]


def _dense_copy(model: nn.Module) -> nn.Module:
    """A float model equal to ``model`` with every packed expert tensor dequantized (for save_pretrained)."""
    from transformers import AutoModelForCausalLM

    from moeslim.runtime.lowbit_io import lowbit_tensors

    lowbit = lowbit_tensors(model)
    state = {k: v for k, v in model.state_dict().items() if k not in lowbit and v.device.type != "meta"}
    state.update({k: t.dequantize() for k, t in lowbit.items()})
    source: Any = model.config
    config = source.__class__.from_dict({k: v for k, v in source.to_dict().items() if k != "moeslim"})
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
    missing, unexpected = dense.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"dense copy mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        dense.tie_weights()
    return dense.eval()


def export_compressed_tensors(model: nn.Module, tokenizer: Any, out: str | Path, *, scheme: str = "symmetric",
                              overwrite: bool = False, inputs: Iterable[str | Path] = (), progress: bool = False
                              ) -> CtExport:
    """Write ``model`` to the folder ``out`` in the compressed-tensors pack-quantized layout (see module doc).

    scheme: "symmetric" (vLLM / transformers loadable; b or b + 1 stored bits) or "asymmetric" (b bits + zero
    points). overwrite: replace an existing moeslim output folder. inputs: paths ``out`` must not be.
    progress: a line on stderr per shard written.
    """
    from safetensors.torch import load_file, save_file

    from moeslim.outputs import atomic_dir, temp_dir_beside
    from moeslim.progress import steps
    from moeslim.runtime.lowbit_io import lowbit_tensors

    lowbit = lowbit_tensors(model)
    experts = {k: t for k, t in lowbit.items() if ".experts." in k}
    if len(experts) != len(lowbit):
        raise UnsupportedExportError(f"compressed-tensors export writes quantized experts only; also quantized: "
                                     f"{sorted(set(lowbit) - set(experts))[:4]} (plan without quantize_attention)")
    if scheme not in CT_SCHEMES:
        raise UnsupportedExportError(f"scheme={scheme!r}: use one of {', '.join(CT_SCHEMES)}")
    layout = _layout(experts, scheme) if experts else None
    dense: Any = _dense_copy(model) if experts else model
    replaced = 0
    with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        with temp_dir_beside(out) as stage:  # removed by the next run if this one is killed
            dense.save_pretrained(stage, safe_serialization=True)
            shards = sorted(Path(stage).glob("*.safetensors"))
            for file in Path(stage).iterdir():
                if file.suffix != ".safetensors" and file.name != "config.json":
                    (tmp / file.name).write_bytes(file.read_bytes())
            for shard in steps(shards, "compressed-tensors", len(shards), unit="shards", enabled=progress):
                tensors = load_file(str(shard))
                if layout is not None:
                    replaced += _replace_experts(tensors, layout)
                save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
            if len(shards) > 1:
                _rewrite_index(Path(stage), tmp)
            config = json.loads((Path(stage) / "config.json").read_text())
            if layout is not None:
                ct = expert_scheme(layout.stored_bits, layout.group_size, layout.symmetric)
                config["quantization_config"] = ct.to_dict()
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    expected = sum(t.shape[0] * (2 if n.endswith("gate_up_proj") else 1) for n, t in experts.items())
    if replaced != expected:
        raise RuntimeError(f"wrote {replaced} packed expert weights, expected {expected}")
    if layout is None:
        return CtExport(Path(out), None, None, False, None, 0)
    return CtExport(Path(out), layout.bits, layout.stored_bits, layout.symmetric, layout.group_size, replaced)


@dataclass(frozen=True)
class _Layout:
    """The experts to write: fused tensors by decoder layer, moeslim's width, the stored scheme."""

    gate_up: dict[int, LowBitTensor]
    down: dict[int, LowBitTensor]
    bits: int
    group_size: int
    stored_bits: int
    symmetric: bool


def _layer_of(name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", name)
    if match is None:
        raise UnsupportedExportError(f"{name}: not a decoder-layer tensor")
    return int(match.group(1))


def _layout(experts: dict[str, LowBitTensor], scheme: str) -> _Layout:
    if any(t.transposed for t in experts.values()):
        raise UnsupportedExportError("compressed-tensors export needs (E, out, in) expert tensors")
    bits, group = _uniform_width(experts)
    if any(t.out_in[1] % group for t in experts.values()):
        sizes = sorted({t.out_in[1] for t in experts.values()})
        raise UnsupportedExportError(f"group size {group} must divide every expert input size {sizes} (the "
                                     "compressed-tensors group strategy); plan with a group size that does")
    stored, symmetric = _storage(experts, bits, scheme)
    gate_up = {_layer_of(k): t for k, t in experts.items() if k.endswith("gate_up_proj")}
    down = {_layer_of(k): t for k, t in experts.items() if k.endswith("down_proj")}
    return _Layout(gate_up, down, bits, group, stored, symmetric)


def _replace_experts(tensors: dict[str, torch.Tensor], layout: _Layout) -> int:
    """Replace each saved per-expert float weight of one shard by its packed tensors; returns how many."""
    count = 0
    for key, match in [(k, m) for k in tensors if (m := _EXPERT_KEY.match(k))]:
        layer, e, name = match.groups()
        proj = _PROJ[name]
        source = layout.down[int(layer)] if proj == "down" else layout.gate_up[int(layer)]
        codes, scales, zeros = _split(source, int(e), proj)
        # The saved float weight must be exactly this expert's dequantization: checks the name mapping.
        saved = tensors.pop(key)
        deq = dequantize(codes, scales, zeros, layout.group_size).to(saved.dtype)
        if saved.shape != deq.shape or not torch.equal(saved, deq):
            raise RuntimeError(f"{key}: the saved weight is not moeslim's expert {e} {proj}")
        packed = _packed_linear(codes, scales, zeros, layout.group_size, layout.stored_bits, layout.symmetric)
        tensors.update({f"{key.removesuffix('.weight')}.{n}": v for n, v in packed.items()})
        count += 1
    return count


def _rewrite_index(stage: Path, tmp: Path) -> None:
    """Multi-shard checkpoints: the index's weight map names the new per-expert tensors."""
    from safetensors import safe_open

    index = json.loads(next(stage.glob("*.index.json")).read_text())
    weight_map: dict[str, str] = {}
    for shard in sorted(tmp.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            weight_map.update({k: shard.name for k in handle.keys()})  # noqa: SIM118
    index["weight_map"] = dict(sorted(weight_map.items()))
    (tmp / next(stage.glob("*.index.json")).name).write_text(json.dumps(index, indent=2) + "\n")
