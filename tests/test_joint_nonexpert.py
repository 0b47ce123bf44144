"""Packed attention and token embedding / head: the runtime (lookups and head equal to the dequantized weights),
save -> load, held bytes against the planner's accounting, and the joint planner's choices for them."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import sample_ids, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

import moeslim
from moeslim.appliers import apply
from moeslim.appliers.nonexpert import pack_nonexpert
from moeslim.config import ConfigError
from moeslim.evaluate.cost import param_bytes
from moeslim.methods.joint import JointConfig, plan_joint
from moeslim.methods.joint.config import MIB, resolve_targets
from moeslim.methods.joint.nonexpert import check_nonexpert
from moeslim.methods.joint.sizes import LayerBytes
from moeslim.methods.joint.solve import ChoiceGroup, SizeOption, min_held_bytes, solve_joint
from moeslim.models.held_bytes import held_bytes
from moeslim.models.nonexpert import token_matrices
from moeslim.plans import PlanError
from moeslim.runtime.packed_rows import PackedRows, quantize_rows

PROBE = sample_ids(7, 2, 12)
CALIB = sample_ids(0, 4, 16)


def _model(tied: bool, family: str = "olmoe") -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not tied:
            return tiny_model(family)
        config = tiny_config(family)
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0, 0.08)
        return model.eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_rows_equal_the_dequantized_matrix(bits: int) -> None:
    weight = torch.randn(40, 24)
    packed = quantize_rows(weight, bits, 16)
    rows = PackedRows(packed)
    dense = packed.dequantize()[0]
    assert torch.equal(rows.dequantize(), dense)
    ids = torch.tensor([[3, 0, 39], [7, 7, 12]])
    assert torch.equal(rows.rows(ids), dense[ids])
    x = torch.randn(5, 24)
    torch.testing.assert_close(rows.matmul(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    again = rows.to_lowbit()
    assert torch.equal(again.dequantize(), packed.dequantize())
    assert rows.nbytes() == 40 * 24 * bits // 8 + 40 * 2 * 2 + 40 * 2


def test_rows_refuse_rows_that_are_not_whole_bytes() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_rows(torch.randn(4, 13), 3, 8)


@pytest.mark.parametrize("tied", [True, False])
def test_packed_embedding_and_head_compute_the_dequantized_weights(tied: bool) -> None:
    model = _model(tied)
    matrices = token_matrices(model)
    assert matrices.tied == tied and matrices.head is not None
    emb_w = matrices.embedding.weight.detach().clone()
    head_w = matrices.head.weight.detach().clone()
    deq_emb = quantize_rows(emb_w, 4, 16).dequantize()[0]
    deq_head = quantize_rows(head_w, 4, 16).dequantize()[0]
    with torch.no_grad():
        reference = _model(tied)
        ref = token_matrices(reference)
        ref.embedding.weight.copy_(deq_emb)
        if not tied:
            ref.head.weight.copy_(deq_head)
        expected = reference(PROBE).logits
    before = held_bytes(model)
    section = pack_nonexpert(model, {}, 4, 16)
    assert list(section["packed_nonexpert"]["rows"].values())[0] == (
        ["model.embed_tokens.weight", "lm_head.weight"] if tied else ["model.embed_tokens.weight"])
    assert torch.equal(model.get_input_embeddings()(PROBE), deq_emb[PROBE])
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE).logits, expected, rtol=1e-4, atol=1e-4)
    v, h = emb_w.shape
    rows_bytes = v * h * 4 // 8 + v * (h // 16) * 3
    dense = v * h * 4
    assert before - held_bytes(model) == (dense - rows_bytes) * (1 if tied else 2)
    assert param_bytes(model)["quantized"] == rows_bytes * (1 if tied else 2)


@pytest.mark.parametrize("tied", [True, False])
def test_packed_nonexpert_save_load_round_trip(tmp_path: Path, tied: bool) -> None:
    model = _model(tied)
    section = pack_nonexpert(model, {0: 4, 1: 8}, 8, 16)
    model.config.moeslim = section
    with torch.no_grad():
        expected = model(PROBE).logits
    held = held_bytes(model)
    moeslim.save(model, tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _ = moeslim.load(tmp_path / "m")
    loaded.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, expected, rtol=0, atol=1e-5)
    assert torch.equal(loaded.get_input_embeddings()(PROBE), model.get_input_embeddings()(PROBE))
    assert held_bytes(loaded) == held
    assert token_matrices(loaded).tied == tied


def test_packing_twice_is_refused() -> None:
    model = _model(True)
    pack_nonexpert(model, {}, 8, 16)
    with pytest.raises(PlanError, match="already packed"):
        pack_nonexpert(model, {}, 4, 16)
    with pytest.raises(PlanError, match="no attention projections"):
        pack_nonexpert(model, {99: 4}, None, 16)


# -- the planner: choice groups for attention and embedding ------------------------------------------------------

def _brute_force_groups(options: dict[int, list[SizeOption]], widths: tuple[int, ...], sizes: dict[int, LayerBytes],
                        groups: list[ChoiceGroup], base: int, target: int) -> float:
    per_layer = []
    for idx, opts in options.items():
        choices = []
        for opt in opts:
            for bits in itertools.product(range(len(widths)), repeat=len(opt.kept)):
                err = opt.prune_err + sum(opt.quant_err[e, j] for e, j in enumerate(bits))
                choices.append((sizes[idx].saving([widths[j] for j in bits]), err))
        per_layer.append(choices)
    per_layer += [list(zip(g.saving, g.error, strict=True)) for g in groups]
    best = np.inf
    for combo in itertools.product(*per_layer):
        if base - sum(c[0] for c in combo) <= target:
            best = min(best, sum(c[1] for c in combo))
    return float(best)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milp_with_choice_groups_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    widths = (2, 4, 16)
    sizes = {i: LayerBytes(num_experts=2, row=7, width={2: 30, 4: 52, 16: 200}) for i in range(2)}
    options = {i: [SizeOption(kept=k, prune_err=float(rng.uniform(0, 3)) if len(k) < 2 else 0.0,
                              quant_err=np.concatenate([rng.uniform(0, 2, (len(k), 2)), np.zeros((len(k), 1))], 1),
                              freq=np.full(len(k), 0.5)) for k in ((0,), (0, 1))] for i in range(2)}
    groups = [ChoiceGroup(name, (16, 8, 4), (0.0, *sorted(rng.uniform(0, 2, 2).tolist())),
                          (0, int(rng.integers(50, 150)), int(rng.integers(150, 250)))) for name in ("attention.0",
                                                                                                   "embedding")]
    base = 2000
    low = min_held_bytes(base, sizes, dict.fromkeys(sizes, 1), widths, groups=groups)
    assert low == min_held_bytes(base, sizes, dict.fromkeys(sizes, 1), widths) - sum(max(g.saving) for g in groups)
    for target in np.linspace(low, base - 1, 9).astype(int).tolist():
        expected = _brute_force_groups(options, widths, sizes, groups, base, target)
        got = solve_joint(options, widths, sizes, base, target, groups=groups)
        assert got.error == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert got.held_bytes <= target
        assert set(got.groups) == {"attention.0", "embedding"}


@pytest.mark.parametrize("tied", [True, False])
def test_planned_nonexpert_widths_are_applied_within_the_target(tmp_path: Path, tied: bool) -> None:
    model = _model(tied)
    probe = JointConfig(target_ratio=0.9, quantizer="rtn", attention_widths=(8, 4), embedding_widths=(8, 4))
    targets = resolve_targets(model, probe)
    assert set(targets.nonexpert) == {"attention.0", "attention.1", "embedding"}
    low = min_held_bytes(targets.base, targets.sizes, dict.fromkeys(targets.sizes, min(targets.kept_sizes)),
                         probe.widths)  # the smallest plan without them
    target = low - 1000  # below what the experts alone reach: the plan must pack attention or embedding
    config = JointConfig(target_mib=target / MIB, quantizer="rtn", attention_widths=(8, 4), embedding_widths=(8, 4))
    plan = plan_joint(model, CALIB, config, "tiny")
    packed = [b for b in plan.summary["attention_bits"].values() if b != 16]
    assert packed or plan.summary["embedding_bits"] != 16
    apply(model, plan, calibration=CALIB)
    assert param_bytes(model)["total"] == plan.summary["held_bytes"] <= target
    moeslim.save(model, tmp_path / "j")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _ = moeslim.load(tmp_path / "j")
    assert param_bytes(loaded)["total"] == plan.summary["held_bytes"]


def test_default_plans_leave_attention_and_embedding_alone() -> None:
    model = _model(False)
    plan = plan_joint(model, CALIB, JointConfig(target_ratio=0.8, quantizer="rtn"), "tiny")
    assert "attention_bits" not in plan.summary and "embedding_bits" not in plan.summary
    assert resolve_targets(model, JointConfig(target_ratio=0.8)).nonexpert == {}


@pytest.mark.parametrize(("fields", "message"), [
    ({"attention_widths": (8, 9)}, "attention_widths"),
    ({"embedding_widths": (4, 4)}, "embedding_widths"),
    ({"embedding_widths": (0,)}, "embedding_widths"),
])
def test_bad_widths_are_refused(fields: dict[str, tuple[int, ...]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JointConfig(target_ratio=0.5, **fields)  # type: ignore[arg-type]


def test_widths_that_leave_rows_in_part_bytes_are_refused() -> None:
    model = _model(False)  # hidden 32: every width gives whole bytes; a 36-wide embedding at 3 bits does not
    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight = torch.nn.Parameter(torch.randn(emb.weight.shape[0], 36))
    with pytest.raises(ConfigError, match="whole bytes"):
        check_nonexpert(model, (), (16, 3))


def test_plan_joint_cli_takes_the_widths(tmp_path: Path) -> None:
    from moeslim.cli import build_parser

    args = build_parser().parse_args(["plan", "joint", "m", "--target-ratio", "0.3", "--attention-widths", "8,4",
                                      "--embedding-widths", "8", "--out", str(tmp_path / "p.json")])
    values = {k: v for k, v in vars(args).items() if v is not None}
    assert (8, 4) in values.values() and (8,) in values.values()


def test_gguf_writes_a_packed_embedding_dequantized_compressed_tensors_refuses_it(tmp_path: Path) -> None:
    # GGUF re-quantizes every matrix by its own types; compressed-tensors has a format for the experts only
    from moeslim.export import UnsupportedExportError
    from moeslim.export.compressed_tensors import export_compressed_tensors
    from moeslim.export.gguf import model_tensors
    from moeslim.runtime.packed_rows import packed_rows

    model = _model(True)
    pack_nonexpert(model, {}, 8, 16)
    storage = packed_rows(model)["model.embed_tokens.weight"]
    written = dict(model_tensors(model))
    assert torch.equal(written["model.embed_tokens.weight"], storage.dequantize())
    assert torch.equal(written["lm_head.weight"], storage.dequantize())  # tied: one storage, both names
    with pytest.raises(UnsupportedExportError, match="embedding"):
        export_compressed_tensors(model, None, tmp_path / "ct")


def test_frontier_offers_the_widths_to_the_joint_plans() -> None:
    from moeslim.workflows.frontier import FrontierConfig

    config = FrontierConfig().joint(0.15)
    assert config.attention_widths == (16, 8, 4) and config.embedding_widths == (16, 8, 4)
