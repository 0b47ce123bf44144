"""Build a hand-vectorised AVX512-BF16 CPU kernel once, with torch's C++ extension loader.

``int4_native`` and ``planes_native`` each hold one such kernel. Both need the same CPU features and the same
rule when they cannot run: None, so the caller's compiled kernel (same maths, slower) runs; a failed build is a
logged warning, a CPU without the features is not (the compiled kernel is that CPU's path).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["AVX512_BF16", "build_avx512_bf16", "build_avx512_bf16_functions"]

log = logging.getLogger(__name__)

AVX512_BF16 = ("avx512_f", "avx512_bw", "avx512_vl", "avx512_bf16")


def build_avx512_bf16(name: str, source: str, function: str, what: str) -> Callable[..., Any] | None:
    """``function`` of the extension ``name`` built from C++ ``source`` (cached by torch across processes), or None
    where this CPU lacks AVX512-BF16 or the build fails (``what`` names the kernel in the warning)."""
    functions = build_avx512_bf16_functions(name, source, (function,), what)
    return None if functions is None else functions[0]


def build_avx512_bf16_functions(name: str, source: str, functions: tuple[str, ...], what: str
                                ) -> tuple[Callable[..., Any], ...] | None:
    """``build_avx512_bf16`` for an extension that exports several ``functions`` (in that order)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if not all(caps.get(feature) for feature in AVX512_BF16):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(name, source, functions=list(functions), extra_cflags=["-O3"])
    except Exception as exc:  # noqa: BLE001 - no toolchain: the compiled kernel computes the same
        log.warning("the AVX512-BF16 %s kernel did not build (%s): the compiled kernel runs instead", what, exc)
        return None
    return tuple(getattr(module, function) for function in functions)
