"""Expert pruning: enumeration and search on the reconstruction loss, saliency baselines, and the driver."""

from moeslim.methods.prune.config import PRUNE_METHODS, PruneConfig
from moeslim.methods.prune.driver import plan_prune
from moeslim.methods.prune.enumerate import (
    EnumerationResult,
    SubsetScorer,
    enumerate_best,
    enumerate_subsets,
    score_all,
)
from moeslim.methods.prune.saliency import (
    frequency_scores,
    random_subset,
    reap_scores,
    soft_count_scores,
    top_experts,
)
from moeslim.methods.prune.search import SearchResult, search_subset

__all__ = [
    "PRUNE_METHODS",
    "PruneConfig",
    "plan_prune",
    "EnumerationResult",
    "SearchResult",
    "SubsetScorer",
    "enumerate_best",
    "enumerate_subsets",
    "frequency_scores",
    "random_subset",
    "reap_scores",
    "score_all",
    "search_subset",
    "soft_count_scores",
    "top_experts",
]
