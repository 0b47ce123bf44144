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
file is then written in F32 and requantized by it with one ``--tensor-type`` override per planned tensor
(and ``--imatrix``). A tensor whose rows do not divide into the type's blocks is stored as F16 (what
llama.cpp does); the result lists every such fallback, and the types actually in the file are read back.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Iterator
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
from moeslim.export.gguf_pad import expert_padding, pad_expert_tensor
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


def _gguf_tensors(model: nn.Module, arch: GgufArch, progress: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in PyTorch order) for every tensor, in the architecture's layout.
    ``progress``: a line on stderr every ~10 % of the tensors (each is encoded before the next is read)."""
    config = _config(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = tensor_name_map(arch, int(config.num_hidden_layers))
    from moeslim.runtime.lowbit_io import lowbit_tensors

    # A moeslim-quantized model keeps its packed experts outside the state dict: write them dequantized (the
    # GGUF type then re-quantizes them; F32 holds them exactly).
    tensors = {**model.state_dict(), **{name: t.dequantize() for name, t in lowbit_tensors(model).items()}}
    count = len(tensors)
    padding = expert_padding(model)  # unequal per-layer expert counts: every layer padded to the largest
    for key, tensor in steps(tensors.items(), "gguf", count, unit="tensors", enabled=progress,
                             every=max(1, -(-count // 10))):
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output is absent
        for hf_key, data in arch.transform(key, tensor.detach().to(torch.float32).cpu(), config):
            gname = gguf_tensor_name(names, hf_key)
            yield gname, pad_expert_tensor(gname, data, padding).contiguous().numpy()


def _check_tensor_names(model: nn.Module, arch: GgufArch) -> None:
    """Refuse, before any work, a tensor llama.cpp has no slot for: the transforms run on meta copies (shapes
    only), so every name is known without touching the data."""
    config = _config(model)
    names = tensor_name_map(arch, int(config.num_hidden_layers))
    for key, tensor in model.state_dict().items():
        for hf_key, _ in arch.transform(key, tensor.detach().to("meta"), config):
            gguf_tensor_name(names, hf_key)


def _write_hparams(writer: Any, items: dict[str, Any]) -> None:
    for method, value in items.items():
        getattr(writer, method)(value)


def _keeps_f32(name: str, data: np.ndarray) -> bool:
    """Tensors the converter (and llama.cpp's quantizer) never store below F32: 1D tensors, norms, biases and
    other non-``.weight`` tensors, the routers."""
    return (data.ndim <= 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight"))
            or not name.endswith(".weight"))


def _encode(data: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """(array to store, raw_dtype or None) for ``qtype``, quantized by gguf-py."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if qtype == "F32":
        return data.astype(np.float32), None
    if qtype == "F16":
        return data.astype(np.float16), None
    kind = GGMLQuantizationType[qtype]
    return quantize(data.astype(np.float32), kind), kind


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


def _write_file(model: nn.Module, vocab: GgufVocab, hparams: dict[str, Any], path: Path, arch: GgufArch, default: str,
                overrides: dict[str, str], name: str, progress: bool = False) -> list[str]:
    """Write the GGUF at ``path``; returns the tensors that fell back to F16 (rows not divisible by blocks)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch.name)
    writer.add_name(name)
    _write_hparams(writer, hparams)
    ftype = getattr(gguf.LlamaFileType, f"MOSTLY_{default}", gguf.LlamaFileType.ALL_F32)
    writer.add_file_type(int(ftype))
    write_vocab(writer, vocab)
    fallbacks: list[str] = []
    for tname, data in _gguf_tensors(model, arch, progress):
        qtype = "F32" if _keeps_f32(tname, data) else overrides.get(tname, default)
        if data.shape[-1] % GGUF_BLOCKS[qtype][0]:
            fallbacks.append(f"{tname}: {qtype} -> F16 (rows of {data.shape[-1]} not divisible by "
                             f"{GGUF_BLOCKS[qtype][0]})")
            qtype = "F16"
        stored, raw = _encode(data, qtype)
        writer.add_tensor(tname, stored, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return fallbacks


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
    top_k: a reduced top-k written as ``expert_used_count`` (``gguf_topk``); a model that skips per token is refused.
    """
    with output_lock(out):
        return _export_gguf(model, tokenizer, out, qtype, plan, llama_quantize, imatrix, name, inputs, overwrite,
                            progress, top_k)



def _export_gguf(model: nn.Module, tokenizer: Any, out: str | Path, qtype: str, plan: Plan | None,
                 llama_quantize: str | Path | None, imatrix: str | Path | None, name: str | None,
                 inputs: Iterable[str | Path], overwrite: bool, progress: bool, top_k: int | None = None
                 ) -> GgufExport:
    arch = gguf_family(_config(model))
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
    hparams = arch.hparams(_config(model), moe)
    _check_tensor_names(model, arch)
    # the tokenizer is read (and refused) before any writing
    vocab = arch.vocab(gguf_vocab(tokenizer, int(_config(model).vocab_size), _config(model)), _config(model))
    title = name or str(getattr(_config(model), "_name_or_path", "") or _config(model).model_type)
    dest = Path(target).expanduser().resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir_beside(dest) as tmp:
        work = Path(tmp)
        staged = work / "out.gguf"
        if binary is None:
            fallbacks = _write_file(model, vocab, hparams, staged, arch, default, overrides, title, progress)
            quantizer = "gguf-py"
        else:
            source = work / "f32.gguf"
            fallbacks = _write_file(model, vocab, hparams, source, arch, "F32", {}, title, progress)
            _llama_quantize(binary, source, staged, default, overrides,
                            Path(imatrix) if imatrix is not None else None, work)
            quantizer = "llama-quantize"
        types = read_gguf_types(staged)
        os.replace(staged, dest)
    return GgufExport(Path(target), types, moe.n_experts, moe.top_k, fallbacks, quantizer)
