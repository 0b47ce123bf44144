"""``export_gguf``: a model (original, pruned, or with a ``scope="gguf"`` PMQ plan) as a GGUF file for llama.cpp.

Layout (as llama.cpp's convert_hf_to_gguf.py writes Mixtral / Qwen3-MoE): one 3D tensor per projection and
layer, ``blk.N.ffn_gate_exps`` / ``ffn_up_exps`` (E, I, H) and ``ffn_down_exps`` (E, H, I) (GGUF lists the
dimensions reversed: ne = {H, I, E}), split from transformers' fused ``gate_up_proj`` (gate rows first);
the router ``ffn_gate_inp`` and all norms in F32; ``expert_count`` / ``expert_used_count`` from the model as
it is, so a pruned model (fewer experts) needs nothing special, and one with unequal per-layer counts is padded
to the largest (``gguf_pad``); the tokenizer (``gguf_vocab``).

Types: ``qtype`` for every matrix (token embedding, attention, output, experts), the plan's per-tensor types
for the experts. gguf-py quantizes F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 itself. K-quants and llama.cpp's
presets (Q4_K_M, ...) need llama.cpp's own quantizer: pass the path of its ``llama-quantize`` program; the
file is then written with every matrix in the 16-bit type it is held in (BF16 for a bfloat16 checkpoint
streamed, F16 for float16; else F32: exact either way, see ``write_gguf``) and requantized by it with one
``--tensor-type`` override per planned tensor (and ``--imatrix``). A tensor whose rows do not divide into the
type's blocks is stored as F16 (what llama.cpp does); the result lists every such fallback, and the types in
the file (read back from llama-quantize's output).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moeslim.export.gguf_arch import (
    GgufArch,
    MoeShape,
    UnsupportedExportError,
    gguf_family,
    gguf_tensor_name,
    tensor_name_map,
)
from moeslim.export.gguf_pad import ExpertPadding, expert_padding, pad_expert_tensor
from moeslim.export.gguf_topk import check_no_skipping, reduced_top_k
from moeslim.export.gguf_vocab import GgufVocab, gguf_vocab, write_vocab
from moeslim.methods.quant.gguf_types import GGUF_BLOCKS, GPY_QUANTIZABLE, PROJECTIONS
from moeslim.models import find_moe_layers
from moeslim.outputs import check_output_file, output_lock, temp_dir_beside
from moeslim.plans import Plan, PlanError, config_hash
from moeslim.progress import steps

__all__ = ["GGUF_DIRECT_TYPES", "LLAMA_QUANTIZE_TYPES", "GgufExport", "export_gguf", "plan_tensor_types",
           "read_gguf_types"]

GGUF_DIRECT_TYPES = GPY_QUANTIZABLE
# Types and presets only llama.cpp's quantizer writes (llama-quantize names, case-insensitive there).
LLAMA_QUANTIZE_TYPES = ("Q2_K", "Q2_K_S", "Q3_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K", "Q4_K_S", "Q4_K_M",
                        "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS")
_QUANTIZE_TIMEOUT_S = 3600


@dataclass(frozen=True)
class GgufExport:
    """What was written: the file, its tensor types (read back from it), fallbacks to F16, expert count."""

    path: Path
    tensor_types: dict[str, str]
    expert_count: int
    expert_used_count: int
    fallbacks: list[str] = field(default_factory=list)
    quantizer: str = "gguf-py"

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size


def _config(model: nn.Module) -> Any:
    """The transformers config of ``model`` (typed loosely: configs differ per family)."""
    return model.config


def _check_qtype(qtype: str) -> str:
    q = qtype.upper()
    if q not in GGUF_DIRECT_TYPES and q not in LLAMA_QUANTIZE_TYPES:
        raise UnsupportedExportError(f"--type {qtype!r}: use one of {', '.join(GGUF_DIRECT_TYPES)} (written by "
                                     f"gguf-py) or {', '.join(LLAMA_QUANTIZE_TYPES)} (need --llama-quantize)")
    return q


def plan_tensor_types(model: nn.Module, plan: Plan) -> dict[str, str]:
    """{GGUF expert tensor name: type} of a ``scope="gguf"`` quantize plan, checked against the model."""
    if plan.kind != "quantize" or plan.summary.get("scope") != "gguf":
        raise PlanError(f"GGUF export takes a quantize plan with scope 'gguf' (moeslim plan quantize --scope gguf); "
                        f"this is a {plan.kind!r} plan with scope {plan.summary.get('scope')!r}")
    if plan.provenance.model_config_hash != config_hash(_config(model)):
        raise PlanError(f"the plan was made for another model ({plan.provenance.model}, config hash "
                        f"{plan.provenance.model_config_hash}); this model's config hash is "
                        f"{config_hash(_config(model))}")
    moe = sorted(layer.layer_idx for layer in find_moe_layers(model))
    if sorted(plan.layers) != moe:
        raise PlanError(f"plan layers {sorted(plan.layers)} are not this model's MoE layers {moe}")
    out: dict[str, str] = {}
    for idx, entry in plan.layers.items():
        types = entry.get("gguf_types") if isinstance(entry, dict) else None
        if not isinstance(types, dict) or sorted(types) != sorted(PROJECTIONS):
            raise PlanError(f"plan layer {idx}: need {{'gguf_types': {{gate, up, down}}}}, got {entry!r}")
        for proj, qtype in types.items():
            if qtype not in GGUF_BLOCKS:
                raise PlanError(f"plan layer {idx} {proj}: unknown GGUF type {qtype!r}")
            out[f"blk.{idx}.ffn_{proj}_exps.weight"] = qtype
    return out


Tensors = Callable[[], Iterable[tuple[str, torch.Tensor]]]  # (state-dict name, tensor as held), in file order


def model_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict name, tensor) of every tensor ``export_gguf`` writes, in file order: a packed token embedding /
    output head (a joint plan's ``--embedding-widths``), the state dict, then the packed experts of a
    moeslim-quantized model, each dequantized when it is reached (the GGUF type re-quantizes them; F32 holds them
    exactly). ``export.streamed`` lists a checkpoint folder's tensors in this same order (it refuses packed
    embeddings)."""
    from moeslim.runtime.lowbit_io import packed_experts
    from moeslim.runtime.packed_rows import packed_rows

    state = model.state_dict()
    for key, rows in packed_rows(model).items():  # their parameters are gone from the state dict
        if key not in state:
            yield key, rows.dequantize()
    packed = packed_experts(model)
    for key, tensor in state.items():
        yield key, _held_shape(model, key, packed[key].to_lowbit().dequantize()) if key in packed else tensor
    for key, storage in packed.items():
        if key not in state:
            yield key, _held_shape(model, key, storage.to_lowbit().dequantize())


def _held_shape(model: nn.Module, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A dequantized packed tensor (1, out, in) of a packed 2D weight (attention) as that weight, (out, in): the
    packed format holds every matrix as a stack; its placeholder attribute keeps the weight's shape."""
    module_name, _, attr = key.rpartition(".")
    held = getattr(model.get_submodule(module_name), attr, None)
    if isinstance(held, torch.Tensor) and tensor.ndim == held.ndim + 1 and tensor.shape == (1, *held.shape):
        return tensor[0]
    return tensor


def _gguf_tensors(tensors: Iterable[tuple[str, torch.Tensor]], config: Any, arch: GgufArch,
                  padding: ExpertPadding | None = None) -> Iterator[tuple[str, torch.Tensor, torch.dtype]]:
    """(GGUF name, tensor in PyTorch order, dtype it was held in) for every tensor, in the architecture's layout.
    Run on meta tensors it gives every name and shape without touching data (the tied head is left out: llama.cpp
    reuses token_embd when output is absent).

    The layout transforms move data (slices, transposes, reshapes), so they run on the tensor as held; the writer
    makes float32 copies one slice at a time (``_encode_tensor``): a bfloat16 layer never has a float32 copy of a
    whole fused expert tensor. ``padding``: unequal per-layer expert counts padded to one (``gguf_pad``).
    """
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = tensor_name_map(arch, int(config.num_hidden_layers))
    for key, tensor in tensors:
        if key == "lm_head.weight" and tied:
            continue
        for hf_key, data in arch.transform(key, tensor.detach(), config):
            gname = gguf_tensor_name(names, hf_key)
            yield gname, pad_expert_tensor(gname, data, padding), tensor.dtype


def _meta(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    return ((key, tensor.detach().to("meta")) for key, tensor in tensors)


def _write_hparams(writer: Any, items: dict[str, Any]) -> None:
    for method, value in items.items():
        getattr(writer, method)(value)


def _keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors the converter (and llama.cpp's quantizer) never store below F32: 1D tensors, norms, biases and
    other non-``.weight`` tensors, the routers."""
    return (len(shape) <= 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight"))
            or not name.endswith(".weight"))


def _encode(data: np.ndarray, qtype: str) -> np.ndarray:
    """The bytes to store for ``qtype`` (float arrays for F32 / F16, uint8 blocks otherwise), by gguf-py."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if qtype == "F32":
        return data.astype(np.float32)
    if qtype == "F16":
        return data.astype(np.float16)
    return quantize(data.astype(np.float32), GGMLQuantizationType[qtype])


@dataclass(frozen=True)
class _Planned:
    """One tensor of the file: name, shape (PyTorch order), the type it is stored in; ``exact``: the type must
    hold every value exactly (the 16-bit intermediate for llama-quantize)."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    exact: bool = False


# The intermediate for llama-quantize: each tensor in the 16-bit type it is held in (exact), else F32.
_SAME_16 = {torch.bfloat16: "BF16", torch.float16: "F16"}


def _plan_types(tensors: Tensors, config: Any, arch: GgufArch, default: str, overrides: dict[str, str],
                intermediate: bool = False, padding: ExpertPadding | None = None
                ) -> tuple[list[_Planned], list[str]]:
    """(every tensor with its stored type, in file order; the F16 fallbacks), from shapes alone (meta copies).

    ``intermediate``: the file llama-quantize reads: matrices in the 16-bit type their source holds (``_SAME_16``),
    others in F32; ``default`` and ``overrides`` are then not used.
    """
    planned: list[_Planned] = []
    fallbacks: list[str] = []
    for tname, data, held in _gguf_tensors(_meta(tensors()), config, arch, padding):
        shape = tuple(int(d) for d in data.shape)
        if _keeps_f32(tname, shape):
            planned.append(_Planned(tname, shape, "F32"))
            continue
        if intermediate:
            planned.append(_Planned(tname, shape, _SAME_16.get(held, "F32"), exact=held in _SAME_16))
            continue
        qtype = overrides.get(tname, default)
        if shape[-1] % GGUF_BLOCKS[qtype][0]:
            fallbacks.append(f"{tname}: {qtype} -> F16 (rows of {shape[-1]} not divisible by "
                             f"{GGUF_BLOCKS[qtype][0]})")
            qtype = "F16"
        planned.append(_Planned(tname, shape, qtype))
    return planned, fallbacks


def _declare(writer: Any, tensor: _Planned) -> None:
    """The tensor's info as ``GGUFWriter.add_tensor`` records it for the encoded array (so the header is the
    same whether the data is held or streamed)."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    if tensor.qtype in ("F32", "F16"):
        dtype = np.dtype(np.float32 if tensor.qtype == "F32" else np.float16)
        writer.add_tensor_info(tensor.name, tensor.shape, dtype, int(np.prod(tensor.shape)) * dtype.itemsize)
        return
    kind = gguf.GGMLQuantizationType[tensor.qtype]
    byte_shape = quant_shape_to_byte_shape(tensor.shape, kind)
    writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)


def _encode_tensor(tensor: torch.Tensor, want: _Planned) -> np.ndarray:
    """``_encode`` of a tensor held in any dtype, a float32 copy of one slice of its first dimension at a time
    (3D expert tensors): every type encodes rows of the last dimension, so the slices' bytes are the whole's."""
    if tensor.dim() < 3:
        return _encode_slice(tensor, want)
    out: np.ndarray | None = None
    for index, part in enumerate(tensor):
        encoded = _encode_slice(part, want)
        if out is None:
            out = np.empty((tensor.shape[0], *encoded.shape), encoded.dtype)
        out[index] = encoded
    assert out is not None
    return out


def _encode_slice(tensor: torch.Tensor, want: _Planned) -> np.ndarray:
    data = tensor.to(torch.float32)
    if want.exact:
        _check_exact(data, want)
    return _encode(data.contiguous().numpy(), want.qtype)


def _check_exact(tensor: torch.Tensor, want: _Planned) -> None:
    torch_type = {"BF16": torch.bfloat16, "F16": torch.float16}[want.qtype]
    if not torch.equal(tensor.to(torch_type).to(torch.float32), tensor):
        raise RuntimeError(f"{want.name}: not exactly a {want.qtype} tensor after its layout transform; the "
                           "llama-quantize intermediate would round it")


def _moe_shape(model: nn.Module) -> MoeShape:
    """(experts per layer, top-k, expert intermediate size): llama.cpp has one of each for all layers."""
    from moeslim.models.expert_math import expert_weight_views

    layers = find_moe_layers(model)
    padding = expert_padding(model)  # refuses unequal counts a router cannot pad
    n_experts = padding.width if padding is not None else layers[0].num_experts
    views = [expert_weight_views(layer) for layer in layers]
    sizes = {int(v.down.shape[1] if v.transposed else v.down.shape[2]) for v in views}  # (E, I, H) or (E, H, I)
    if len(sizes) != 1:
        raise UnsupportedExportError(f"llama.cpp needs one expert intermediate size; this model has {sorted(sizes)}")
    return MoeShape(n_experts, int(layers[0].top_k), next(iter(sizes)))


def _write_file(tensors: Tensors, planned: list[_Planned], config: Any, vocab: GgufVocab,
                hparams: dict[str, Any], path: Path, arch: GgufArch, default: str, name: str,
                progress: bool = False, padding: ExpertPadding | None = None) -> None:
    """Write the GGUF at ``path``: header and tensor infos from ``planned`` (``_plan_types``), then the data.

    ``tensors()`` is read once more, for the data: each tensor is encoded and written before the next is read,
    so the file is the same whether the tensors are held or streamed from the shards, and memory is one tensor
    (plus what ``tensors`` holds).
    """
    import gguf

    writer = gguf.GGUFWriter(str(path), arch.name)
    writer.add_name(name)
    _write_hparams(writer, hparams)
    ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{default}", gguf.LlamaFileType.ALL_F32)
    writer.add_file_type(int(ftype))
    write_vocab(writer, vocab)
    for info in planned:
        _declare(writer, info)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    count = len(planned)
    order = iter(planned)
    data = _gguf_tensors(tensors(), config, arch, padding)
    for tname, tensor, _ in steps(data, "gguf", count, unit="tensors", enabled=progress,
                                  every=max(1, -(-count // 10))):
        want = next(order, None)
        if want is None or want.name != tname or want.shape != tuple(tensor.shape):
            raise RuntimeError(f"tensor {tname} {tuple(tensor.shape)} is not the one declared next ({want})")
        writer.write_tensor_data(_encode_tensor(tensor, want))
    if next(order, None) is not None:
        raise RuntimeError("fewer tensors were read than declared")
    writer.close()


def read_gguf_types(path: str | Path) -> dict[str, str]:
    """{tensor name: type name} as stored in a GGUF file."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def _llama_quantize(binary: Path, src: Path, dst: Path, ftype: str, overrides: dict[str, str],
                    imatrix: Path | None, workdir: Path) -> None:
    """Requantize ``src`` (F32) to ``dst`` with llama.cpp's quantizer: ``ftype`` for every tensor without an
    exact-name override (anchored regexes, one per planned tensor)."""
    cmd = [str(binary)]
    if overrides:
        spec = workdir / "tensor-types.txt"
        spec.write_text("".join(f"^{re.escape(n)}$={t.lower()}\n" for n, t in sorted(overrides.items())))
        cmd += ["--tensor-type-file", str(spec)]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(src), str(dst), ftype]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=_QUANTIZE_TIMEOUT_S, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout)[-2000:]
        raise RuntimeError(f"llama-quantize failed (exit {result.returncode}): {' '.join(cmd)}\n{tail}")


def export_gguf(model: nn.Module, tokenizer: Any, out: str | Path, *, qtype: str = "F16", plan: Plan | None = None,
                llama_quantize: str | Path | None = None, imatrix: str | Path | None = None,
                name: str | None = None, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                progress: bool = False, top_k: int | None = None) -> GgufExport:
    """Write ``model`` as a GGUF file at ``out`` (atomically: temp file in the same folder, then rename).

    qtype: type of every matrix without a plan type (F16 default; K-quant types and presets need
        ``llama_quantize``). plan: a ``scope="gguf"`` quantize plan for this model (per-tensor expert types).
    llama_quantize: path of llama.cpp's ``llama-quantize``; imatrix: an importance matrix file for it.
    inputs: paths the output must not overwrite (the model folder, the plan); overwrite: replace an existing file.
    ``export.streamed.export_gguf_streamed`` writes the same file from a checkpoint folder one layer at a time.
    top_k: a reduced top-k written as ``expert_used_count`` (``gguf_topk``); a model that skips per token is refused.
    """
    with output_lock(out):
        return write_gguf(model, tokenizer, lambda: model_tensors(model), out, qtype=qtype, plan=plan,
                          llama_quantize=llama_quantize, imatrix=imatrix, name=name, inputs=inputs,
                          overwrite=overwrite, progress=progress, top_k=top_k)


def write_gguf(model: nn.Module, tokenizer: Any, tensors: Tensors, out: str | Path, *, qtype: str, plan: Plan | None,
               llama_quantize: str | Path | None, imatrix: str | Path | None, name: str | None,
               inputs: Iterable[str | Path], overwrite: bool, progress: bool, top_k: int | None = None
               ) -> GgufExport:
    """``export_gguf`` with the tensors given apart from ``model`` (whose config, layers and shapes are read; its
    decoder layers may be on the meta device). Everything is checked and every tensor declared before writing.

    With ``llama_quantize`` the file handed to llama-quantize holds each matrix in the 16-bit type its source
    tensor is held in (a bfloat16 checkpoint streamed: BF16; float16: F16), else F32. That loses nothing: the
    values are that type's by construction (and checked as written), the quantizer reads every tensor as float32
    before quantizing, so its output is what it makes from an F32 file, and the intermediate is half the size.
    """
    config = _config(model)
    arch = gguf_family(config)
    check_no_skipping(model)
    default = _check_qtype(qtype)
    target = check_output_file(out, overwrite=overwrite, inputs=inputs)
    overrides = plan_tensor_types(model, plan) if plan is not None else {}
    needs_llama = default not in GGUF_DIRECT_TYPES or any(t not in GGUF_DIRECT_TYPES for t in overrides.values())
    if imatrix is not None and not needs_llama and llama_quantize is None:
        raise UnsupportedExportError("--imatrix is used by llama.cpp's quantizer: pass --llama-quantize too")
    binary = Path(llama_quantize) if llama_quantize is not None else None
    if needs_llama and binary is None:
        wanted = sorted({default, *overrides.values()} - set(GGUF_DIRECT_TYPES))
        raise UnsupportedExportError(f"types {', '.join(wanted)} need llama.cpp's quantizer (gguf-py cannot write "
                                     "them): pass --llama-quantize PATH of the llama-quantize program")
    if binary is not None and not (binary.is_file() and os.access(binary, os.X_OK)):
        raise UnsupportedExportError(f"--llama-quantize {binary}: not an executable file")
    if imatrix is not None and not Path(imatrix).is_file():
        raise UnsupportedExportError(f"--imatrix {imatrix}: no such file")
    moe = reduced_top_k(_moe_shape(model), top_k)
    hparams = arch.hparams(config, moe)
    padding = expert_padding(model)  # unequal per-layer expert counts: every layer padded to the largest
    # every tensor named and typed (refusing one llama.cpp has no slot for) before any writing
    planned, fallbacks = _plan_types(tensors, config, arch, default, overrides, intermediate=binary is not None,
                                     padding=padding)
    # the tokenizer is read (and refused) before any writing
    vocab = arch.vocab(gguf_vocab(tokenizer, int(config.vocab_size), config), config)
    title = name or str(getattr(config, "_name_or_path", "") or config.model_type)
    dest = Path(target).expanduser().resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir_beside(dest) as tmp:
        work = Path(tmp)
        staged = work / "out.gguf"
        if binary is None:
            _write_file(tensors, planned, config, vocab, hparams, staged, arch, default, title, progress, padding)
            quantizer = "gguf-py"
            types = {t.name: t.qtype for t in planned}  # as written (reading a file back parses the whole vocab)
        else:
            source = work / "intermediate.gguf"
            _write_file(tensors, planned, config, vocab, hparams, source, arch, "F32", title, progress, padding)
            _llama_quantize(binary, source, staged, default, overrides,
                            Path(imatrix) if imatrix is not None else None, work)
            quantizer = "llama-quantize"
            types = read_gguf_types(staged)  # the types llama.cpp's quantizer chose
        os.replace(staged, dest)
    return GgufExport(Path(target), types, moe.n_experts, moe.top_k, fallbacks, quantizer)
