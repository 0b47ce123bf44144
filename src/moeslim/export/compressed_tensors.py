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

Mixed widths per layer (``plan quantize --granularity layer --scope global``, or a layer kept at 16 bits): one
config group per stored width, whose targets name that width's layers (``layer_target``: a regex matching one
layer's per-expert projections); a layer at 16 bits is in no group and stays dense. That is what vLLM serves: its
fused-MoE layer takes the scheme of its expert 0's ``gate_proj``/``up_proj``/``down_proj`` names (one scheme per
layer, the three projections equal). transformers 5.24 reads one experts scheme for the whole model (the first
config group naming experts, ``get_experts_scheme``), so it cannot load mixed widths: load such a folder with vLLM
or compressed-tensors (``ct_layer_schemes`` gives each layer's scheme). Per-expert mixed widths (a compressed-
tensors scheme has one num_bits for a fused layer) are refused.

Limits: input dimension divisible by the group size, experts only (quantized attention is refused).
A model without quantized experts (e.g. pruned) is written as a plain checkpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.export.errors import UnsupportedExportError
from moeslim.methods.quant.fused import KEEP_BITS, LowBitTensor
from moeslim.methods.quant.gptq import dequantize
from moeslim.methods.quant.pack import unpack_bits
from moeslim.plans import Plan

__all__ = ["CT_EXPERT_TARGET", "CT_SCHEMES", "CtExport", "CtWidths", "ExpertsLayout", "check_ct_plan",
           "ct_layer_schemes", "ct_widths", "expert_scheme", "export_compressed_tensors", "layer_target", "on_grid",
           "replace_experts", "stored_scheme"]

# Per-expert Linear names in the saved checkpoint: (decoder layer, expert, projection).
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.[\w.]*experts\.(\d+)\."
                         r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PROJ = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
CT_SCHEMES = ("symmetric", "asymmetric")
CT_EXPERT_TARGET = r"re:.*experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)$"


def layer_target(layer: int) -> str:
    """The compressed-tensors target of one decoder layer's per-expert projections (a ``re:`` regex)."""
    return rf"re:.*layers\.{layer}\.[\w.]*experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)$"


@dataclass(frozen=True)
class CtExport:
    path: Path
    bits: int | None  # moeslim's code width (None: none quantized, or widths differ by layer)
    stored_bits: int | None  # num_bits of the compressed-tensors scheme (None likewise)
    symmetric: bool
    group_size: int | None
    quantized_tensors: int
    layers: dict[int, tuple[int, int]] = field(default_factory=dict)  # decoder layer: (bits, stored bits)

    def describe(self) -> str:
        """What was written, in words (the CLI's line)."""
        if not self.layers:
            return "no quantized experts: a plain checkpoint"
        kind = "symmetric" if self.symmetric else "asymmetric"
        if self.bits is not None:
            return (f"{self.quantized_tensors} expert weights at {self.bits} bits, stored as {self.stored_bits}-bit "
                    f"{kind} groups of {self.group_size}")
        by_width: dict[tuple[int, int], list[int]] = {}
        for layer, widths in sorted(self.layers.items()):
            by_width.setdefault(widths, []).append(layer)
        parts = "; ".join(f"{b} bits stored as {s} in layers {ls}" for (b, s), ls in sorted(by_width.items()))
        return (f"{self.quantized_tensors} expert weights in {kind} groups of {self.group_size}, one width per layer: "
                f"{parts}; a config group per width: vLLM loads it, transformers 5.24 cannot (one experts scheme "
                "per model)")


UNIFORM_HINT = ("plan with: moeslim plan quantize --method uniform --symmetric --bits 4 or 8 (stored as W4A16 / "
                "W8A16, the widths vLLM's MoE kernels serve); or without --symmetric, --bits B, B from 1 to 7 (3 is "
                "stored as W4A16 and 7 as W8A16)")


MIXED_HINT = ("mixed widths compressed-tensors can hold are one width per MoE layer: plan with moeslim plan quantize "
              "--method pmq --granularity layer --scope global (vLLM's fused-MoE kernel takes one scheme per layer)")


def check_ct_plan(plan: Plan, where: str) -> None:
    """Refuse, before any GPTQ work, a plan whose result compressed-tensors cannot hold: not a quantize plan, per-
    tensor GGUF types, experts of one layer at different widths (a layer's scheme has one ``num_bits``), or no
    quantized expert at all."""
    if plan.kind != "quantize":
        raise UnsupportedExportError(f"{where}: compressed-tensors export takes a quantize plan, not a {plan.kind} "
                                     "plan; apply that plan first (moeslim apply) and export the checkpoint")
    per_layer: dict[int, set[int]] = {}
    for idx, entry in plan.layers.items():
        if not isinstance(entry, dict) or "bits" not in entry:
            raise UnsupportedExportError(f"{where}: a --scope gguf plan has llama.cpp types, not widths; export it "
                                         f"with --format gguf, or {UNIFORM_HINT}")
        per_layer[int(idx)] = {int(b) for b in entry["bits"]}
    mixed = {idx: sorted(w) for idx, w in sorted(per_layer.items()) if len(w) > 1}
    if mixed:
        first = next(iter(mixed.items()))
        raise UnsupportedExportError(f"{where}: compressed-tensors holds one width per MoE layer; this plan gives the "
                                     f"experts of {len(mixed)} layer(s) different widths (layer {first[0]}: "
                                     f"{first[1]}); {MIXED_HINT}; or {UNIFORM_HINT}")
    if all(w == {KEEP_BITS} for w in per_layer.values()):
        raise UnsupportedExportError(f"{where}: this plan keeps every expert at {KEEP_BITS} bits (nothing to "
                                     f"pack); {UNIFORM_HINT}")


@dataclass(frozen=True)
class CtWidths:
    """How the quantized experts are written: moeslim's width and the stored width per quantized decoder layer (layers
    at 16 bits are absent: they stay dense), one group size and one kind (symmetric or not) for all."""

    bits: dict[int, int]
    group_size: int
    stored: dict[int, int]
    symmetric: bool
    stored_bits: int | None  # the one stored width when every layer is quantized alike (one target for all experts)

    def config(self) -> Any:
        """The compressed-tensors QuantizationConfig (one config group, or one per stored width)."""
        return expert_scheme(self.stored_bits if self.stored_bits is not None else self.stored, self.group_size,
                             self.symmetric)

    def result(self, path: Path, replaced: int) -> CtExport:
        """The export's description once ``replaced`` per-expert weights are written to ``path``."""
        layers = {idx: (self.bits[idx], self.stored[idx]) for idx in sorted(self.stored)}
        bits, stored = next(iter(layers.values())) if self.stored_bits is not None else (None, None)
        return CtExport(path, bits, stored, self.symmetric, self.group_size, replaced, layers)


def ct_widths(widths: dict[int, set[int]], groups: set[int], inputs: dict[int, set[int]],
              storage: Callable[[int, int], tuple[int, bool]]) -> CtWidths:
    """How experts with these widths are written, checked: ``widths`` {decoder layer: its experts' widths},
    ``groups`` their group sizes, ``inputs`` {decoder layer: its experts' input sizes}; ``storage(layer, bits)``:
    (stored bits, symmetric) of a quantized layer (``_storage`` of its experts). Refuses per-expert mixed widths,
    more than one group size, nothing to pack and a group size that does not divide the inputs (the in-memory and the
    streamed export alike: the streamed one gathers these one layer at a time)."""
    mixed = {idx: sorted(w) for idx, w in sorted(widths.items()) if len(w) > 1}
    if mixed:
        raise UnsupportedExportError(f"compressed-tensors holds one width per MoE layer; this model's experts have "
                                     f"per-expert widths (layer: widths) {mixed}; {MIXED_HINT}; or {UNIFORM_HINT}")
    if len(groups) != 1:
        raise UnsupportedExportError(f"one group size is needed, this model has {sorted(groups)}")
    group = next(iter(groups))
    one = {idx: next(iter(w)) for idx, w in widths.items()}
    bits = {idx: b for idx, b in one.items() if b != KEEP_BITS}
    if not bits:
        raise UnsupportedExportError(f"every expert is kept at {KEEP_BITS} bits: nothing to pack; {UNIFORM_HINT}")
    if any(size % group for idx in bits for size in inputs[idx]):
        sizes = sorted(set().union(*inputs.values()))
        raise UnsupportedExportError(f"group size {group} must divide every expert input size {sizes} (the "
                                     "compressed-tensors group strategy); plan with a group size that does")
    kinds = {idx: storage(idx, b) for idx, b in bits.items()}
    stored = {idx: s for idx, (s, _) in kinds.items()}
    symmetric = {sym for _, sym in kinds.values()}.pop()  # the scheme decides it, alike for every layer
    single = len(set(stored.values())) == 1 and len(bits) == len(one)
    return CtWidths(bits, group, stored, symmetric, next(iter(stored.values())) if single else None)


def expert_scheme(bits: int | dict[int, int], group_size: int, symmetric: bool) -> Any:
    """The compressed-tensors QuantizationConfig of the experts (int groups, pack-quantized).

    bits: the stored width of every quantized expert (one config group targeting all experts), or {decoder layer:
    stored width} (one config group per width, targeting its layers; layers not listed stay dense).
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def scheme(width: int, targets: list[str]) -> QuantizationScheme:
        args = QuantizationArgs(num_bits=width, type="int", symmetric=symmetric, strategy="group",
                                group_size=group_size)
        return QuantizationScheme(targets=targets, weights=args, format="pack-quantized")

    if isinstance(bits, int):
        groups = {"group_0": scheme(bits, [CT_EXPERT_TARGET])}
    else:
        widths = sorted(set(bits.values()))
        groups = {f"group_{i}": scheme(w, [layer_target(idx) for idx, b in sorted(bits.items()) if b == w])
                  for i, w in enumerate(widths)}
    return QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                              ignore=["lm_head"])


def ct_layer_schemes(config: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """{module name: the QuantizationScheme whose targets match it} for per-expert Linear names (as vLLM reads a
    layer's scheme from its expert 0's projection names), by compressed-tensors' own matcher; names no group
    targets are left out. ``config``: a folder's ``quantization_config``."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    ct = QuantizationConfig.model_validate(config)
    out: dict[str, Any] = {}
    for name in names:
        found = [g for g in ct.config_groups.values() if is_match(name, nn.Linear(1, 1), g.targets, ct.ignore or ())]
        if len(found) > 1:
            raise RuntimeError(f"{name}: matched by {len(found)} config groups")
        if found:
            out[name] = found[0]
    return out


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


def _storage(experts: list[LowBitTensor], bits: int, scheme: str) -> tuple[int, bool]:
    """(num_bits, symmetric) of the written scheme for moeslim codes of ``bits`` bits."""
    symmetric = all(t.symmetric for t in experts)
    return stored_scheme(bits, scheme, symmetric, scheme != "asymmetric" and (symmetric or on_grid(experts, bits)))


def on_grid(experts: Iterable[LowBitTensor], bits: int) -> bool:
    """Every zero point of ``experts`` is 2^(bits-1): asymmetric codes on a symmetric grid."""
    mid = 1 << (bits - 1)
    return all(bool((t.zero_points(e) == mid).all()) for t in experts for e in range(t.shape[0]))


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

    lowrank = sorted(name for name, _ in model.named_modules() if name.endswith(".moeslim_lowrank"))
    if lowrank:
        raise UnsupportedExportError(f"compressed-tensors has no format for low-rank experts ({lowrank[:2]}...): "
                                     "export a model made without low-rank layers (a joint plan without --ranks)")
    from moeslim.runtime.packed_rows import packed_rows

    rows = sorted(packed_rows(model))
    if rows:
        raise UnsupportedExportError(f"compressed-tensors export writes quantized experts only; the token embedding "
                                     f"/ output head are packed too ({rows}): plan without --embedding-widths")
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
                    replaced += replace_experts(tensors, layout)
                save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
            if len(shards) > 1:
                _rewrite_index(Path(stage), tmp)
            config = json.loads((Path(stage) / "config.json").read_text())
            if layout is not None:
                config["quantization_config"] = layout.widths.config().to_dict()
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    if layout is None:
        return CtExport(Path(out), None, None, False, None, 0)
    expected = sum(t.shape[0] * (2 if n.endswith("gate_up_proj") else 1) for n, t in experts.items()
                   if _layer_of(n) in layout.widths.stored)
    if replaced != expected:
        raise RuntimeError(f"wrote {replaced} packed expert weights, expected {expected}")
    return layout.widths.result(Path(out), replaced)


@dataclass(frozen=True)
class ExpertsLayout:
    """The experts to write: fused tensors of the quantized decoder layers (all, or the one a streamed part holds) and
    how every layer is written."""

    gate_up: dict[int, LowBitTensor]
    down: dict[int, LowBitTensor]
    widths: CtWidths


def _layer_of(name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", name)
    if match is None:
        raise UnsupportedExportError(f"{name}: not a decoder-layer tensor")
    return int(match.group(1))


def _layout(experts: dict[str, LowBitTensor], scheme: str) -> ExpertsLayout:
    if any(t.transposed for t in experts.values()):
        raise UnsupportedExportError("compressed-tensors export needs (E, out, in) expert tensors")
    by_layer: dict[int, list[LowBitTensor]] = {}
    for name, t in experts.items():
        by_layer.setdefault(_layer_of(name), []).append(t)
    widths = ct_widths({idx: {b for t in ts for b in t.bits} for idx, ts in by_layer.items()},
                       {t.group_size for t in experts.values()},
                       {idx: {t.out_in[1] for t in ts} for idx, ts in by_layer.items()},
                       lambda idx, b: _storage(by_layer[idx], b, scheme))
    packed = {k: t for k, t in experts.items() if _layer_of(k) in widths.bits}
    gate_up = {_layer_of(k): t for k, t in packed.items() if k.endswith("gate_up_proj")}
    down = {_layer_of(k): t for k, t in packed.items() if k.endswith("down_proj")}
    return ExpertsLayout(gate_up, down, widths)


def replace_experts(tensors: dict[str, torch.Tensor], layout: ExpertsLayout) -> int:
    """Replace each saved per-expert float weight of one shard by its packed tensors; returns how many."""
    count = 0
    for key, match in [(k, m) for k in tensors if (m := _EXPERT_KEY.match(k))]:
        layer, e, name = match.groups()
        if int(layer) not in layout.widths.stored:  # a layer kept at 16 bits: its float weights stay
            continue
        proj = _PROJ[name]
        source = layout.down[int(layer)] if proj == "down" else layout.gate_up[int(layer)]
        codes, scales, zeros = _split(source, int(e), proj)
        # The saved float weight must be exactly this expert's dequantization: checks the name mapping.
        saved = tensors.pop(key)
        deq = dequantize(codes, scales, zeros, layout.widths.group_size).to(saved.dtype)
        if saved.shape != deq.shape or not torch.equal(saved, deq):
            raise RuntimeError(f"{key}: the saved weight is not moeslim's expert {e} {proj}")
        packed = _packed_linear(codes, scales, zeros, layout.widths.group_size, layout.widths.stored[int(layer)],
                                layout.widths.symmetric)
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
