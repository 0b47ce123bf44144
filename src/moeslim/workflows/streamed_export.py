"""``moeslim export --stream``: a checkpoint folder exported one decoder layer at a time, a quantize plan applied
on the way (``apply --stream``) when compressed-tensors is asked for with ``--plan``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moeslim.export.streamed import export_compressed_tensors_streamed, export_gguf_streamed

__all__ = ["export_streamed"]


def export_streamed(source: str, out: str | Path, *, gguf: bool, plan: Any = None, qtype: str = "F16",
                    llama_quantize: str | Path | None = None, imatrix: str | Path | None = None,
                    scheme: str = "symmetric", inputs: Iterable[str | Path] = (), overwrite: bool = False,
                    progress: bool = False, top_k: int | None = None) -> Any:
    """``moeslim export --stream``: what ``moeslim export`` writes, read one decoder layer at a time.

    compressed-tensors with a quantize ``plan``: the plan is applied as ``apply --stream`` applies it (GPTQ on the
    plan's windows, layer by layer) into a temp folder beside ``out``, which is then exported and removed: the
    same steps as loading, applying and exporting, never the whole model in memory.
    """
    if gguf:
        return export_gguf_streamed(source, out, qtype=qtype, plan=plan, llama_quantize=llama_quantize,
                                    imatrix=imatrix, inputs=inputs, overwrite=overwrite, progress=progress,
                                    top_k=top_k)
    if plan is None:
        return export_compressed_tensors_streamed(source, out, scheme=scheme, overwrite=overwrite, inputs=inputs,
                                                  progress=progress)
    from moeslim.outputs import check_output_dir, temp_dir_beside
    from moeslim.workflows.streamed_apply import apply_quantize_streamed

    check_output_dir(out, overwrite=overwrite, inputs=inputs)  # before the GPTQ work
    with temp_dir_beside(out) as tmp:
        quantized = Path(tmp) / "quantized"
        apply_quantize_streamed(source, plan, quantized, progress=progress)
        return export_compressed_tensors_streamed(str(quantized), out, scheme=scheme, overwrite=overwrite,
                                                  inputs=[*inputs, tmp], progress=progress)
