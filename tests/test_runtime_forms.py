"""One registry of the checkpoint forms moeslim writes beside save_pretrained (runtime/serialize.py)."""

from __future__ import annotations

import pytest

from moeslim.runtime.serialize import stored_form


@pytest.mark.parametrize("section, form", [
    ({}, None),
    ({"skip": {"betas": {}}}, None),  # skipping is re-installed on a plain checkpoint
    ({"quantize": {}}, "packed low-bit experts"),
    ({"lowrank": {}, "skip": {}}, "low-rank experts"),
    ({"prune": {"layout": "compact", "experts_per_layer": {"0": 2}}}, "compact non-uniform experts"),
    # compact and then quantized (a joint plan): the low-bit form cuts the layers to their counts itself
    ({"prune": {"layout": "compact", "experts_per_layer": {"0": 2}}, "quantize": {}}, "packed low-bit experts"),
    # a joint plan's low-rank layers beside quantized ones: the low-bit form's base file holds the factors
    ({"quantize": {}, "lowrank": {}}, "packed low-bit experts"),
    ({"prune": {"layout": "compact", "experts_per_layer": {"0": 2}}, "lowrank": {}}, "low-rank experts"),
])
def test_the_section_picks_the_form(section: dict, form: str | None) -> None:
    found = stored_form(section)
    assert (found.name if found is not None else None) == form
