"""Enumeration from cached expert outputs vs re-running the masked MoE block per subset (the authors' way).

Both score all C(E, keep) kept sets of every MoE layer on the same calibration tokens in the same run; prints both
wall times, their ratio and whether the chosen sets agree. Usage:

    python benchmarks/prune_search.py                 # the bundled demo model
    python benchmarks/prune_search.py --tiny          # a tiny random Mixtral (no demo model needed)
    python benchmarks/prune_search.py --demo-shape    # a random Mixtral of the demo model's shape, random tokens
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from moeslim.calibrate import ExpertOutputs, LayerDecision, run_layerwise
from moeslim.methods.prune.enumerate import SubsetScorer, allowed_mask, best_subset, enumerate_subsets
from moeslim.models import MoELayer


class _Inputs:
    """Keeps the block inputs so both methods score exactly the same tokens."""

    def __init__(self) -> None:
        self.x: list[torch.Tensor] = []

    def observe(self, layer: MoELayer, x: torch.Tensor) -> None:
        self.x.append(x.detach().clone())

    def result(self) -> list[torch.Tensor]:
        return self.x


def ours(layer: MoELayer, batches: list[torch.Tensor], keep: int) -> tuple[tuple[int, ...], float]:
    """Expert outputs once per batch, then every subset from the cache."""
    observer = ExpertOutputs()
    for x in batches:
        observer.observe(layer, x)
    scorer = SubsetScorer(observer.result(), layer.route)
    subsets = enumerate_subsets(layer.num_experts, keep)
    result = best_subset(subsets, scorer.losses(subsets))
    return result.kept, result.loss


def rerun(layer: MoELayer, batches: list[torch.Tensor], keep: int) -> tuple[tuple[int, ...], float]:
    """The authors' loop: the whole masked block on all tokens for every subset (float64 squared norms)."""
    full = [layer.forward(x) for x in batches]
    subsets = enumerate_subsets(layer.num_experts, keep)
    losses = []
    for kept in subsets:
        allowed = allowed_mask(kept, layer.num_experts)
        sq = sum(float((layer.forward(x, allowed).double() - f.double()).pow(2).sum())
                 for x, f in zip(batches, full, strict=True))
        losses.append(sq**0.5)
    result = best_subset(subsets, torch.tensor(losses, dtype=torch.float64))
    return result.kept, result.loss


def _demo_shaped(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """Random weights with the demo model's sizes: timing depends on shapes, not on training."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=8192, hidden_size=256, intermediate_size=448, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=args.seq_len)
    ids = torch.randint(0, 8192, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    return MixtralForCausalLM(config).eval(), ids, "random Mixtral of the demo shape (H 256, I 448, 8 experts)"


def _inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, str]:
    if args.demo_shape:
        return _demo_shaped(args)
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import VOCAB, tiny_model

        ids = torch.randint(3, VOCAB, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
        return tiny_model("mixtral"), ids, "tiny mixtral, random tokens"
    from moeslim.config import CalibrationConfig
    from moeslim.data.calibration_set import build_calibration_set
    from moeslim.models import load_model

    model, tokenizer = load_model(args.model)
    calibration = build_calibration_set(
        CalibrationConfig(data=tuple(args.data), samples=args.samples, seq_len=args.seq_len), tokenizer)
    return model, calibration.input_ids, f"{args.model}, {calibration.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Mixtral instead of --model")
    parser.add_argument("--demo-shape", action="store_true", help="random weights in the demo model's shape")
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--data", nargs="+", default=["demo:code", "demo:prose"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, input_ids, what = _inputs(args)
    timings: dict[int, dict] = {}

    def on_layer(layer: MoELayer, observers) -> LayerDecision:
        batches = observers[0].result()
        # Warm-up both paths on a few tokens so one-time kernel set-up is not charged to either.
        ours(layer, [batches[0][:8]], args.keep)
        layer.forward(batches[0][:8], allowed_mask(range(args.keep), layer.num_experts))
        start = time.perf_counter()
        kept_ours, loss_ours = ours(layer, batches, args.keep)
        mid = time.perf_counter()
        kept_ref, loss_ref = rerun(layer, batches, args.keep)
        end = time.perf_counter()
        return LayerDecision(result={"ours": mid - start, "rerun": end - mid, "agree": kept_ours == kept_ref,
                                     "kept": kept_ours, "loss": loss_ours, "loss_ref": loss_ref,
                                     "tokens": sum(x.shape[0] for x in batches), "experts": layer.num_experts})

    timings = run_layerwise(model, input_ids, lambda layer: [_Inputs()], on_layer, progress=False)
    print(f"# enumeration benchmark: {what}, keep={args.keep}, torch threads={torch.get_num_threads()}")
    print("layer  experts  tokens  subsets  ours_s  rerun_s  ratio  agree  kept  loss(ours / rerun)")
    for idx, r in sorted(timings.items()):
        subsets = len(enumerate_subsets(r["experts"], args.keep))
        print(f"{idx:5d}  {r['experts']:7d}  {r['tokens']:6d}  {subsets:7d}  {r['ours']:6.3f}  {r['rerun']:7.3f}  "
              f"{r['rerun'] / r['ours']:5.1f}x  {str(r['agree']):5s}  {list(r['kept'])}  "
              f"{r['loss']:.6g} / {r['loss_ref']:.6g}")
    total_ours = sum(r["ours"] for r in timings.values())
    total_ref = sum(r["rerun"] for r in timings.values())
    agree = all(r["agree"] for r in timings.values())
    print(f"total: ours {total_ours:.3f} s, re-run per subset {total_ref:.3f} s, ratio {total_ref / total_ours:.1f}x, "
          f"choices agree in every layer: {agree}")


if __name__ == "__main__":
    main()
