"""Exports for the engines users serve with: GGUF for llama.cpp, compressed-tensors for vLLM.

``export_gguf`` needs the ``gguf`` package, ``export_compressed_tensors`` the ``compressed-tensors`` package
(both in the ``export`` extra: ``pip install 'moeslim[export]'``); they are imported when used.
"""

from moeslim.export.compressed_tensors import CtExport, export_compressed_tensors
from moeslim.export.errors import UnsupportedExportError
from moeslim.export.gguf import GgufExport, export_gguf, read_gguf_types
from moeslim.export.gguf_arch import GGUF_FAMILIES

__all__ = ["GGUF_FAMILIES", "CtExport", "GgufExport", "UnsupportedExportError", "export_compressed_tensors",
           "export_gguf", "read_gguf_types"]
