"""The per-tensor GGUF type plan (``plan quantize --scope gguf``) on every family the GGUF export takes.

Per family: plan -> export -> the types read back from the file are the plan's, and the tensors the plan
measured are the ones the file holds (gate/up split and orientation as the export writes them, gpt-oss's
transposed, interleaved experts included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_export_gguf import _runnable_model, _tensor
from tiny_models import sample_ids
from transformers import AutoTokenizer

from moeslim.export import GGUF_FAMILIES, export_gguf, read_gguf_types
from moeslim.methods.quant.config import QuantizeConfig
from moeslim.methods.quant.driver import plan_quantize
from moeslim.methods.quant.gguf_types import _gguf_slices
from moeslim.models import find_moe_layers, resolve_model_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("demo"))


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_gguf_type_plan_is_what_the_file_holds(family: str, tokenizer, tmp_path: Path) -> None:
    from gguf import GGUFReader

    model = _runnable_model(family, len(tokenizer), {"intermediate_size": 64} if family == "mixtral" else {})
    plan = plan_quantize(model, sample_ids(0, 4, 16), QuantizeConfig(scope="gguf", bits=6.0, candidates=(2, 4, 8)))
    out = export_gguf(model, tokenizer, tmp_path / "pmq.gguf", qtype="Q8_0", plan=plan)
    stored = read_gguf_types(out.path)
    planned = {f"blk.{idx}.ffn_{proj}_exps.weight": qtype
               for idx, entry in plan.layers.items() for proj, qtype in entry["gguf_types"].items()}
    assert len(set(planned.values())) > 1  # a real mix at this budget, not one type everywhere
    assert {name: stored[name] for name in planned} == planned
    reader = GGUFReader(str(out.path))
    expert_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.endswith("_exps.weight"))
    assert expert_bytes == plan.summary["expert_bytes"]


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_measured_tensors_are_the_written_ones(family: str, tokenizer, tmp_path: Path) -> None:
    """read(e) is expert e's slice of the GGUF tensor; place(e, p, read(e)[p]) gives back the stored slice."""
    model = _runnable_model(family, len(tokenizer))
    out = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype="F32")
    from gguf import GGUFReader

    reader = GGUFReader(str(out.path))
    for layer in find_moe_layers(model):
        read, place = _gguf_slices(layer)
        for proj in ("gate", "up", "down"):
            written = _tensor(reader, f"blk.{layer.layer_idx}.ffn_{proj}_exps.weight")
            for e in range(layer.num_experts):
                mats = read(e)
                np.testing.assert_array_equal(mats[proj].detach().numpy(), written[e])
                replaced = place(e, proj, torch.zeros_like(mats[proj]))
                back = _gguf_slices(layer)[0]  # place must not touch the live weights
                np.testing.assert_array_equal(back(e)[proj].detach().numpy(), written[e])
                kept = place(e, proj, mats[proj])
                stored = layer.experts.down_proj[e] if proj == "down" else layer.experts.gate_up_proj[e]
                torch.testing.assert_close(kept, stored, rtol=0, atol=0)
                assert not torch.equal(replaced, stored)
