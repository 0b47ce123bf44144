"""The joint choice over layers: a multiple-choice knapsack solved exactly as a MILP (scipy's HiGHS).

Each MoE layer l offers kept sets of several sizes (``SizeOption``: the best kept set of that size, its
squared pruning loss, and for every kept expert its squared quantization error at every candidate width, all
measured with the pruned routing), each optionally with a skip threshold (one option per size and threshold:
skipping moves no held bytes, only the errors and the bytes read per token, so the program stays linear).
A layer's decision is one size (and threshold) and one width per kept expert; its estimated error is the
pruning loss plus the kept experts' quantization errors (the three are taken as independent, so their squares
add). The model's estimate is the sum over layers, as in the global allocation
of pruning counts (``methods/prune/allocate.py``).

    minimise    sum_{l,k} x_lk P_lk + sum_{l,k,e,j} y_lkej Q_lkej
    subject to  sum_k x_lk = 1                          (one size per layer)
                sum_j y_lkej = x_lk      for e in S_lk  (one width per kept expert of the chosen size)
                sum saving(x, y) >= base - target       (held bytes, exact integers: ``sizes.LayerBytes``)
                sum_{l,k,e,j} y_lkej f_lke width_l(j) <= active target   (optional)

With low-rank options (``ranks``: parameter shares, ``lowrank_options.py``) each kept set is offered twice: in
quant mode (widths, as above) and in low-rank mode, where each kept expert takes a rank share or stays dense
(16) and the layer holds no packed maps (its experts live in the low-rank runtime, not the packed one). A layer
is in one mode: the runtime holds a layer's experts either low-rank or packed, not both. One size-and-mode
variable per layer keeps the mode exact without a product of binaries.

Weights outside the experts (``groups``, ``nonexpert.py``: each decoder layer's attention projections, the token
embedding with the output head) add one choice group each: exactly one width per group, its estimated error and
its held bytes saved taken as additive (a 0/1 variable per width, one equality row per group, the savings in the
byte row; they read no expert bytes).

Binary x, y. The byte constraint is the exact held bytes, not a rounded quantum; HiGHS proves optimality with
a relative gap of 0 (the gap it reports is returned), and a test checks it against brute force on small cases.
Pure: numbers in, decisions out. Shapes: L layers, K sizes per layer, k kept experts, J widths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from moeslim.methods.joint.sizes import LayerBytes
from moeslim.methods.quant.fused import KEEP_BITS

_RETRIES = 4

__all__ = ["ChoiceGroup", "JointChoice", "LayerChoice", "SizeOption", "min_held_bytes", "solve_joint"]


@dataclass(frozen=True)
class ChoiceGroup:
    """Weights outside the experts held at one width chosen among ``widths`` (16: untouched): ``error`` the
    estimated error and ``saving`` the held bytes saved at each width (both 0 at 16). ``name``: "attention.<l>"
    (decoder layer l's attention projections) or "embedding" (token embedding and output head)."""

    name: str
    widths: tuple[int, ...]
    error: tuple[float, ...]
    saving: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.widths) == len(self.error) == len(self.saving)) or not self.widths:
            raise ValueError(f"choice group {self.name}: one error and one saving per width")

    def to_dict(self) -> dict[str, object]:
        return {str(b): {"error": e, "saving": s} for b, e, s in zip(self.widths, self.error, self.saving,
                                                                       strict=True)}


@dataclass(frozen=True)
class SizeOption:
    """One kept set of a layer: ``kept`` (k,) expert ids, ``prune_err`` squared pruning loss, ``quant_err``
    (k, J) squared quantization error of each kept expert at each width, ``freq`` (k,) share of tokens that
    route to each kept expert (the pruned routing; for the bytes read per token), ``tokens`` the sample tokens
    the errors are summed over. ``skip_beta`` > 0: the layer also skips experts by that threshold (``curves.py``):
    ``prune_err`` then includes the skipping error, ``quant_err`` and ``freq`` are under the skipped routing."""

    kept: tuple[int, ...]
    prune_err: float
    quant_err: np.ndarray
    freq: np.ndarray
    tokens: int = 1
    skip_beta: float = 0.0
    rank_err: np.ndarray | None = None  # (k, R) squared error of each kept expert at each rank share


def _rank_formats(ranks: Sequence[float]) -> list[float | None]:
    """A low-rank layer's formats per kept expert: dense (None, 16 bits) then every rank share."""
    return [None, *ranks]


@dataclass(frozen=True)
class LayerChoice:
    kept: tuple[int, ...]
    bits: tuple[int, ...]  # one width per kept expert, in ``kept`` order
    error: float  # this layer's estimated squared error
    skip_beta: float = 0.0  # the skip threshold of the chosen option (0: no skipping)
    ranks: tuple[float | None, ...] | None = None  # low-rank layer: a rank share (None: dense) per kept expert


@dataclass(frozen=True)
class JointChoice:
    layers: dict[int, LayerChoice]
    error: float  # the objective: estimated summed squared error
    held_bytes: int
    active_bytes: float  # expected routed-expert bytes read per token (calibration routing)
    mip_gap: float
    groups: dict[str, int] = field(default_factory=dict)  # the width chosen for each ``ChoiceGroup``


def _held(base: int, sizes: dict[int, LayerBytes], layers: dict[int, LayerChoice],
          groups: Sequence[ChoiceGroup] = (), picks: Mapping[str, int] | None = None) -> int:
    """Held bytes of a decision, exactly: a model with any quantized expert holds every MoE layer packed;
    ``picks`` the width of each of ``groups``."""
    packed = any(b != KEEP_BITS for c in layers.values() if c.ranks is None for b in c.bits)
    saved = sum(g.saving[g.widths.index(picks[g.name])] for g in groups) if picks else 0
    return base - saved - sum(sizes[idx].saving(c.bits, packed) if c.ranks is None
                              else sizes[idx].saving_lowrank(c.ranks) for idx, c in layers.items())


def min_held_bytes(base: int, sizes: dict[int, LayerBytes], min_keep: dict[int, int], widths: Sequence[int],
                   ranks: Sequence[float] = (), groups: Sequence[ChoiceGroup] = ()) -> int:
    """The smallest held bytes any plan reaches: every layer at its fewest experts, all at the cheapest width
    (or the cheapest rank share, when that saves more), every choice group at its largest saving."""
    total = base - sum(max(g.saving) for g in groups)
    for idx, lb in sizes.items():
        cheapest = min(widths, key=lambda b: lb.width[b])
        saved = lb.saving([cheapest] * min_keep[idx])
        if ranks:
            saved = max(saved, lb.saving_lowrank([min(ranks, key=lambda f: lb.rank[f])] * min_keep[idx]))
        total -= saved
    return total


def solve_joint(options: Mapping[int, Sequence[SizeOption]], widths: Sequence[int], sizes: dict[int, LayerBytes],
                base: int, target: int, active_target: float | None = None, time_limit: float = 600.0,
                ranks: Sequence[float] = (), groups: Sequence[ChoiceGroup] = ()) -> JointChoice:
    """The decision of least estimated error whose held bytes are <= ``target`` (and expected expert bytes read
    per token <= ``active_target``). Raises ValueError when no decision fits.

    ``ranks``: low-rank shares offered beside the widths (each option then needs its ``rank_err``); ``groups``:
    weights outside the experts, one width each."""
    widths = [int(b) for b in widths]
    formats = _rank_formats(ranks)
    order = sorted(options)
    costs: list[float] = []
    saving: list[float] = []
    active: list[float] = []
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lows: list[float] = []
    x_index: dict[tuple[int, int], int] = {}
    y_index: dict[tuple[int, int, int, int], int] = {}
    xr_index: dict[tuple[int, int], int] = {}  # (layer, size) in low-rank mode
    z_index: dict[tuple[int, int, int, int], int] = {}  # (layer, size, kept expert, format) in low-rank mode

    def var(cost: float, save: float, read: float) -> int:
        costs.append(cost)
        saving.append(save)
        active.append(read)
        return len(costs) - 1

    def equality(entries: list[tuple[int, float]]) -> None:
        row = len(lows)
        for col, value in entries:
            rows.append(row)
            cols.append(col)
            vals.append(value)
        lows.append(0.0)

    layer_rows: list[list[tuple[int, float]]] = []
    for idx in order:
        lb = sizes[idx]
        one_size: list[tuple[int, float]] = []
        for s, opt in enumerate(options[idx]):
            dropped = lb.num_experts - len(opt.kept)
            # the maps are counted as if the model is quantized: an upper bound, exact unless every kept expert
            # stays at 16 bits (then nothing is packed and the model holds less)
            x = var(float(opt.prune_err), float(dropped * (lb.row + lb.dense) - lb.maps(len(opt.kept))), 0.0)
            x_index[idx, s] = x
            one_size.append((x, 1.0))
            for e in range(len(opt.kept)):
                entry = [(x, -1.0)]
                for j, b in enumerate(widths):
                    y = var(float(opt.quant_err[e, j]), float(lb.dense - lb.width[b]),
                            float(opt.freq[e]) * lb.width[b])
                    y_index[idx, s, e, j] = y
                    entry.append((y, 1.0))
                equality(entry)
            if not ranks:
                continue
            if opt.rank_err is None or opt.rank_err.shape != (len(opt.kept), len(ranks)):
                raise ValueError(f"layer {idx}: low-rank options need rank_err of shape ({len(opt.kept)}, "
                                 f"{len(ranks)})")
            xr = var(float(opt.prune_err), float(dropped * (lb.row + lb.dense)), 0.0)  # no packed maps
            xr_index[idx, s] = xr
            one_size.append((xr, 1.0))
            for e in range(len(opt.kept)):
                entry = [(xr, -1.0)]
                for j, share in enumerate(formats):
                    held_e = lb.dense if share is None else lb.rank[share]
                    err = 0.0 if share is None else float(opt.rank_err[e, j - 1])
                    z = var(err, float(lb.dense - held_e), float(opt.freq[e]) * held_e)
                    z_index[idx, s, e, j] = z
                    entry.append((z, 1.0))
                equality(entry)
        layer_rows.append(one_size)
    g_index: dict[tuple[str, int], int] = {}
    for group in groups:
        one_width = []
        for j, (err, saved_j) in enumerate(zip(group.error, group.saving, strict=True)):
            g_index[group.name, j] = var(float(err), float(saved_j), 0.0)
            one_width.append((g_index[group.name, j], 1.0))
        layer_rows.append(one_width)
    n_eq = len(lows)
    for r, entries in enumerate(layer_rows):
        for col, value in entries:
            rows.append(n_eq + r)
            cols.append(col)
            vals.append(value)
    n = len(costs)
    eq = coo_array((vals, (rows, cols)), shape=(n_eq + len(layer_rows), n)).tocsr()
    rhs = np.concatenate([np.zeros(n_eq), np.ones(len(layer_rows))])
    # Byte rows scaled to O(1) coefficients. HiGHS accepts a solution within its feasibility tolerance (1e-7 of the
    # scale), which on a large model is more than a byte: a decision over the target is solved again with the
    # bound tightened by the overshoot, so the target is met exactly (savings are integers).
    save = np.asarray(saving)
    unit = float(save.max()) if save.size and save.max() > 0 else 1.0
    c = np.asarray(costs, dtype=np.float64)
    scale = float(c.max()) if c.size and c.max() > 0 else 1.0
    tighten = 0
    for _ in range(_RETRIES):
        constraints = [LinearConstraint(eq, rhs, rhs),
                       LinearConstraint(save[None, :] / unit, (base - target + tighten) / unit, np.inf)]
        if active_target is not None:
            reads = np.asarray(active)
            read_unit = float(reads.max()) if reads.size and reads.max() > 0 else 1.0
            constraints.append(LinearConstraint(reads[None, :] / read_unit, -np.inf, active_target / read_unit))
        # Costs scaled so HiGHS's absolute gap (1e-6) is far below any cost difference that matters.
        result = milp(c * (1e6 / scale), integrality=np.ones(n), bounds=Bounds(0, 1), constraints=constraints,
                      options={"mip_rel_gap": 0.0, "time_limit": time_limit, "presolve": True})
        if result.x is None:
            raise ValueError(f"no joint decision fits: {result.message}")
        chosen = np.round(result.x).astype(int)
        layers = _decode(chosen, options, order, widths, x_index, y_index)
        layers.update(_decode_lowrank(chosen, options, formats, xr_index, z_index))
        picks = {g.name: next(g.widths[j] for j in range(len(g.widths)) if chosen[g_index[g.name, j]])
                 for g in groups}
        held = _held(base, sizes, layers, groups, picks)
        if held <= target:
            break
        tighten += held - target
    else:
        raise ValueError(f"the solver's decisions stay above the target {target} bytes (last: {held})")
    read = sum((float(options[idx][s].freq[e]) * sizes[idx].width[widths[j]]
                for (idx, s, e, j), col in y_index.items() if chosen[col]), 0.0)
    read += sum((float(options[idx][s].freq[e]) * (sizes[idx].dense if formats[j] is None
                                                   else sizes[idx].rank[formats[j]])  # type: ignore[index]
                 for (idx, s, e, j), col in z_index.items() if chosen[col]), 0.0)
    group_error = sum(float(g.error[g.widths.index(picks[g.name])]) for g in groups)
    return JointChoice(layers=layers, error=sum(c.error for c in layers.values()) + group_error, held_bytes=held,
                       active_bytes=read, mip_gap=float(getattr(result, "mip_gap", 0.0) or 0.0), groups=picks)


def _decode(chosen: np.ndarray, options: Mapping[int, Sequence[SizeOption]], order: list[int], widths: list[int],
            x_index: dict[tuple[int, int], int], y_index: dict[tuple[int, int, int, int], int]
            ) -> dict[int, LayerChoice]:
    """The layers' decisions from the 0/1 solution vector."""
    layers: dict[int, LayerChoice] = {}
    for idx in order:
        s = next((s for s in range(len(options[idx])) if chosen[x_index[idx, s]]), None)
        if s is None:  # the layer is in low-rank mode (``_decode_lowrank``)
            continue
        opt = options[idx][s]
        bits = [next(widths[j] for j in range(len(widths)) if chosen[y_index[idx, s, e, j]])
                for e in range(len(opt.kept))]
        err = float(opt.prune_err) + sum(float(opt.quant_err[e, widths.index(b)]) for e, b in enumerate(bits))
        layers[idx] = LayerChoice(kept=tuple(opt.kept), bits=tuple(bits), error=err, skip_beta=float(opt.skip_beta))
    return layers


def _decode_lowrank(chosen: np.ndarray, options: Mapping[int, Sequence[SizeOption]], formats: list[float | None],
                    xr_index: dict[tuple[int, int], int], z_index: dict[tuple[int, int, int, int], int]
                    ) -> dict[int, LayerChoice]:
    """The low-rank layers' decisions from the 0/1 solution vector (every kept expert at 16 bits, or factored)."""
    layers: dict[int, LayerChoice] = {}
    for (idx, s), col in xr_index.items():
        if not chosen[col]:
            continue
        opt = options[idx][s]
        picks = [next(j for j in range(len(formats)) if chosen[z_index[idx, s, e, j]]) for e in range(len(opt.kept))]
        rank_err = opt.rank_err if opt.rank_err is not None else np.zeros((len(opt.kept), len(formats) - 1))
        err = float(opt.prune_err) + sum(float(rank_err[e, j - 1]) for e, j in enumerate(picks) if j)
        layers[idx] = LayerChoice(kept=tuple(opt.kept), bits=(KEEP_BITS,) * len(opt.kept),
                                  error=err, skip_beta=float(opt.skip_beta),
                                  ranks=tuple(formats[j] for j in picks))
    return layers
