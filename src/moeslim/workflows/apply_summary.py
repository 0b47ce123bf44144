"""What ``moeslim apply`` changed, in two or three lines: experts per layer and weight bytes, before -> after.

Measured on the model itself (its MoE layers and the bytes its tensors hold, ``evaluate.cost.param_bytes``),
not derived from the plans, so the lines say what the saved checkpoint holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from moeslim.plans import Plan
from moeslim.workflows.plan_summary import layer_runs, layer_span

MIB = 2**20


@dataclass(frozen=True)
class ModelShape:
    experts: dict[int, int]  # decoder layer index -> routed experts of its MoE block
    weight_bytes: int  # bytes the model's tensors hold (packed low-bit experts as stored)


def model_shape(model: nn.Module) -> ModelShape:
    from moeslim.evaluate.cost import param_bytes
    from moeslim.models import find_moe_layers

    return ModelShape(experts={layer.layer_idx: layer.num_experts for layer in find_moe_layers(model)},
                      weight_bytes=int(param_bytes(model)["total"]))


def describe_change(before: ModelShape, after: ModelShape, plans: Sequence[Plan]) -> list[str]:
    """``applied prune (enumerate)``, ``experts per layer: 8 -> 6 (layers 0-3)``, ``weights: 53.0 -> 42.5 MiB``."""
    lines = ["applied " + " then ".join(f"{p.kind} ({p.provenance.method})" for p in plans)]
    pairs = {idx: (n, after.experts.get(idx, n)) for idx, n in before.experts.items()}
    runs = [f"{b} -> {a} ({layer_span(layers)})" if a != b else f"{b}, unchanged ({layer_span(layers)})"
            for layers, (b, a) in layer_runs(pairs)]
    lines.append("experts per layer: " + ("; ".join(runs) if runs else "no MoE layers"))
    lines.append(f"weights in memory: {_mib_change(before.weight_bytes, after.weight_bytes)}")
    return lines


def describe_disk_change(source: str | Path, out: str | Path, plans: Sequence[Plan]) -> list[str]:
    """For ``apply --stream`` (no whole model in memory): the safetensors bytes of the two checkpoints."""
    lines = ["applied " + " then ".join(f"{p.kind} ({p.provenance.method})" for p in plans)]
    lines.append(f"weights on disk: {_mib_change(_safetensors_bytes(source), _safetensors_bytes(out))}")
    return lines


def _mib_change(before: int, after: int) -> str:
    change = f" ({(after - before) / before:+.0%})" if before else ""
    return f"{before / MIB:.1f} MiB -> {after / MIB:.1f} MiB{change}"


def _safetensors_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
