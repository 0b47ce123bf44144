"""Compute with low-rank experts: storage, the ``moeslim_lowrank`` experts forward, save and load.

``install_lowrank(experts, name, projections)`` replaces the fused parameter ``name`` (``gate_up_proj`` /
``up_proj`` / ``down_proj``) of a transformers experts module by a ``LowRankProjection`` kept in the child
``experts.moeslim_lowrank[name]``: per expert either the dense matrix ``w{e}`` (out, in) or factors ``a{e}``
(out, r) and ``b{e}`` (r, in), in (out, in) orientation whatever the family's layout; with a shared ``base``
(out, in) (D2-MoE) expert e computes base + its own (dense or factored) delta. Two options serve merged and
compressed experts (MC-SMoE): ``sparse_rows`` keeps per stored expert j a few rows ``s{j}`` (k, in) of its
residual at output rows ``rows{j}`` (k,) (low-rank + structured sparse), and ``slots`` (E,) maps each router
slot to the stored expert it computes (K stored for E slots: the router keeps its rows). With ``bases`` m > 0
(MoBE) every expert keeps only ``a{e}`` (out, r): its B_e = sum_j mix[e, j] basis[j] mixes m bases (m, r, in)
shared by the layer's experts. The attribute ``name``
becomes a meta-device placeholder of the original shape (no bytes; any use of it fails loudly). The experts
forward ``moeslim_lowrank`` (registered in transformers' ``ALL_EXPERTS_FUNCTIONS``) computes only the routed
experts, x -> (x B^T) A^T, with the module's own gate, biases and post-expert norm; under skipping
(``moeslim_skip``) it becomes skipping's inner implementation.

Saved format (``save_lowrank``): ``config.json`` with the ``moeslim.lowrank`` section (ranks per layer and
expert), and ``moeslim_lowrank.safetensors`` holding the whole state dict: every non-expert tensor under its
usual name and the factors as ``...experts.moeslim_lowrank.{name}.{a,b,w}{e}`` (tied aliases written once,
listed in the metadata). The file is deliberately not ``model.safetensors``: stock ``from_pretrained`` cannot
run factored experts and must not load a model with random experts; ``moeslim.load`` builds the model on the
meta device, installs empty projections of the recorded ranks and loads the file into them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeslim.methods.whitened_svd import is_dense
from moeslim.models import find_moe_layers
from moeslim.models.expert_math import expert_weight_views
from moeslim.runtime.checkpoint_files import (
    materialize_buffers,
    read_tensors,
    saved_tokenizer,
    write_config,
    write_tensors,
)
from moeslim.runtime.nonuniform import cut_compact
from moeslim.runtime.routed_experts import attach_part, fallback_forward, routed_forward, stored_parts

__all__ = ["IMPLEMENTATION", "LOWRANK_FILE", "STORE", "LowRankProjection", "install_lowrank", "load_lowrank",
           "lowrank_storage", "save_lowrank"]

IMPLEMENTATION = "moeslim_lowrank"
STORE = "moeslim_lowrank"
LOWRANK_FILE = "moeslim_lowrank.safetensors"

class LowRankProjection(nn.Module):
    """One fused projection of E experts, each dense (out, in) or factored (out, r) x (r, in), optionally added to
    a ``base`` (out, in) shared by the layer's experts (then rank 0 means the base alone)."""

    def __init__(self, out: int, inp: int, ranks: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, shared_base: bool = False,
                 sparse_rows: Sequence[int] | None = None, slots: Sequence[int] | None = None,
                 bases: int = 0) -> None:
        super().__init__()
        self.out_features, self.in_features = int(out), int(inp)
        self.ranks = [int(r) for r in ranks]
        self.shared_base = bool(shared_base)
        self.bases = int(bases)
        self.sparse_rows = [0] * len(self.ranks) if sparse_rows is None else [int(k) for k in sparse_rows]
        self.slots = list(range(len(self.ranks))) if slots is None else [int(j) for j in slots]
        if len(self.sparse_rows) != len(self.ranks) or not all(0 <= k <= out for k in self.sparse_rows):
            raise ValueError(f"need one sparse row count in [0, {out}] per stored expert ({len(self.ranks)})")
        if not all(0 <= j < len(self.ranks) for j in self.slots):
            raise ValueError(f"slots {self.slots} must name stored experts 0..{len(self.ranks) - 1}")
        for j, k in enumerate(self.sparse_rows):
            if k:
                self.register_parameter(f"s{j}", nn.Parameter(torch.empty(k, inp, dtype=dtype, device=device),
                                                              requires_grad=False))
                self.register_buffer(f"rows{j}", torch.empty(k, dtype=torch.long, device=device))
        if self.shared_base:
            self.base = nn.Parameter(torch.empty(out, inp, dtype=dtype, device=device), requires_grad=False)
        if self.bases:
            if len(set(self.ranks)) != 1 or not 1 <= self.ranks[0] <= inp:
                raise ValueError(f"shared bases need one rank in [1, {inp}] for every expert, got {self.ranks}")
            r = self.ranks[0]
            self.basis = nn.Parameter(torch.empty(self.bases, r, inp, dtype=dtype, device=device), requires_grad=False)
            self.mix = nn.Parameter(torch.empty(len(self.ranks), self.bases, dtype=dtype, device=device),
                                    requires_grad=False)
        for e, r in enumerate(self.ranks):
            if self.bases:
                self.register_parameter(f"a{e}", nn.Parameter(torch.empty(out, r, dtype=dtype, device=device),
                                                              requires_grad=False))
            elif is_dense(r, out, inp):
                self.register_parameter(f"w{e}", nn.Parameter(torch.empty(out, inp, dtype=dtype, device=device),
                                                              requires_grad=False))
            else:
                self.register_parameter(f"a{e}", nn.Parameter(torch.empty(out, r, dtype=dtype, device=device),
                                                              requires_grad=False))
                self.register_parameter(f"b{e}", nn.Parameter(torch.empty(r, inp, dtype=dtype, device=device),
                                                              requires_grad=False))

    @classmethod
    def from_projections(cls, projections: Sequence[tuple[Tensor, ...]], dtype: torch.dtype,
                         device: torch.device | str | None = None, base: Tensor | None = None,
                         sparse: Sequence[tuple[Tensor, Tensor] | None] | None = None,
                         slots: Sequence[int] | None = None, bases: tuple[Tensor, Tensor] | None = None
                         ) -> LowRankProjection:
        """From per-expert ``(W,)`` (out, in) or ``(A, B)`` tuples; with ``base`` (out, in) they are deltas.

        ``sparse``: per stored expert None or (rows (k,) long, values (k, in)) added to those output rows;
        ``slots`` (E,): the stored expert of each router slot (None: one per slot); ``bases``: (bases (m, r, in),
        mix (E, m)) shared by the experts, whose B of each ``(A, B)`` is then not stored."""
        first = projections[0]
        out = int(first[0].shape[0])
        inp = int(first[0].shape[1] if len(first) == 1 else first[1].shape[1])
        ranks = [min(out, inp) if len(p) == 1 else int(p[0].shape[1]) for p in projections]
        counts = None if sparse is None else [0 if s is None else int(s[0].numel()) for s in sparse]
        module = cls(out, inp, ranks, dtype, device, shared_base=base is not None, sparse_rows=counts, slots=slots,
                     bases=0 if bases is None else int(bases[0].shape[0]))
        with torch.no_grad():
            if base is not None:
                module.base.copy_(base)
            if bases is not None:
                module.basis.copy_(bases[0])
                module.mix.copy_(bases[1])
                for e, p in enumerate(projections):
                    getattr(module, f"a{e}").copy_(p[0])
                return module
            for j, part in enumerate(sparse or []):
                if part is not None and part[0].numel():
                    getattr(module, f"rows{j}").copy_(part[0])
                    getattr(module, f"s{j}").copy_(part[1])
            for e, p in enumerate(projections):
                if len(p) == 1:
                    getattr(module, f"w{e}").copy_(p[0])
                else:
                    getattr(module, f"a{e}").copy_(p[0])
                    getattr(module, f"b{e}").copy_(p[1])
        return module

    def is_dense(self, e: int) -> bool:
        """Whether stored expert e is kept as its dense matrix."""
        return f"w{e}" in self._parameters

    def _b(self, j: int) -> Tensor:
        """(r, in) stored expert j's right factor: its own, or its mixture of the shared bases."""
        if self.bases:
            return torch.einsum("m,mri->ri", self.mix[j], self.basis)
        return getattr(self, f"b{j}")

    def matmul(self, e: int, x: Tensor) -> Tensor:
        """x (n, in) -> (n, out) through router slot e."""
        j = self.slots[e]
        if self.is_dense(j):
            own = F.linear(x, getattr(self, f"w{j}").to(x.dtype))
        else:
            own = F.linear(F.linear(x, self._b(j).to(x.dtype)), getattr(self, f"a{j}").to(x.dtype))
        if self.sparse_rows[j]:
            own = own.index_add(1, getattr(self, f"rows{j}"), F.linear(x, getattr(self, f"s{j}").to(x.dtype)))
        return own + F.linear(x, self.base.to(x.dtype)) if self.shared_base else own

    def weight(self, e: int) -> Tensor:
        """(out, in) the matrix router slot e computes with."""
        j = self.slots[e]
        own = getattr(self, f"w{j}") if self.is_dense(j) else getattr(self, f"a{j}") @ self._b(j)
        if self.sparse_rows[j]:
            own = own.index_add(0, getattr(self, f"rows{j}"), getattr(self, f"s{j}"))
        return own + self.base if self.shared_base else own

    def params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lowrank_storage(module: nn.Module) -> dict[str, LowRankProjection]:
    return stored_parts(module, STORE, LowRankProjection)


def lowrank_experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
                            ) -> Tensor:
    """hidden_states (T, H), top_k_index / top_k_weights (T, k) -> (T, H), only routed experts computed."""
    store = lowrank_storage(self)
    if not store:  # a layer left dense
        return fallback_forward(self, hidden_states, top_k_index, top_k_weights)
    return routed_forward(self, hidden_states, top_k_index, top_k_weights, store)


def install_lowrank(experts: nn.Module, name: str, projection: LowRankProjection) -> None:
    """Replace fused parameter ``name`` of ``experts`` by ``projection`` and compute through it."""
    current = experts._parameters.get(name)
    if current is None:
        raise ValueError(f"{type(experts).__name__} has no parameter {name!r} to replace")
    if not (hasattr(experts, "has_gate") and hasattr(experts, "config")):
        raise TypeError(f"{type(experts).__name__} is not a transformers fused experts module")
    transposed = bool(getattr(experts, "is_transposed", False))
    expected = (current.shape[0], projection.in_features, projection.out_features) if transposed else (
        current.shape[0], projection.out_features, projection.in_features)
    if tuple(current.shape) != tuple(expected) or len(projection.slots) != current.shape[0]:
        raise ValueError(f"low-rank {name} for shape {expected} does not fit {tuple(current.shape)}")
    attach_part(experts, STORE, name, projection, tuple(current.shape), current.dtype, IMPLEMENTATION,
                lowrank_experts_forward)


def _shapes(experts: nn.Module, name: str) -> tuple[int, int]:
    """(out, in) of one expert's ``name`` projection, from the (placeholder) fused parameter."""
    w = getattr(experts, name)
    transposed = bool(getattr(experts, "is_transposed", False))
    return (int(w.shape[2]), int(w.shape[1])) if transposed else (int(w.shape[1]), int(w.shape[2]))


def install_empty(model: nn.Module, layers: Mapping[str, Mapping[str, Any]], dtype: torch.dtype) -> None:
    """Install uninitialised projections of the recorded ranks ({layer: {"up_ranks", "down_ranks"}, and
    "shared_base": true for D2-MoE layers, "bases": m for MoBE layers; merged and compressed experts:
    "up_sparse_rows", "down_sparse_rows" per stored expert and "slots" per router slot})."""
    found = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    for idx, entry in layers.items():
        layer = found[int(idx)]
        views = expert_weight_views(layer)
        for name, kind in ((views.up_name, "up"), (views.down_name, "down")):
            out, inp = _shapes(layer.experts, name)
            install_lowrank(layer.experts, name, LowRankProjection(
                out, inp, entry[f"{kind}_ranks"], dtype, device="meta", shared_base=bool(entry.get("shared_base")),
                sparse_rows=entry.get(f"{kind}_sparse_rows"), slots=entry.get("slots"),
                bases=int(entry.get("bases", 0))))


def save_lowrank(model: nn.Module, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json and ``moeslim_lowrank.safetensors`` (the whole state dict) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tensors(model.state_dict(), out / LOWRANK_FILE, dtype)
    write_config(model, out, dtype)


def load_lowrank(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                 ) -> tuple[nn.Module, Any]:
    """(model computing with its low-rank experts, tokenizer or None) from a ``save_lowrank`` folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(path)
    if not (root / LOWRANK_FILE).is_file():
        raise FileNotFoundError(f"{root} is not a moeslim low-rank checkpoint: {LOWRANK_FILE} is missing")
    config = AutoConfig.from_pretrained(root, trust_remote_code=False)
    section = (getattr(config, "moeslim", None) or {}).get("lowrank") or {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    cut_compact(model, config)  # pruned to unequal counts first (a joint plan): the layers' kept experts
    install_empty(model, section.get("layers", {}), dtype)
    tensors, aliases = read_tensors(root / LOWRANK_FILE)
    state = model.state_dict(keep_vars=True)
    left, unexpected = set(state) - set(tensors), set(tensors) - set(state)
    if left or unexpected:
        raise ValueError(f"{root}: tensors missing {sorted(left)[:5]} / unexpected {sorted(unexpected)[:5]}")
    tensors = {k: v.to(state[k].dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    materialize_buffers(model, root)
    if aliases:
        model.tie_weights()
    return model.to(device).eval(), saved_tokenizer(root)
