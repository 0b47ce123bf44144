"""Verification of the joint plan by measured KL (``JointConfig.verify_windows``): a few candidates, one judge.

The MILP's optimum is the least *estimated* error, and the estimate has approximations that can misorder plans
of nearly equal quality: squared block-output errors (or one probed KL scale per layer) summed over layers, the
attention / embedding and cast prices brought to the experts' unit with one averaged factor, and GPTQ errors
measured on the same sample GPTQ fits. On demo-fine at 25 % of the bytes the optimum measured a held-out
perplexity 0.08 % above PMQ's allocation at the same bytes, which lies inside the planner's own space.

So with ``verify_windows`` = v the last v calibration windows are held out of every measurement the estimate is
made of, and a handful of candidate plans, each the best of a different reading of the estimate, are applied to
copies of the model (GPTQ on the other N - v windows) and judged by their measured mean KL per token to the
original on the v held-out windows; the least is kept. The candidates (duplicates dropped):

- the MILP optimum for each hold dtype that fits (``hold_dtypes``);
- the optimum with the attention / embedding left untouched (when they are options): their price is the least
  certain part of the estimate;
- the optimum with every expert kept (widths only): pruning's price is the other uncertain part;
- PMQ's allocation at the same bytes (``pmq_choice``): every expert kept, PMQ's global widths (MC-MoE's cost
  on round-to-nearest errors, its average bits raised while the held bytes fit the target), with the attention /
  embedding untouched, and again with them at the optimum's widths (the bytes they save go to the experts).

Every candidate meets the targets (each is planned under them), so the kept plan does too. The judge applies
plans, which methods do not do: the caller passes it (``workflows/joint_verify.py`` is the project's).
Shapes: N windows, S window length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from moeslim.config import ConfigError
from moeslim.methods.joint.sizes import LayerBytes
from moeslim.methods.joint.solve import ChoiceGroup, JointChoice, LayerChoice, SizeOption, _held
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.driver import plan_bits
from moeslim.methods.quant.factors import LayerFactors
from moeslim.plans import Plan

__all__ = ["Judge", "full_options", "mean_kl", "pmq_choice", "split_windows"]

# (candidate plans, fit windows (N - v, S), held-out windows (v, S)) -> each plan's measured mean KL per token on
# the held-out windows, the plan applied to a copy of the model with GPTQ on the fit windows
Judge = Callable[[Sequence[Plan], Tensor, Tensor], list[float]]

_BISECT_STEPS = 16  # PMQ's average bits to (16 - 2) / 2**16: far below one expert's width step


def split_windows(input_ids: Tensor, verify: int) -> tuple[Tensor, Tensor]:
    """(N, S) -> (fit windows (N - v, S), held-out windows (v, S)): the last ``verify`` windows held out."""
    n = int(input_ids.shape[0])
    if verify <= 0:
        return input_ids, input_ids[:0]
    if verify >= n:
        raise ConfigError(f"verify_windows={verify} with {n} calibration windows: hold out fewer than all (e.g. "
                          f"{max(n // 4, 1)}), or draw more windows")
    return input_ids[:n - verify], input_ids[n - verify:]


def full_options(options: Mapping[int, Sequence[SizeOption]], num_experts: Mapping[int, int]
                 ) -> dict[int, list[SizeOption]]:
    """Each layer's options that keep every expert and skip none (the widths-only space)."""
    return {idx: [o for o in opts if len(o.kept) == num_experts[idx] and not o.skip_beta]
            for idx, opts in options.items()}


def pmq_choice(model: nn.Module, factors: Mapping[int, LayerFactors], options: Mapping[int, Sequence[SizeOption]],
               widths: Sequence[int], sizes: dict[int, LayerBytes], base: int, target: int,
               active_target: float | None = None, groups: Sequence[ChoiceGroup] = (),
               picks: Mapping[str, int] | None = None) -> JointChoice | None:
    """PMQ's global allocation over ``widths`` at the most average bits whose held bytes are <= ``target`` (None
    when none fits, or the bytes read per token exceed ``active_target``), as a joint decision: every expert kept,
    ``groups`` at the widths ``picks`` (default: untouched, 16), its error the options' estimate of those widths
    plus the groups'. ``model``: the layers' expert counts; ``factors``: ``pmq_factors`` on the fit windows."""
    full = full_options(options, {idx: lb.num_experts for idx, lb in sizes.items()})
    if any(not opts for opts in full.values()):
        return None
    candidates = tuple(sorted(int(b) for b in widths))
    picks = {g.name: 16 for g in groups} | dict(picks or {})

    def decide(bits: float) -> tuple[dict[int, LayerChoice], int]:
        config = QuantizeConfig(method="pmq", bits=bits, candidates=candidates, scope="global")
        alloc, _ = plan_bits(model, None, config, factors=dict(factors))
        layers = {}
        for idx, b in alloc.items():
            opt = full[idx][0]
            err = float(opt.prune_err) + sum(float(opt.quant_err[e, list(widths).index(w)]) for e, w in enumerate(b))
            layers[idx] = LayerChoice(kept=tuple(opt.kept), bits=tuple(int(w) for w in b), error=err)
        return layers, _held(base, sizes, layers, groups, picks)

    lo, hi = float(min(candidates)), float(max(candidates))
    best = decide(lo)
    if best[1] > target:
        return None
    top = decide(hi)
    if top[1] <= target:
        best = top
    else:
        for _ in range(_BISECT_STEPS):
            mid = (lo + hi) / 2
            trial = decide(mid)
            if trial[1] <= target:
                best, lo = trial, mid
            else:
                hi = mid
    layers, held = best
    read = sum(float(full[idx][0].freq[e]) * sizes[idx].width[w] for idx, c in layers.items()
               for e, w in enumerate(c.bits))
    if active_target is not None and read > active_target:
        return None
    group_error = sum(float(g.error[g.widths.index(picks[g.name])]) for g in groups)
    return JointChoice(layers=layers, error=sum(c.error for c in layers.values()) + group_error, held_bytes=held,
                       active_bytes=read, mip_gap=0.0, groups=dict(picks))


@torch.no_grad()
def mean_kl(reference: Tensor, logits: Tensor) -> float:
    """Mean KL(reference || logits) per token of (B, S, V) logits, in float64."""
    p = torch.log_softmax(reference.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum(dim=-1).mean())
