"""Checked reads of attributes of transformers modules (names come from the family table or transformers).

torch types ``Module.__getattr__`` as ``Tensor | Module``, so ``experts.down_proj`` or ``model.generate`` do not
type-check on an ``nn.Module``. These helpers check what the attribute really is at run time, so a module that
differs fails here, naming the attribute, instead of deep inside a matmul.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel


def tensor_attr(module: nn.Module, name: str) -> Tensor:
    """``module.<name>``, a parameter or buffer."""
    value = getattr(module, name, None)
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is {type(value).__name__}, expected a tensor")
    return value


def callable_attr(module: nn.Module, name: str) -> Callable[..., Any]:
    """``module.<name>``, a submodule or method to call (an activation, ``_apply_gate``, a norm)."""
    value = getattr(module, name, None)
    if not callable(value):
        raise TypeError(f"{type(module).__name__}.{name} is {type(value).__name__}, expected something callable")
    return value


def pretrained(model: nn.Module) -> PreTrainedModel:
    """``model`` as the transformers model it is (generate, save_pretrained, set_*_implementation, config)."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    return model


def generating(model: nn.Module) -> GenerationMixin:
    """``model`` as a transformers model that can ``generate`` (a causal LM)."""
    if not isinstance(model, GenerationMixin):
        raise TypeError(f"{type(model).__name__} cannot generate (not a transformers GenerationMixin)")
    return model


def hf_config(module: nn.Module) -> PretrainedConfig:
    """The transformers config a model or a transformers submodule (experts, attention) carries."""
    config = getattr(module, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"{type(module).__name__} carries no transformers config (got {type(config).__name__})")
    return config
