"""Compare moeslim's GPTQ with an independent implementation on one plain linear layer.

The independent implementation is AutoGPTQ 0.7.1 (``auto_gptq.quantization.GPTQ.fasterquant`` and
``Quantizer``), itself a close copy of IST-DASLab's reference ``gptq.py``. It installs on CPU with
``pip install --no-deps auto-gptq==0.7.1``; only its ``quantization`` subpackage is imported (the
package ``__init__`` pulls accelerate/peft, which the algorithm does not need), and its unconditional
``torch.cuda.synchronize()`` is stubbed out for CPU.

Both receive the same weight and the same Hessian. Printed per setting: the relative difference of the
dequantized weights, the share of integer codes that differ, the largest relative difference of the
group scales, and the output errors ||XW^T - XQ^T|| of
moeslim GPTQ, AutoGPTQ and round-to-nearest. Differences come only from float rounding: we factorise
H in float64 (the reference in float32), so error updates and hence the (non-static) group scales differ
at the float32 rounding level; a code could flip only at an exact rounding boundary. Measured here:
identical codes at 2/3/4/8 bits, relative weight difference <= 1.7e-6 without act-order, bit-identical
with act-order (static groups), output errors equal to 3 decimals.

Run: .venv/bin/python benchmarks/gptq_reference.py
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

from moeslim.calibrate.hessians import accumulate_hessian
from moeslim.methods.quant.gptq import gptq_quantize, rtn_quantize


def _load_autogptq_quantization() -> types.ModuleType:
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("auto-gptq is not installed: pip install --no-deps auto-gptq==0.7.1")
    # A bare parent package so that importing the subpackage skips auto_gptq/__init__.py.
    parent = types.ModuleType("auto_gptq")
    parent.__path__ = [str(Path(next(iter(spec.submodule_search_locations))))]
    sys.modules.setdefault("auto_gptq", parent)
    import auto_gptq.quantization as q

    return q


def _layer(n_out: int = 64, n_in: int = 256, n_tokens: int = 512, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(n_tokens, 32, generator=gen)
    mix = torch.randn(32, n_in, generator=gen)
    scale = torch.exp(torch.randn(n_in, generator=gen))
    X = (latent @ mix + 0.3 * torch.randn(n_tokens, n_in, generator=gen)) * scale
    W = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    return W, X


def _reference(q: types.ModuleType, W: torch.Tensor, H: torch.Tensor, bits: int, group: int, act: bool):
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.clone()
    gptq = q.GPTQ(layer)
    gptq.H = H.clone()
    gptq.nsamples = 1  # only read by its log line
    gptq.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
    scale, zero, g_idx = gptq.fasterquant(
        blocksize=128, percdamp=0.01, group_size=group, actorder=act, static_groups=act
    )
    Q = layer.weight.data.clone()
    # The reference returns only Q and its per-group scale/zero; recover its integer codes from them.
    s, z = scale[:, g_idx.long()], zero[:, g_idx.long()]
    codes = torch.round(Q / s + z).clamp(0, 2**bits - 1)
    return Q, codes, scale


def main() -> None:
    q = _load_autogptq_quantization()
    torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it unconditionally
    W, X = _layer()
    H = accumulate_hessian(None, X)

    def out_err(Q: torch.Tensor) -> float:
        return float(torch.linalg.norm(X @ W.T - X @ Q.T))

    print("layer 64x256, 512 correlated calibration inputs, group 128, damp 0.01, block 128")
    cols = ("bits", "act", "rel.diff W", "codes diff", "scale diff", "err ours", "err ref", "err RTN")
    print(" ".join(f"{c:>{n}}" for c, n in zip(cols, (4, 5, 11, 10, 10, 9, 9, 9), strict=True)))
    for act in (False, True):
        for bits in (2, 3, 4, 8):
            ours = gptq_quantize(W, H, bits, 128, act_order=act)
            ref, ref_codes, ref_scale = _reference(q, W, H, bits, 128, act)
            rel = float(torch.linalg.norm(ours.weight - ref) / torch.linalg.norm(ref))
            flipped = float((ours.codes.float() != ref_codes).float().mean())
            scale_rel = float((ours.scales - ref_scale).abs().max() / ref_scale.abs().max())
            rtn = rtn_quantize(W, bits, 128).weight
            print(
                f"{bits:>4} {act!s:>5} {rel:>11.2e} {flipped:>10.3%} {scale_rel:>10.1e} "
                f"{out_err(ours.weight):>9.3f} {out_err(ref):>9.3f} {out_err(rtn):>9.3f}"
            )


if __name__ == "__main__":
    main()
