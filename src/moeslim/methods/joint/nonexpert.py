"""Choice groups for the weights outside the experts: each decoder layer's attention projections, and the token
embedding with the output head (``JointConfig.attention_widths`` / ``embedding_widths``).

At small targets the experts are not the only weights worth shrinking: on the demo model held in bfloat16 (26.5 MiB)
the token embedding (4 MiB, tied with the head) and attention (1.5 MiB) leave an expert budget of about 1.8 bits at
15 % of the bytes; held at 8 bits they leave the experts about 3.5 bits. Each group is held at one width
(round-to-nearest, asymmetric min-max groups along the input / hidden dimension, as ``appliers/nonexpert.py``
packs them), chosen by the MILP (``solve.ChoiceGroup``) beside the experts' options.

Bytes, as ``moeslim.load`` holds them: an attention projection (out, in) at b bits is a one-expert packed tensor
(``sizes._slice_bytes``: codes, scales, zeros and the CPU layout's extras) plus its expert -> group maps; the
embedding / head (V, H) at b bits is ``PackedRows``: V * H * b / 8 code bytes, float16 scales and uint8 zero
points per row and group; a tied pair is one storage, saved once.

Error: the model runs on the first ``probe_windows`` calibration windows with only that group's weights replaced by
their dequantized codes, and the mean KL per token to the original's next-token distribution is measured (as
``probe.py``'s probes). With ``error_scale="kl"`` that is the experts' unit already (an expected KL per token).
With "squared" the experts' errors are summed squared block-output errors over each layer's T_l sample tokens; a
measured KL is priced at the squared error of the experts' own round-to-nearest quantization that costs the same
KL (``kl_price.py``: a curve over widths, measured once on the model as held; an approximation stated, not
measured per group).
Shapes: V vocabulary, H hidden, N windows, S window length.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from moeslim.config import ConfigError
from moeslim.methods.joint.kl_price import squared_price
from moeslim.methods.joint.probe import _kl, _logits
from moeslim.methods.joint.sizes import _slice_bytes
from moeslim.methods.joint.solve import ChoiceGroup, SizeOption
from moeslim.methods.quant.fused import KEEP_BITS, quantize_fused
from moeslim.methods.quant.layout_bytes import map_bytes
from moeslim.models.nonexpert import attention_linears_by_layer, token_matrices

__all__ = ["EMBEDDING", "attention_group", "check_nonexpert", "nonexpert_bytes", "nonexpert_groups",
           "rows_bytes"]

EMBEDDING = "embedding"


def attention_group(idx: int) -> str:
    return f"attention.{idx}"


def _weight(module: nn.Module) -> Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.is_meta:
        raise ConfigError(f"{type(module).__name__} holds no float weight (already packed?): plan the unpacked model")
    return weight


def rows_bytes(n_out: int, n_in: int, bits: int, group_size: int) -> int:
    """Bytes of a (V, H) matrix held as ``PackedRows`` at ``bits``: codes, float16 scales, uint8 zero points."""
    groups = -(-n_in // min(group_size, n_in))
    return n_out * (n_in * bits // 8) + n_out * groups * 3


def _dense(t: Tensor) -> int:
    return int(t.numel()) * t.element_size()


def check_nonexpert(model: nn.Module, attention_widths: Sequence[int], embedding_widths: Sequence[int]) -> None:
    """ConfigError when the model's attention or embedding cannot be held packed at these widths."""
    if attention_widths and not attention_linears_by_layer(model):
        raise ConfigError("attention_widths: found no attention projections (nn.Linear) in the decoder layers; "
                          "drop attention_widths")
    if not embedding_widths:
        return
    matrices = token_matrices(model)
    if type(matrices.embedding) is not nn.Embedding or getattr(matrices.embedding, "max_norm", None) is not None:
        raise ConfigError(f"embedding_widths: the token embedding is a {type(matrices.embedding).__name__}, not a "
                          "plain nn.Embedding (scaled or renormalised lookups are not packed); drop embedding_widths")
    if matrices.head is not None and (type(matrices.head) is not nn.Linear or matrices.head.bias is not None):
        raise ConfigError(f"embedding_widths: the output head is a {type(matrices.head).__name__} with a bias or not "
                          "a plain nn.Linear; drop embedding_widths")
    hidden = int(_weight(matrices.embedding).shape[1])
    odd = [b for b in embedding_widths if b != KEEP_BITS and (hidden * b) % 8]
    if odd:
        raise ConfigError(f"embedding_widths={list(embedding_widths)}: rows of {hidden} values at {odd} bits are not "
                          "whole bytes; use widths w with hidden size * w a multiple of 8")


def nonexpert_bytes(model: nn.Module, attention_widths: Sequence[int], embedding_widths: Sequence[int],
                    group_size: int) -> dict[str, dict[int, int]]:
    """{group name: {width: held bytes saved}} (16 saves 0) on ``model`` as held."""
    out: dict[str, dict[int, int]] = {}
    if attention_widths:
        for idx, linears in attention_linears_by_layer(model).items():
            saved = {}
            for b in attention_widths:
                saved[b] = 0 if b == KEEP_BITS else sum(
                    _dense(w) - _slice_bytes(w, b, group_size, False, False) - map_bytes(1)
                    for w in (_weight(m) for _, m in linears))
            out[attention_group(idx)] = saved
    if embedding_widths:
        matrices = token_matrices(model)
        weights = [_weight(matrices.embedding)]
        if matrices.head is not None and not matrices.tied:
            weights.append(_weight(matrices.head))
        out[EMBEDDING] = {b: 0 if b == KEEP_BITS else sum(
            _dense(w) - rows_bytes(int(w.shape[0]), int(w.shape[1]), b, group_size) for w in weights)
            for b in embedding_widths}
    return out


def _rtn(weight: Tensor, bits: int, group_size: int) -> Tensor:
    """(out, in) -> its round-to-nearest dequantized copy (asymmetric groups along ``in``), same dtype."""
    return quantize_fused(weight.detach()[None], [int(bits)], group_size, None, "rtn").dequantize()[0]


@contextmanager
def _replaced(weights: Sequence[Tensor], values: Sequence[Tensor]) -> Iterator[None]:
    """``weights`` hold ``values`` inside the block, their own values again after it."""
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for w, v in zip(weights, values, strict=True):
                w.copy_(v)
        yield
    finally:
        with torch.no_grad():
            for w, v in zip(weights, saved, strict=True):
                w.copy_(v)


@torch.no_grad()
def nonexpert_groups(model: nn.Module, input_ids: Tensor, savings: Mapping[str, Mapping[int, int]],
                     options: Mapping[int, Sequence[SizeOption]], group_size: int, symmetric: bool,
                     error_scale: str, windows: int, batch_size: int) -> list[ChoiceGroup]:
    """The choice groups of ``savings`` (``nonexpert_bytes``) with their probed errors (in the experts' unit: see
    the module docstring); ``model`` as held, ``input_ids`` (N, S) the calibration windows, ``options`` the
    experts' options (their token counts), ``group_size`` / ``symmetric`` the experts' (for the squared unit)."""
    if not savings:
        return []
    device = next(model.parameters()).device
    batches = list(input_ids[:windows].to(device).split(batch_size))
    refs = [_logits(model, b) for b in batches]

    def kl() -> float:
        return float(torch.cat([_kl(ref, _logits(model, ids)) for ids, ref in zip(batches, refs, strict=True)]
                               ).mean())

    linears = attention_linears_by_layer(model)
    matrices = token_matrices(model)
    groups = []
    measured: dict[str, list[float]] = {}
    for name, saved in savings.items():
        if name == EMBEDDING:
            weights = [_weight(matrices.embedding)]
            if matrices.head is not None and not matrices.tied:
                weights.append(_weight(matrices.head))
        else:
            weights = [_weight(m) for _, m in linears[int(name.split(".")[1])]]
        errors = []
        for b in saved:
            if b == KEEP_BITS:
                errors.append(0.0)
                continue
            with _replaced(weights, [_rtn(w, b, group_size) for w in weights]):
                errors.append(max(kl(), 0.0))
        measured[name] = errors
    price = (lambda kl: kl) if error_scale == "kl" else squared_price(model, batches, refs, options, group_size,
                                                                      symmetric)
    for name, saved in savings.items():
        groups.append(ChoiceGroup(name=name, widths=tuple(int(b) for b in saved),
                                  error=tuple(price(e) for e in measured[name]),
                                  saving=tuple(int(v) for v in saved.values())))
    return groups
