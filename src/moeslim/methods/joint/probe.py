"""Per-layer, per-kind KL scales: the options' squared block-output errors put on the model's output scale.

The options of a layer (``curves.py``) are priced by squared errors of that layer's block output, P (pruning) and
Q (quantization). Summed over layers as they are, they weigh every layer and both kinds alike, but a squared error
of a given size costs the model's output very differently by layer and by kind: pruning moves every token of an
expert's share the same way (a systematic error), quantization adds an error that GPTQ shapes against the inputs.
Measured on the demo model (8 experts, 4 MoE layers), a unit of squared error costs 2.5-8.5 times more KL when
pruning makes it than when 2-bit quantization does, and 13 times more in the first MoE layer than in the last.
Yet the plans chosen with these scales measured worse there than the unscaled ones (+14 % perplexity against
+11 % at 25 % of the bytes; measuring each kept set's KL directly instead of one scale per layer: +13 %): the
single-layer KLs sum to about half the KL measured when several layers are pruned and every expert is at 2 bits,
so the errors do not add over layers, and the probes move pruning to layers where it compounds. Hence
``error_scale="squared"`` is the default and this probe an option.

The probe measures it: for each MoE layer l and each kind c, the model runs on calibration windows with only
layer l's block output perturbed by one option of that kind (c = prune: the kept set of the middle size, all
experts at 16 bits; c = quant: every expert round-to-nearest at the probe width), and

    s_lc = mean_t KL(p(t) || p~(t)) / mean_t ||delta_l(t)||^2          (per token; KL of next-token distributions)

with delta_l the perturbation of the block output on the same tokens. An option's error (summed over the T_l
sample tokens of the layer) then weighs s_lc / T_l: the estimate is an estimated mean KL per token, summed over
layers and kinds. Approximations (stated): KL is taken as quadratic in each layer's perturbation with one
constant per layer and kind (a second-order expansion, KL ~ 1/2 delta^T F delta, averaged over the directions one
kind produces), and as additive over layers and kinds; the quantization probe uses round-to-nearest (no Hessians:
cheap), while the options are priced by GPTQ's errors, so the ratio, not the size, is borrowed.

Shapes: T tokens, E experts, H hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from moeslim.methods.joint.solve import SizeOption
from moeslim.methods.prune.enumerate import allowed_mask
from moeslim.methods.quant.driver import rtn_slice
from moeslim.methods.quant.factors import expert_gate
from moeslim.models import MoELayer, find_moe_layers
from moeslim.models.expert_math import expert_forward, expert_weight_views

__all__ = ["LayerScales", "probe_scales", "scale_options"]

Perturb = Callable[[Tensor], Tensor]  # (T, H) block input -> (T, H) change of the block output


@dataclass(frozen=True)
class LayerScales:
    """KL per unit of mean squared block-output error, for pruning and quantization options of one layer."""

    prune: float
    quant: float

    def to_dict(self) -> dict[str, float]:
        return {"prune": self.prune, "quant": self.quant}


def _kl(ref: Tensor, logits: Tensor) -> Tensor:
    """(B, S, V) reference and perturbed logits -> (B * S,) KL(ref || perturbed) per token, float64."""
    p = torch.log_softmax(ref.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(dim=-1).reshape(-1)


@torch.no_grad()
def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _prune_perturbation(layer: MoELayer, kept: Sequence[int]) -> Perturb:
    allowed = allowed_mask(kept, layer.num_experts)

    def delta(x: Tensor) -> Tensor:
        return layer.forward(x, allowed.to(x.device)) - layer.forward(x)
    return delta


def _quant_perturbation(layer: MoELayer, bits: int, group_size: int, symmetric: bool) -> Perturb:
    views = expert_weight_views(layer)

    def delta(x: Tensor) -> Tensor:
        weights, ids = layer.route(layer.router_logits(x))  # (T, k)
        out = torch.zeros_like(x)
        for e in range(layer.num_experts):
            rows = (ids == e).any(dim=1)
            if not bool(rows.any()):
                continue
            # one expert's dequantized copy at a time: probing every layer at once holds no second model
            up = rtn_slice(views.up[e], bits, group_size, views.transposed, symmetric)
            down = rtn_slice(views.down[e], bits, group_size, views.transposed, symmetric)
            xe = x[rows]
            diff = expert_forward(layer, xe, e, up=up, down=down) - expert_forward(layer, xe, e)
            out[rows] += expert_gate(weights[rows], ids[rows], e)[:, None].to(diff.dtype) * diff
        return out
    return delta


@torch.no_grad()
def _perturbed(model: nn.Module, perturbs: Sequence[tuple[MoELayer, Perturb]], batches: list[Tensor],
               refs: list[Tensor]) -> tuple[float, list[float]]:
    """(mean KL per token to ``refs`` with every listed layer's block output perturbed at once, each layer's mean
    squared perturbation per token); a layer's perturbation is taken on its input as the earlier ones left it."""
    err = [[0.0, 0] for _ in perturbs]

    def hook_of(i: int, layer: MoELayer, perturb: Perturb) -> Callable[..., Any]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            x = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x, Tensor):
                raise ValueError(f"layer {layer.layer_idx}: the MoE block's input is not a tensor; cannot probe it")
            hidden = layer.block_output(output)
            flat = x.reshape(-1, x.shape[-1])
            d = perturb(flat).to(hidden.dtype)
            err[i][0] += float(d.double().pow(2).sum())
            err[i][1] += int(flat.shape[0])
            new = hidden + d.reshape(hidden.shape)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    handles = [layer.block.register_forward_hook(hook_of(i, layer, perturb), with_kwargs=True)
               for i, (layer, perturb) in enumerate(perturbs)]
    try:
        kl = torch.cat([_kl(ref, _logits(model, ids)) for ids, ref in zip(batches, refs, strict=True)])
    finally:
        for handle in handles:
            handle.remove()
    return float(kl.mean()), [float(total) / max(int(count), 1) for total, count in err]


def _probe(model: nn.Module, layer: MoELayer, batches: list[Tensor], refs: list[Tensor], perturb: Perturb
           ) -> float:
    """KL per unit of mean squared block-output error when ``perturb`` changes ``layer``'s block output."""
    kl, (mse,) = _perturbed(model, [(layer, perturb)], batches, refs)
    return kl / mse if mse > 0 else 0.0


@torch.no_grad()
def probe_scales(model: nn.Module, input_ids: Tensor, options: Mapping[int, Sequence[SizeOption]], widths:
                 Sequence[int], group_size: int, symmetric: bool, windows: int, batch_size: int
                 ) -> dict[int, LayerScales]:
    """{decoder layer index: LayerScales} from 2 L forwards of the first ``windows`` calibration windows
    ``input_ids`` (N, S). The probe width is the narrowest of ``widths`` from 2 bits up (1 bit when it is the
    only one); the pruning probe keeps the kept set of the middle size among the layer's options."""
    device = next(model.parameters()).device
    ids = input_ids[:windows].to(device)
    batches = list(ids.split(batch_size))
    refs = [_logits(model, b) for b in batches]
    quantized = [int(b) for b in widths if b != 16]
    bits = min((b for b in quantized if b >= 2), default=min(quantized, default=2))
    out = {}
    for layer in find_moe_layers(model):
        opts = [o for o in options[layer.layer_idx] if len(o.kept) < layer.num_experts]
        prune = 0.0
        if opts:
            mid = opts[len(opts) // 2]
            prune = _probe(model, layer, batches, refs, _prune_perturbation(layer, mid.kept))
        quant = _probe(model, layer, batches, refs, _quant_perturbation(layer, bits, group_size, symmetric))
        out[layer.layer_idx] = LayerScales(prune=prune, quant=quant)
    return out


def scale_options(options: Mapping[int, Sequence[SizeOption]], scales: Mapping[int, LayerScales], tokens:
                  Mapping[int, int]) -> dict[int, list[SizeOption]]:
    """The options with errors in estimated KL: P * s_prune / T and Q * s_quant / T per layer (``tokens`` T_l)."""
    out = {}
    for idx, opts in options.items():
        s, t = scales[idx], max(int(tokens[idx]), 1)
        out[idx] = [replace(o, prune_err=o.prune_err * s.prune / t, quant_err=o.quant_err * (s.quant / t))
                    for o in opts]
    return out
