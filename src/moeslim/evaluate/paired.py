"""Two models' perplexity ratio paired over the same test windows, with a 95 % interval: is the difference more
than the windows resolve?

Perplexity here is the geometric mean over D domains of each domain's perplexity, so
log(ppl(a) / ppl(b)) = mean_d sum_w (a_dw - b_dw) / T_d, with a_dw the summed NLL of window w of domain d and T_d
the domain's predicted tokens. Windows are taken as independent draws: each domain's sum has variance n_d s_d^2
(s_d^2 the sample variance of its n_d per-window differences), and the interval is the log ratio +- 1.96 standard
errors, mapped back through exp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedRatio", "paired_ratio"]

_Z95 = 1.96


@dataclass(frozen=True)
class PairedRatio:
    """ppl(a) / ppl(b) and its 95 % interval."""

    ratio: float
    low: float
    high: float


def paired_ratio(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], tokens: Mapping[str, int]
                 ) -> PairedRatio:
    """{domain: per-window summed NLL (n_d,)} of two models on the same windows, {domain: predicted tokens}."""
    if not a or set(a) != set(b) or not set(a) <= set(tokens):
        raise ValueError(f"paired windows need the same domains with token counts: {sorted(a)} against "
                         f"{sorted(b)}, tokens for {sorted(tokens)}")
    log_ratio, var = 0.0, 0.0
    for d, rows in a.items():
        if not rows or len(rows) != len(b[d]):
            raise ValueError(f"domain {d!r}: {len(rows)} windows against {len(b[d])}; score the same windows")
        diff = np.asarray(rows, dtype=np.float64) - np.asarray(b[d], dtype=np.float64)  # (n_d,)
        log_ratio += float(diff.sum()) / tokens[d]
        if len(diff) > 1:
            var += len(diff) * float(diff.var(ddof=1)) / tokens[d] ** 2
    domains = len(a)
    mean, se = log_ratio / domains, math.sqrt(var) / domains
    return PairedRatio(math.exp(mean), math.exp(mean - _Z95 * se), math.exp(mean + _Z95 * se))
