"""``moeslim inspect``: architecture summary and per-layer expert load on calibration data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.calibrate import RoutingStats, RoutingSummary, run_layerwise
from moeslim.models import MoELayer, moe_summary


@dataclass(frozen=True)
class LayerLoad:
    layer: int
    load: list[float]  # share of routed tokens per expert
    entropy: float  # nats
    max_entropy: float  # log(E)
    never_routed: list[int]

    @classmethod
    def from_summary(cls, layer: int, summary: RoutingSummary) -> LayerLoad:
        load = summary.load
        return cls(
            layer=layer,
            load=[float(v) for v in load],
            entropy=summary.entropy(),
            max_entropy=math.log(load.numel()),
            never_routed=[int(i) for i in torch.nonzero(summary.counts == 0).flatten()],
        )


@dataclass(frozen=True)
class InspectReport:
    summary: dict[str, Any]
    loads: list[LayerLoad] = field(default_factory=list)
    data: str | None = None


def expert_loads(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> list[LayerLoad]:
    """Per-layer share of routed tokens per expert on ``input_ids`` (N, L)."""

    def observers(layer: MoELayer) -> list[RoutingStats]:
        return [RoutingStats(layer.num_experts)]

    results = run_layerwise(model, input_ids, observers, batch_size=batch_size, label="expert load")
    return [LayerLoad.from_summary(i, r[RoutingStats.key]) for i, r in sorted(results.items())]


def inspect_model(model: nn.Module, input_ids: torch.Tensor | None = None, data: str | None = None,
                  batch_size: int = 8) -> InspectReport:
    loads = expert_loads(model, input_ids, batch_size) if input_ids is not None else []
    return InspectReport(summary=moe_summary(model), loads=loads, data=data)


def plot_expert_load(loads: list[LayerLoad], path: Path, title: str) -> Path:
    """Heatmap: layers x experts, colour = share of routed tokens (uniform share marked in the colourbar)."""
    import matplotlib.pyplot as plt

    from moeslim.evaluate.plots import save_figure  # selects matplotlib's Agg backend

    grid = torch.tensor([entry.load for entry in loads]).numpy() * 100
    experts = grid.shape[1]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * experts + 2), max(2.5, 0.45 * len(loads) + 1.5)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xlabel("expert id")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(len(loads)), [str(entry.layer) for entry in loads])
    if experts <= 32:
        ax.set_xticks(range(experts))
        for (row, col), value in _cells(grid):
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value < grid.max() * 0.6 else "black")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"% of routed tokens (uniform = {100 / experts:.1f}%)")
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)


def _cells(grid: Any) -> list[tuple[tuple[int, int], float]]:
    return [((r, c), float(grid[r, c])) for r in range(grid.shape[0]) for c in range(grid.shape[1])]
