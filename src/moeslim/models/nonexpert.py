"""The weights outside the experts that a plan may hold packed: each decoder layer's attention projections, and the
token embedding with the output head (tied or not). Found through transformers' own accessors
(``get_input_embeddings`` / ``get_output_embeddings``) and the decoder layer list, so no family name appears here."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from moeslim.models.attrs import pretrained
from moeslim.models.layer import decoder_layers

__all__ = ["TokenMatrices", "attention_linears_by_layer", "token_matrices"]


def attention_linears_by_layer(model: nn.Module) -> dict[int, list[tuple[str, nn.Linear]]]:
    """{decoder layer index: [(name inside the layer, module)]} of every nn.Linear (or packed subclass) inside a
    decoder layer's attention (the first name part holds 'attn'); layers without any are left out."""
    found: dict[int, list[tuple[str, nn.Linear]]] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and "attn" in name.split(".")[0]:
                found.setdefault(i, []).append((name, module))
    return found


@dataclass(frozen=True)
class TokenMatrices:
    """The token embedding, the output head (None when the model has none) and whether they share one weight."""

    embedding: nn.Module
    head: nn.Module | None
    tied: bool

    def modules(self) -> list[nn.Module]:
        return [self.embedding] if self.head is None else [self.embedding, self.head]


def _storage(module: nn.Module) -> object:
    """What identifies a module's weight: the packed rows it holds (``runtime/packed_rows``) or its tensor's
    memory."""
    held = module._modules.get("moeslim_rows")
    if isinstance(held, nn.ModuleDict) and "weight" in held:
        return held["weight"]
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.is_meta:
        return id(weight)
    return (str(weight.device), weight.untyped_storage().data_ptr())


def token_matrices(model: nn.Module) -> TokenMatrices:
    """The model's token embedding and output head (raises TypeError when it has no input embedding)."""
    m = pretrained(model)
    embedding = m.get_input_embeddings()
    if not isinstance(embedding, nn.Module):
        raise TypeError(f"{type(model).__name__} has no input embedding module")
    head = m.get_output_embeddings()
    head = head if isinstance(head, nn.Module) else None
    tied = head is not None and _storage(head) == _storage(embedding)
    return TokenMatrices(embedding, head, tied)
