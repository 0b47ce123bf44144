"""How well the joint planner's quantization errors predict apply's GPTQ error on held-out text.

For each chosen MoE layer of a demo model and each width, every expert's mean squared output error on the tokens
routed to it is measured three ways:

- in sample: GPTQ fitted on the planner's token sample and judged on the same tokens (``--gptq-folds 1``);
- cross-fitted: ``quant_distances(..., folds=2)``, each token judged by the expert GPTQ'd on the other fold;
- test: the expert GPTQ'd as apply does (all calibration tokens routed to it), judged on the held-out test
  windows' tokens routed to it: what the estimate stands for.

It prints, per layer and width, the mean errors, each estimate's Spearman correlation with the test errors over
the experts, and test / estimate by thirds of the experts ordered by their routed sample tokens, and ends with

    in-sample / test: A-B; cross-fitted / test: C-D

(the ranges over layers, widths and thirds).

    python benchmarks/gptq_crossfit.py --model demo-fine --layers 0,3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.stats import spearmanr

from moeslim.calibrate import ExpertOutputs, ExpertOutputSample, LayerDecision, result_of, run_layerwise
from moeslim.config import CalibrationConfig
from moeslim.data import load_source, token_windows
from moeslim.data.calibration_set import build_calibration_set
from moeslim.methods.joint import JointConfig
from moeslim.methods.joint.curves import quant_distances, quantized_slices
from moeslim.models import MoELayer, load_model
from moeslim.models.expert_math import expert_forward

DOMAINS = ("code", "prose")


def layer_samples(model: torch.nn.Module, input_ids: torch.Tensor, max_tokens: int | None, batch_size: int
                  ) -> list[tuple[MoELayer, ExpertOutputSample]]:
    """Each MoE layer with its expert-output sample of ``input_ids`` (N, S) (original-model inputs per layer)."""
    out: list[tuple[MoELayer, ExpertOutputSample]] = []

    def on_layer(layer: MoELayer, observers: list[object]) -> LayerDecision:
        out.append((layer, result_of(observers[0], ExpertOutputSample)))
        return LayerDecision(result=None)

    run_layerwise(model, input_ids, make_observers=lambda _layer: [ExpertOutputs(max_tokens=max_tokens)],
                  on_layer=on_layer, batch_size=batch_size, progress=False)
    return out


def routed_masks(layer: MoELayer, sample: ExpertOutputSample) -> torch.Tensor:
    """(T, E) bool: which experts each sample token is routed to (routing read once per sample)."""
    _, ids = layer.route(sample.logits)
    return torch.stack([(ids == e).any(dim=1) for e in range(sample.outputs.shape[1])], dim=1)


def held_out_errors(layer: MoELayer, fit: ExpertOutputSample, test: ExpertOutputSample, bits: int, group_size: int,
                    act_order: bool) -> np.ndarray:
    """(E,) mean squared output error on the test tokens routed to each expert, the expert GPTQ'd as apply does
    on ``fit`` (the tokens routed to it; all tokens when fewer than a group route to it)."""
    errs = []
    fit_routed, test_routed = routed_masks(layer, fit), routed_masks(layer, test)
    for e in range(fit.outputs.shape[1]):
        rows = fit_routed[:, e]
        rows = rows if int(rows.sum()) >= group_size else torch.ones_like(rows)
        up, down = quantized_slices(layer, fit.x.float(), rows, e, bits, group_size, False, "gptq", act_order)
        judged = test_routed[:, e]
        out = expert_forward(layer, test.x[judged].float(), e, up=up, down=down).double()
        errs.append(float((test.outputs[judged, e].double() - out).pow(2).sum(dim=-1).mean()))
    return np.array(errs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-fine")
    parser.add_argument("--layers", default="0,3", help="MoE layer positions (0 = the first MoE layer)")
    parser.add_argument("--widths", default="2,3,4")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=2048, help="the planner's token sample per layer")
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out test windows per domain")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=JointConfig.act_order,
                        help="GPTQ act-order (static groups), in the estimates and the test alike")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    calib = build_calibration_set(CalibrationConfig(samples=args.calib_samples, seq_len=args.seq_len), tok)
    test_ids = torch.cat([token_windows(load_source(f"demo:{d}:test"), tok, args.seq_len, args.eval_windows)
                          for d in DOMAINS])
    wanted = [int(v) for v in args.layers.split(",")]
    widths = tuple(int(b) for b in args.widths.split(","))
    sampled = layer_samples(model, calib.input_ids, args.max_tokens, 8)
    full = layer_samples(model, calib.input_ids, None, 8)
    test = layer_samples(model, test_ids, None, 8)
    ratios: dict[str, list[float]] = {"in-sample": [], "cross-fitted": []}
    with torch.no_grad():
        for pos in wanted:
            layer, sample = sampled[pos]
            estimates = {name: quant_distances(layer, sample, widths, args.group_size, False, "gptq", folds,
                                               args.act_order)
                         for name, folds in (("in-sample", 1), ("cross-fitted", 2))}
            routed = routed_masks(layer, sample)  # (T, E)
            counts = routed.sum(dim=0).numpy()
            thirds = np.array_split(np.argsort(counts), 3)
            for j, bits in enumerate(widths):
                truth = held_out_errors(layer, full[pos][1], test[pos][1], bits, args.group_size, args.act_order)
                parts = [f"MoE layer {pos}, {bits} bits: test {truth.mean():.4g}"]
                for name, dist in estimates.items():
                    est = np.array([float(dist[routed[:, e], e, j].mean()) for e in range(routed.shape[1])])
                    by_third = [float((est[m] / truth[m]).mean()) for m in thirds]
                    ratios[name] += by_third
                    parts.append(f"{name} {est.mean():.4g} (spearman {spearmanr(est, truth).statistic:.3f}; "
                                 "/ test by thirds, rarest first: " + " ".join(f"{r:.2f}" for r in by_third) + ")")
                print("; ".join(parts), flush=True)
    print("; ".join(f"{name} / test: {min(r):.2f}-{max(r):.2f}" for name, r in ratios.items()))


if __name__ == "__main__":
    main()
