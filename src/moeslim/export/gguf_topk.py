"""Expert skipping in a GGUF file: llama.cpp runs one ``expert_used_count`` for every token of every layer.

So the form of skipping a GGUF file holds is a reduced top-k: every token runs its K best experts under the
family's own routing (what transformers computes with the config's top-k set to K; for routers that renormalise
the top-k weights, as Qwen3-MoE and Mixtral do, that is skipping's rule of rescaling the kept weights to the
token's total). moeslim's per-token skip thresholds (``plan skip``, rules top2 / topk, and ODP) decide per token
and have no place in the file: a model with skipping installed is refused rather than written without it.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from moeslim.export.errors import UnsupportedExportError
from moeslim.export.gguf_arch import MoeShape

__all__ = ["check_no_skipping", "reduced_top_k"]


def check_no_skipping(model: nn.Module) -> None:
    """Refuse a model whose experts skip per token: llama.cpp would run it without skipping."""
    from moeslim.runtime.skipping import installed_rule

    rule = installed_rule(model)
    if rule is not None:
        raise UnsupportedExportError(
            f"this model skips experts per token (skip rule {rule!r}, thresholds per layer); llama.cpp runs one "
            "expert_used_count for every token, so the file would silently run without skipping: export the model "
            "without the skip plan, and use --top-k K for the reduced top-k llama.cpp runs")


def reduced_top_k(moe: MoeShape, top_k: int | None) -> MoeShape:
    """``moe`` with expert_used_count ``top_k`` (None: the model's own), refused outside [1, the model's]."""
    if top_k is None or top_k == moe.top_k:
        return moe
    if not 1 <= top_k < moe.top_k:
        raise UnsupportedExportError(f"--top-k {top_k}: a reduced top-k runs between 1 and the model's top-"
                                     f"{moe.top_k} experts per token")
    return replace(moe, top_k=top_k)
