"""Expert merging (HC-SMoE, MC-SMoE): grouping, neuron alignment, frequency-weighted averaging, router rows."""

from moeslim.methods.merge.config import MERGE_METHODS, MergeConfig
from moeslim.methods.merge.driver import LayerGroups, MergedLayer, choose_groups, merge_layer, plan_merge

__all__ = ["MERGE_METHODS", "LayerGroups", "MergeConfig", "MergedLayer", "choose_groups", "merge_layer",
           "plan_merge"]
