"""MC-SMoE's compression stage: merged experts as low-rank + structured-sparse projections, exact at full rank,
saved in the low-rank form and loaded back, bad options refused."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import moeslim
from moeslim.appliers import apply, needs_calibration
from moeslim.config import ConfigError
from moeslim.methods.merge import MergeConfig, plan_merge
from moeslim.methods.merge.compress import compress_projection, compressed_params, rank_for_share, select_rows
from moeslim.models import find_moe_layers
from moeslim.runtime.lowrank import lowrank_storage


def _ids(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_row_error_is_what_dropping_the_row_costs() -> None:
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 5, generator=gen), torch.randn(40, 5, generator=gen)
    cov = (x.T @ x).double()
    part = compress_projection(w, cov, rank=2, damp=1e-9)
    a, b = part.factors  # type: ignore[misc]
    assert torch.allclose(a @ b + part.residual, w, atol=1e-5)
    for o in range(6):  # keep every row but o: the output error is exactly row o's
        rows = torch.tensor([r for r in range(6) if r != o])
        err = ((part.dense(rows) - w).double() @ x.double().T).pow(2).sum()
        assert err.item() == pytest.approx(part.row_error[o].item(), rel=1e-4, abs=1e-6)
    assert torch.allclose(part.dense(torch.arange(6)), w, atol=1e-5)
    full = compress_projection(w, cov, rank=5, damp=0.01)  # a rank that saves nothing keeps W dense
    assert len(full.factors) == 1 and torch.equal(full.factors[0], w) and float(full.row_error.sum()) == 0


def test_select_rows_takes_the_largest_errors_of_the_layer() -> None:
    errors = [torch.tensor([1.0, 5.0, 0.0]), torch.tensor([4.0, 2.0]), torch.tensor([3.0])]
    assert [r.tolist() for r in select_rows(errors, 3)] == [[1], [0], [0]]
    assert [r.tolist() for r in select_rows(errors, 0)] == [[], [], []]
    assert sum(r.numel() for r in select_rows(errors, 99)) == 6


def test_rank_for_share_fits_the_budget() -> None:
    out, inp = 64, 32
    for share, sparse in ((0.5, 0.1), (0.25, 0.0), (1.0, 0.2)):
        r = rank_for_share(share, sparse, out, inp)
        assert compressed_params(r, round(sparse * out), out, inp) <= share * out * inp + 1e-9 or r == min(out, inp)
    with pytest.raises(ValueError, match="exceed"):
        rank_for_share(0.1, 0.2, out, inp)


@pytest.mark.parametrize(("family", "router"), [("mixtral", "keep"), ("qwen3_moe", "fit"), ("gpt_oss", "keep"),
                                                ("deepseek_v3", "keep")])  # transposed + biases; shared + sigmoid
def test_full_rank_compression_equals_plain_merging(family: str, router: str, tmp_path) -> None:
    model = tiny_model(family)
    ids = _ids()
    base = dict(keep=4, method="mc-smoe", router=router, fit_rows="representative", counts="uniform")
    plain, compressed = copy.deepcopy(model), copy.deepcopy(model)
    apply(plain, plan_merge(model, ids, MergeConfig(**base)))  # type: ignore[arg-type]
    plan = plan_merge(model, ids, MergeConfig(**base, compress_rank=10_000, compress_sparse=0.0))  # type: ignore[arg-type]
    assert needs_calibration(plan)
    apply(compressed, plan, calibration=ids)
    layer = find_moe_layers(compressed)[0]
    assert lowrank_storage(layer.experts), "the compressed experts compute through the low-rank runtime"
    with torch.no_grad():
        want = plain(ids).logits
        assert torch.allclose(compressed(ids).logits, want, atol=1e-5)
    moeslim.save(compressed, tmp_path / "mc")
    again, _ = moeslim.load(tmp_path / "mc")
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, want, atol=1e-5)


@pytest.mark.parametrize(("family", "router", "whiten"), [("qwen3_moe", "keep", True), ("gpt_oss", "fit", True),
                                                          ("mixtral", "keep", False)])
def test_compressed_merge_round_trip_keeps_its_budget(family: str, router: str, whiten: bool, tmp_path) -> None:
    model = tiny_model(family)
    ids = _ids()
    config = MergeConfig(keep=4, method="mc-smoe", router=router, counts="uniform",  # type: ignore[arg-type]
                         compress_ratio=0.5, compress_sparse=0.1, compress_whiten=whiten)
    plan = plan_merge(model, ids, config)
    assert needs_calibration(plan) == (whiten or router == "fit")
    applied = copy.deepcopy(model)
    apply(applied, plan, calibration=ids)
    section = applied.config.moeslim
    assert section["merge"]["compress"] and "lowrank" in section
    for idx, entry in plan.summary["layers"].items():
        info = entry["compress"]
        assert 0.3 < info["param_ratio"] <= 0.5 + 1e-3
        assert section["lowrank"]["layers"][idx]["up_sparse_rows"] == info["up_sparse_rows"]
        assert sum(info["up_sparse_rows"]) > 0
    layer = find_moe_layers(applied)[0]
    store = lowrank_storage(layer.experts)
    merged = 4 * sum(int(t.numel()) for t in (layer.experts.gate_up_proj, layer.experts.down_proj)) // \
        layer.num_experts
    stored = sum(p.params() for p in store.values())  # K stored experts whatever the router keeps
    assert stored <= 0.5 * merged + 64
    with torch.no_grad():
        want = applied(ids).logits
    moeslim.save(applied, tmp_path / "mc")
    assert not (tmp_path / "mc" / "model.safetensors").exists()
    again, _ = moeslim.load(tmp_path / "mc")
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, want, atol=1e-5)
    assert (tmp_path / "mc" / "moeslim_lowrank.safetensors").stat().st_size < 0.75 * _dense_bytes(model)


def _dense_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_bad_compression_options_fail_before_calibration() -> None:
    with pytest.raises(ConfigError, match="not both"):
        MergeConfig(keep=4, compress_rank=8, compress_ratio=0.5)
    with pytest.raises(ConfigError, match="compress_ratio"):
        MergeConfig(keep=4, compress_ratio=1.5)
    with pytest.raises(ConfigError, match="compress_rank"):
        MergeConfig(keep=4, compress_rank=-1)
    with pytest.raises(ConfigError, match="compress_sparse"):
        MergeConfig(keep=4, compress_sparse=1.0)
    with pytest.raises(ConfigError, match="lower compress_sparse"):
        MergeConfig(keep=4, compress_ratio=0.2, compress_sparse=0.3)


def test_cli_plan_merge_with_compression_then_apply_and_load(tiny_model_dir, tmp_path) -> None:
    """`--compress-ratio` is a flag; apply redraws the windows (covariances) and writes the low-rank form."""
    from moeslim.cli import main

    calib = ["--data", "demo:code", "--samples", "4", "--seq-len", "32", "--batch-size", "2"]
    plan = tmp_path / "merge.json"
    assert main(["plan", "merge", str(tiny_model_dir), "--method", "mc-smoe", "--keep", "6", "--compress-ratio",
                 "0.5", *calib, "--out", str(plan)]) == 0
    ckpt = tmp_path / "mc"
    assert main(["apply", str(tiny_model_dir), str(plan), "--out", str(ckpt)]) == 0
    model, _ = moeslim.load(ckpt)
    assert model.config.moeslim["merge"]["compress"]
    layer = find_moe_layers(model)[0]
    store = lowrank_storage(layer.experts)
    assert store and len(store["down_proj"].slots) == layer.num_experts == 8
    assert len(store["down_proj"].ranks) < 8  # one stored expert per group
