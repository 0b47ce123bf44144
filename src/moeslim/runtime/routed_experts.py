"""What the experts forwards moeslim registers share: the routed-experts loop, part storage, and dispatch.

Low-bit (``lowbit_forward``) and low-rank (``lowrank``) experts keep some projections in a child
``nn.ModuleDict`` of parts that compute ``part.matmul(e, x)`` for expert e; the loop computes only the routed
experts, through a part where there is one and through the fused float tensor otherwise.

Dispatch goes through transformers' extension point: a forward registered in ``ALL_EXPERTS_FUNCTIONS`` and
chosen by the config's experts implementation. transformers keeps that choice in the private
``config._experts_implementation``; ``use_implementation`` is the one place moeslim writes it (the experts of
a layer dispatch on their own config, which can be a text sub-config that ``set_experts_implementation`` of
the whole model does not reach).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moeslim.models.attrs import callable_attr, hf_config
from moeslim.runtime.dense_native import dense_rows

SKIP_IMPLEMENTATION = "moeslim_skip"  # runtime/skipping: decides which (token, expert) pairs run
FALLBACK_IMPLEMENTATION = "grouped_mm"  # transformers' default on CPU, for layers left as they were

T = TypeVar("T", bound=nn.Module)


class ExpertPart(Protocol):
    def matmul(self, e: int, x: Tensor) -> Tensor: ...


def stored_parts(module: nn.Module, store: str, kind: type[T]) -> dict[str, T]:
    """{parameter name: part of type ``kind``} held in ``module``'s child ModuleDict ``store`` (empty when none)."""
    held = module._modules.get(store)
    if not isinstance(held, nn.ModuleDict):
        return {}
    return {name: part for name, part in held.items() if isinstance(part, kind)}


def _config(experts_or_config: Any) -> Any:
    return experts_or_config if not isinstance(experts_or_config, nn.Module) else hf_config(experts_or_config)


def current_implementation(experts_or_config: Any) -> str | None:
    """The experts implementation ``experts`` (or a config) dispatches on (None: transformers' default)."""
    implementation: str | None = _config(experts_or_config)._experts_implementation
    return implementation


def use_implementation(experts_or_config: Any, name: str) -> None:
    """Make ``experts`` (or a config) dispatch to the registered implementation ``name``."""
    config = _config(experts_or_config)
    if config._experts_implementation != name:
        config._experts_implementation = name


def register_forward(name: str, forward: Callable[..., Tensor]) -> None:
    """Register an experts forward under ``name`` in transformers' ``ALL_EXPERTS_FUNCTIONS`` (once)."""
    if name not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(name, forward)


_DROPS_PLACEHOLDER = "moeslim_drops_placeholder"


def drops_placeholder(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Mark an experts forward that computes nothing for the placeholder index ``num_experts`` (its pairs add 0):
    skipping then hands it the original (T, k) routing with skipped pairs pointed at the placeholder, instead of
    gathering the kept pairs into one-expert tokens."""
    setattr(forward, _DROPS_PLACEHOLDER, True)
    return forward


def handles_placeholder(forward: Callable[..., Tensor]) -> bool:
    """Whether ``forward`` was marked with ``drops_placeholder``."""
    return bool(getattr(forward, _DROPS_PLACEHOLDER, False))


def held_implementation(experts: nn.Module) -> str | None:
    """The registered forward of the parts ``experts`` holds, or None for a layer left as it was.

    A part store is named as the implementation that computes through it (``attach_part``), so a layer whose
    parts belong to another runtime than the one its shared config dispatches to (a model with low-rank layers
    and low-bit layers) is handed to its own runtime's forward.
    """
    for name, held in experts._modules.items():
        if isinstance(held, nn.ModuleDict) and len(held) and name in ALL_EXPERTS_FUNCTIONS:
            return name
    return None


def fallback_forward(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
                     ) -> Tensor:
    """The default forward, for a layer left as it was (the implementation is set on a config all layers share).

    Routings that point at the placeholder ``num_experts`` (skipped pairs) take ``routed_forward``, which drops
    them; transformers' grouped_mm reads them only under expert parallelism.
    """
    held = held_implementation(experts)
    if held is not None:  # this layer holds another runtime's parts (low-rank and low-bit layers in one model)
        return ALL_EXPERTS_FUNCTIONS[held](experts, hidden_states, top_k_index, top_k_weights)
    if bool((top_k_index >= int(getattr(experts, "num_experts"))).any()):  # noqa: B009
        return routed_forward(experts, hidden_states, top_k_index, top_k_weights, {})
    return ALL_EXPERTS_FUNCTIONS[FALLBACK_IMPLEMENTATION](experts, hidden_states, top_k_index, top_k_weights)


def store_part(module: nn.Module, store: str, name: str, part: nn.Module, placeholder: tuple[int, ...],
               dtype: torch.dtype) -> None:
    """Keep ``part`` in ``module``'s child ModuleDict ``store`` in place of parameter ``name``, whose attribute becomes
    a meta placeholder of shape ``placeholder`` (code that reads shapes still works; nothing reads its values)."""
    held = module._modules.get(store)
    if not isinstance(held, nn.ModuleDict):
        held = nn.ModuleDict()
        module.add_module(store, held)
    held[name] = part
    module._parameters.pop(name, None)
    object.__setattr__(module, name, torch.empty(placeholder, dtype=dtype, device="meta"))


def attach_part(experts: nn.Module, store: str, name: str, part: nn.Module, placeholder: tuple[int, ...],
                dtype: torch.dtype, implementation: str, forward: Callable[..., Tensor]) -> None:
    """Replace parameter ``name`` of ``experts`` by ``part`` (kept in the child ModuleDict ``store``) and compute
    through ``forward``, registered as ``implementation``.

    The parameter's attribute becomes a meta placeholder (``store_part``). When skipping is installed it keeps
    deciding which pairs run and hands the matmuls to ``implementation`` (its per-module ``moeslim_inner`` state);
    otherwise the experts dispatch to it.
    """
    if store != implementation:
        raise ValueError(f"part store {store!r} must be named as its implementation {implementation!r} "
                         "(fallback_forward dispatches a layer to the runtime of the parts it holds)")
    store_part(experts, store, name, part, placeholder, dtype)
    register_forward(implementation, forward)
    if current_implementation(experts) == SKIP_IMPLEMENTATION:
        setattr(experts, "moeslim_inner", implementation)  # noqa: B010 (a plain attribute on a foreign module)
    else:
        use_implementation(experts, implementation)


def project(experts: nn.Module, name: str, e: int, x: Tensor, parts: Mapping[str, ExpertPart]) -> Tensor:
    """x (n, in) -> (n, out) through expert e's ``name`` projection (+ bias)."""
    if name in parts:
        y = parts[name].matmul(e, x)
    else:
        fused = getattr(experts, name)
        # decode rows of bfloat16 (E, out, in) weights: the native GEMV (torch's bfloat16 F.linear at one row
        # costs several times the arithmetic on small experts); None elsewhere
        native = None if experts.is_transposed else dense_rows(x, fused, [e] * x.shape[0])
        if native is not None:
            y = native
        else:
            w = fused[e]
            y = x @ w.to(x.dtype) if experts.is_transposed else F.linear(x, w.to(x.dtype))
    if getattr(experts, "has_bias", False):
        bias = getattr(experts, f"{name}_bias", None)
        if bias is not None:
            y = y + bias[e].to(y.dtype)
    return y


def expert_output(experts: nn.Module, e: int, x: Tensor, parts: Mapping[str, ExpertPart], up_name: str,
                  has_gate: bool) -> Tensor:
    """x (n, H) -> (n, H): expert e's up projection, gate or activation, down projection (+ post-expert norm),
    before the routing weight. A per-expert norm (``models.expert_math.per_expert_norm``, Ergo) is not applied here:
    its experts class applies it around the dispatched forward that calls this."""
    h = project(experts, up_name, e, x, parts)
    h = callable_attr(experts, "_apply_gate" if has_gate else "act_fn")(h)
    y = project(experts, "down_proj", e, h, parts)
    if getattr(experts, "has_post_expert_norm", False):
        y = callable_attr(experts, "post_expert_norm")(y)
    return y


def routed_forward(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                   parts: Mapping[str, ExpertPart]) -> Tensor:
    """hidden_states (T, H), top_k_index / top_k_weights (T, k) -> (T, H), only routed experts computed."""
    k = top_k_index.shape[1]
    n_experts = int(getattr(experts, "num_experts"))  # noqa: B009 (an int attribute torch types as Tensor | Module)
    has_gate = bool(getattr(experts, "has_gate"))  # noqa: B009
    up_name = "gate_up_proj" if has_gate else "up_proj"
    flat = top_k_index.reshape(-1)  # (S,) pair p = token p // k, slot p % k
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts + 1).tolist()  # one host sync per layer
    weights = top_k_weights.reshape(-1)
    out = torch.zeros_like(hidden_states)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        if e >= n_experts:  # placeholder index: no expert
            continue
        token_idx = pairs // k
        y = expert_output(experts, e, hidden_states[token_idx], parts, up_name, has_gate)
        y = y * weights[pairs].unsqueeze(-1).to(y.dtype)
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out
