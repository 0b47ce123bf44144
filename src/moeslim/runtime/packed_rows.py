"""Token embedding and output head held packed: one (V, H) matrix as low-bit codes that stay packed in memory.

A token embedding (``nn.Embedding``, weight (V, H)) and an output head (``nn.Linear`` H -> V, weight (V, H)) hold
the same kind of matrix, tied or not. ``PackedRows`` holds it as round-to-nearest codes with asymmetric min-max
groups along the hidden dimension (the ``LowBitTensor`` format of one (out=V, in=H) matrix, the experts' format):

- codes packed per row (a row's H codes fill H * b / 8 whole bytes: H * b must be a multiple of 8), so a lookup
  gathers the codes of its token rows and dequantizes only those (``rows``);
- float16 group scales (V, G) and uint8 zero points (V, G), one per row and group (the zero points unpacked: a
  row's G * b bits need not be whole bytes; G = H / group size is small);
- the head computes x @ W^T from the same storage, dequantizing ``HEAD_CHUNK`` vocabulary rows at a time
  (``matmul``), so a float copy of the whole matrix never exists.

``install_rows(module, storage)`` replaces the ``weight`` of an ``nn.Embedding`` (-> ``LowBitEmbedding``) or an
``nn.Linear`` (-> ``LowBitHead``) by ``storage``, kept in the child ``module.moeslim_rows["weight"]``; a tied
embedding and head get the same ``PackedRows`` object, so its buffers are one storage, counted once in the held
bytes. Dequantization equals ``LowBitTensor.dequantize`` bit for bit (``gptq.dequantize``'s float32 arithmetic).
Shapes: V vocabulary rows, H hidden, G groups per row, n looked-up tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeslim.methods.quant.fused import KEEP_BITS, LowBitTensor, quantize_fused
from moeslim.methods.quant.pack import pack_bits
from moeslim.runtime.packed import fast_unpack
from moeslim.runtime.routed_experts import store_part, stored_parts

__all__ = ["HEAD_CHUNK", "ROWS_STORE", "LowBitEmbedding", "LowBitHead", "PackedRows", "check_rows_shape",
           "install_rows", "packed_rows", "quantize_rows", "rows_storage"]

ROWS_STORE = "moeslim_rows"  # child nn.ModuleDict {"weight": PackedRows}
HEAD_CHUNK = 4096  # vocabulary rows the head dequantizes at a time


def check_rows_shape(n_in: int, bits: int) -> None:
    """Raise ValueError when rows of ``n_in`` values at ``bits`` cannot be held packed per row."""
    if not 1 <= bits <= 8:
        raise ValueError(f"packed rows take widths 1..8, not {bits}")
    if (n_in * bits) % 8:
        raise ValueError(f"a row of {n_in} values at {bits} bits is not whole bytes: packed rows need "
                         "hidden size * bits to be a multiple of 8")


class PackedRows(nn.Module):
    """A (V, H) float matrix held as per-row packed codes, float16 group scales and uint8 zero points."""

    codes: Tensor  # (V, H * b / 8) uint8
    scales: Tensor  # (V, G) float16 viewed as int16 (module dtype casts leave it alone)
    zeros: Tensor  # (V, G) uint8

    def __init__(self, packed: LowBitTensor) -> None:
        super().__init__()
        if packed.shape[0] != 1 or packed.transposed or packed.symmetric or packed.bits[0] == KEEP_BITS:
            raise ValueError("PackedRows holds one asymmetric (out, in) matrix at 1..8 bits")
        n_out, n_in = packed.out_in
        self.bits, self.group_size, self.dtype = int(packed.bits[0]), packed.group_size, packed.dtype
        check_rows_shape(n_in, self.bits)
        self.n_out, self.n_in, self.n_groups = n_out, n_in, packed.n_groups
        # the canonical stream is row-major over (out, in): with whole-byte rows it is the per-row layout already
        self.register_buffer("codes", packed.stream("codes", 0).reshape(n_out, n_in * self.bits // 8).clone(),
                             persistent=False)
        self.register_buffer("scales", packed.stream("scales", 0).contiguous().view(torch.int16).clone(),
                             persistent=False)
        self.register_buffer("zeros", packed.zero_points(0).contiguous(), persistent=False)
        self.canonical_bytes = packed.nbytes()

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_out, self.n_in

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _dequantize(self, codes: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype) -> Tensor:
        """(n, H * b / 8) codes, (n, G) scales / zeros -> (n, H) in ``dtype``."""
        n = codes.shape[0]
        c = fast_unpack(codes.reshape(-1), self.bits, n * self.n_in).reshape(n, self.n_in)
        cols = torch.arange(self.n_in, device=c.device) // min(self.group_size, self.n_in)
        s = scales.view(torch.float16).float()[:, cols]
        z = zeros.float()[:, cols]
        return (s * (c.float() - z)).to(dtype)

    def rows(self, ids: Tensor) -> Tensor:
        """ids (...) int64 -> (..., H): the dequantized rows of ``ids`` only."""
        flat = ids.reshape(-1)
        out = self._dequantize(self.codes[flat], self.scales[flat], self.zeros[flat], self.dtype)
        return out.reshape(*ids.shape, self.n_in)

    def dequantize(self) -> Tensor:
        """(V, H) the whole matrix in its dtype (tests, export checks)."""
        return self._dequantize(self.codes, self.scales, self.zeros, self.dtype)

    def matmul(self, x: Tensor) -> Tensor:
        """x (..., H) -> (..., V) = x @ W^T, ``HEAD_CHUNK`` rows of W dequantized at a time."""
        flat = x.reshape(-1, x.shape[-1])
        parts = []
        for start in range(0, self.n_out, HEAD_CHUNK):
            sl = slice(start, min(start + HEAD_CHUNK, self.n_out))
            w = self._dequantize(self.codes[sl], self.scales[sl], self.zeros[sl], x.dtype)
            parts.append(F.linear(flat, w))
        return torch.cat(parts, dim=-1).reshape(*x.shape[:-1], self.n_out)

    def to_lowbit(self) -> LowBitTensor:
        """The canonical ``LowBitTensor`` (1, V, H) on CPU, bit-exact, for saving."""
        zeros = pack_bits(self.zeros.cpu(), self.bits)
        return LowBitTensor((1, self.n_out, self.n_in), [self.bits], self.group_size, False, self.dtype,
                            [self.codes.cpu().reshape(-1).clone()], [self.scales.cpu().view(torch.float16).clone()],
                            [zeros], [None], False)


def quantize_rows(weight: Tensor, bits: int, group_size: int) -> LowBitTensor:
    """(V, H) weight -> its round-to-nearest ``LowBitTensor`` (1, V, H), groups along H (raises ValueError when
    its rows cannot be held packed)."""
    check_rows_shape(int(weight.shape[1]), int(bits))
    return quantize_fused(weight.detach()[None], [int(bits)], group_size, None, "rtn")


def rows_storage(module: nn.Module) -> PackedRows | None:
    """The ``PackedRows`` ``module`` computes from (None when it holds none)."""
    return stored_parts(module, ROWS_STORE, PackedRows).get("weight")


def packed_rows(model: nn.Module) -> dict[str, PackedRows]:
    """{qualified weight name: PackedRows} of every module holding packed rows (a tied pair: two names, one
    object)."""
    found = {}
    for name, module in model.named_modules(remove_duplicate=False):
        storage = rows_storage(module)
        if storage is not None:
            found[f"{name}.weight" if name else "weight"] = storage
    return found


class LowBitEmbedding(nn.Embedding):
    """``nn.Embedding`` whose weight lives packed in ``moeslim_rows["weight"]``: a lookup dequantizes its rows."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's signature
        storage = rows_storage(self)
        if storage is None:
            raise RuntimeError("LowBitEmbedding holds no packed rows")
        return storage.rows(input)


class LowBitHead(nn.Linear):
    """``nn.Linear`` (no bias) whose weight lives packed in ``moeslim_rows["weight"]``."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear's signature
        storage = rows_storage(self)
        if storage is None:
            raise RuntimeError("LowBitHead holds no packed rows")
        return storage.matmul(input)


def install_rows(module: nn.Module, storage: PackedRows) -> None:
    """Replace the weight of a plain ``nn.Embedding`` or bias-free ``nn.Linear`` by ``storage`` (its attribute a
    meta placeholder of the same shape) and compute from it. Raises TypeError / ValueError on anything else."""
    if type(module) in (nn.Embedding, LowBitEmbedding):
        if getattr(module, "max_norm", None) is not None:
            raise ValueError("an nn.Embedding with max_norm renormalises its rows in place; it cannot be packed")
        cls: type[nn.Module] = LowBitEmbedding
    elif type(module) in (nn.Linear, LowBitHead):
        if getattr(module, "bias", None) is not None:
            raise ValueError("packed rows serve bias-free output heads only")
        cls = LowBitHead
    else:
        raise TypeError(f"cannot pack {type(module).__name__}: only plain nn.Embedding and nn.Linear heads")
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and tuple(weight.shape) != storage.shape:
        raise ValueError(f"packed rows of shape {storage.shape} do not fit a weight of shape {tuple(weight.shape)}")
    store_part(module, ROWS_STORE, "weight", storage, storage.shape, storage.dtype)
    module.__class__ = cls
