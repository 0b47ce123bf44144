"""Low-rank experts: activation-aware (whitened) SVD per expert, ranks under a parameter budget."""

from moeslim.methods.lowrank.allocate import allocate_ranks, projection_params
from moeslim.methods.lowrank.config import LowRankConfig
from moeslim.methods.lowrank.driver import LowRankLayer, lowrank_layer, lowrank_observers, plan_lowrank
from moeslim.methods.whitened_svd import WhitenedSVD, is_dense, whitened_svd, whitening

__all__ = ["LowRankConfig", "LowRankLayer", "WhitenedSVD", "allocate_ranks", "is_dense", "lowrank_layer",
           "lowrank_observers", "plan_lowrank", "projection_params", "whitened_svd", "whitening"]
