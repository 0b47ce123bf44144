"""``models.attrs``: checked reads of transformers module attributes (what mypy cannot see through nn.Module)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from moeslim.models import find_moe_layers
from moeslim.models.attrs import callable_attr, generating, hf_config, pretrained, tensor_attr


def test_reads_return_the_real_attribute_and_refuse_anything_else() -> None:
    model = tiny_model("mixtral")
    experts = find_moe_layers(model)[0].experts
    assert tensor_attr(experts, "down_proj") is experts.down_proj
    h = torch.randn(3, experts.gate_up_proj.shape[1])  # (T, 2I): gate and up halves (mixtral: (E, 2I, H))
    assert callable_attr(experts, "act_fn") is experts.act_fn and callable_attr(experts, "_apply_gate")(h).ndim == 2
    assert pretrained(model) is model and generating(model) is model and hf_config(experts) is experts.config
    with pytest.raises(TypeError, match=r"\.act_fn is .*expected a tensor"):
        tensor_attr(experts, "act_fn")
    with pytest.raises(TypeError, match=r"\.missing is NoneType"):
        callable_attr(experts, "missing")
    with pytest.raises(TypeError, match="not a transformers PreTrainedModel"):
        pretrained(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cannot generate"):
        generating(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="carries no transformers config"):
        hf_config(nn.Linear(2, 2))
