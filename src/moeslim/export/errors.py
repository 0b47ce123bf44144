"""The one error every exporter raises for what an engine cannot load (said before any work)."""

from __future__ import annotations

__all__ = ["UnsupportedExportError"]


class UnsupportedExportError(ValueError):
    """The model (family, routing, tokenizer, layer layout) cannot be written in a format an engine loads."""
