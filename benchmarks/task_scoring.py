"""Multiple-choice task scoring: run_tasks with SharedPrefixHFLM (each context once) against lm-eval's HFLM.

    OMP_NUM_THREADS=1 python benchmarks/task_scoring.py [--models demo,demo-fine] [--limit 100] [--rounds 2]

Per model, alternating rounds of ``run_tasks(model, tokenizer, limit=LIMIT)`` on the two offline tasks, once with
HFLM's own ``_loglikelihood_tokens`` (the scoring before SharedPrefixHFLM) and once as shipped; best time of each.
The accuracies (acc and acc_norm of both tasks) must be identical.

Ends with, per model:
    task_scoring MODEL run_tasks s: hflm X.XX shared X.XX ratio X.XX
    task_scoring MODEL accuracies identical: True {task: (acc, acc_norm)}
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from moeslim.evaluate.shared_prefix import SharedPrefixHFLM
from moeslim.evaluate.tasks import run_tasks
from moeslim.models import load_model


@contextmanager
def hflm_scoring() -> Iterator[None]:
    """run_tasks scoring with HFLM's own _loglikelihood_tokens (what it used before SharedPrefixHFLM)."""
    from lm_eval.models.huggingface import HFLM

    shared = SharedPrefixHFLM.__dict__["_loglikelihood_tokens"]
    setattr(SharedPrefixHFLM, "_loglikelihood_tokens", HFLM._loglikelihood_tokens)  # noqa: B010
    try:
        yield
    finally:
        setattr(SharedPrefixHFLM, "_loglikelihood_tokens", shared)  # noqa: B010


def _timed(model: torch.nn.Module, tokenizer: object, limit: int) -> tuple[float, dict]:
    start = time.perf_counter()
    res = run_tasks(model, tokenizer, limit=limit)  # type: ignore[arg-type]
    return time.perf_counter() - start, {name: (r["acc"], r["acc_norm"]) for name, r in res.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,demo-fine")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    original = SharedPrefixHFLM.__dict__["_loglikelihood_tokens"]
    lines = []
    for name in args.models.split(","):
        model, tokenizer = load_model(name)
        times: dict[str, list[float]] = {"hflm": [], "shared": []}
        accs: dict[str, dict] = {}
        for _ in range(args.rounds):
            with hflm_scoring():
                seconds, accs["hflm"] = _timed(model, tokenizer, args.limit)
            times["hflm"].append(seconds)
            assert SharedPrefixHFLM.__dict__["_loglikelihood_tokens"] is original
            seconds, accs["shared"] = _timed(model, tokenizer, args.limit)
            times["shared"].append(seconds)
            print(name, {k: f"{v[-1]:.2f}" for k, v in times.items()}, flush=True)
        hflm, shared = min(times["hflm"]), min(times["shared"])
        lines.append(f"task_scoring {name} run_tasks s: hflm {hflm:.2f} shared {shared:.2f} ratio {hflm / shared:.2f}")
        lines.append(f"task_scoring {name} accuracies identical: {accs['hflm'] == accs['shared']} {accs['shared']}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
