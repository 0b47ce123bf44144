"""Two models' perplexity ratio paired over the same test windows (``evaluate/paired.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeslim.evaluate.paired import paired_ratio

TOKENS = {"code": 300, "prose": 500}


def _ppl_geo(rows: dict[str, list[float]]) -> float:
    return math.exp(sum(sum(r) / TOKENS[d] for d, r in rows.items()) / len(rows))


def test_the_ratio_is_the_geometric_perplexities_ratio_and_its_interval_holds_it() -> None:
    rng = np.random.default_rng(0)
    a = {"code": list(rng.uniform(300, 400, 10)), "prose": list(rng.uniform(600, 700, 10))}
    b = {d: [x - 2.0 + float(rng.normal(0, 1)) for x in rows] for d, rows in a.items()}
    got = paired_ratio(a, b, TOKENS)
    assert got.ratio == pytest.approx(_ppl_geo(a) / _ppl_geo(b), rel=1e-12)
    assert got.low < got.ratio < got.high
    # the standard error by hand: per domain n s^2 / T^2, summed, square-rooted, over the 2 domains
    var = sum(len(r) * np.var(np.subtract(r, b[d]), ddof=1) / TOKENS[d] ** 2 for d, r in a.items())
    assert math.log(got.high / got.ratio) == pytest.approx(1.96 * math.sqrt(var) / 2, rel=1e-9)


def test_a_constant_difference_has_no_width_and_noise_widens_it() -> None:
    a = {"code": [100.0, 120.0, 90.0], "prose": [200.0, 210.0, 190.0]}
    shifted = {d: [x + 3.0 for x in r] for d, r in a.items()}
    got = paired_ratio(a, shifted, TOKENS)
    assert got.low == pytest.approx(got.ratio) and got.high == pytest.approx(got.ratio) and got.ratio < 1
    noisy = {d: [x + 3.0 + e for x, e in zip(r, (-5.0, 0.0, 5.0), strict=True)] for d, r in a.items()}
    wide = paired_ratio(a, noisy, TOKENS)
    assert wide.ratio == pytest.approx(got.ratio) and wide.low < got.low and wide.high > got.high


@pytest.mark.parametrize("b", [{"code": [1.0, 2.0]}, {"code": [1.0], "prose": [1.0]}])
def test_windows_that_do_not_pair_are_refused(b: dict[str, list[float]]) -> None:
    with pytest.raises(ValueError, match="windows|domains"):
        paired_ratio({"code": [1.0, 2.0], "prose": [3.0, 4.0]}, b, TOKENS)
