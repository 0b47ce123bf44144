"""KL divergence to the original's next-token distribution and top-1 agreement, in eval and the side-by-side table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeslim.cli import main
from moeslim.evaluate.divergence import Reference, ReferenceTop, kl_full, kl_top, reference_top, top1_agreement

EVAL = ["--tasks", "none", "--max-windows", "3", "--seq-len", "32", "--generate-tokens", "0", "--batch-size", "2"]


def _logp(*shape: int, seed: int) -> torch.Tensor:
    return torch.log_softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2, dim=-1)


def test_full_kl_is_torchs_kl_and_top_k_is_a_lower_bound_equal_at_k_v() -> None:
    p, q = _logp(2, 5, 50, seed=0), _logp(2, 5, 50, seed=1)
    exact = torch.nn.functional.kl_div(q.double(), p.double(), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_full(p, q), exact)
    values, ids = p.topk(50, dim=-1)
    # every token kept: the same number, up to the float32 rounding of the rest bucket (1 - sum p ~ 1e-7)
    torch.testing.assert_close(kl_top(values, ids, q), exact, atol=1e-5, rtol=1e-5)
    for k in (1, 5, 20):
        values, ids = p.topk(k, dim=-1)
        bound = kl_top(values, ids, q)
        assert bool((bound >= -1e-12).all()) and bool((bound <= exact + 1e-9).all())
    assert float(kl_full(p, p).abs().max()) == 0.0
    # chunks of positions (3 does not divide 2 x 5) give the very numbers of one pass over all of them
    p16 = p.half()
    whole = (p16.double().exp() * (p16.double() - q.double())).sum(-1)
    assert torch.equal(kl_full(p16, q, chunk=3), whole)
    assert bool(top1_agreement(p.argmax(-1), p).all())
    assert float(top1_agreement(p.argmax(-1), q).double().mean()) < 1.0


@pytest.mark.parametrize("k", [0, 8])
def test_reference_round_trips_through_its_file(k: int, tiny_model_dir: Path, tmp_path: Path) -> None:
    from moeslim.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    windows = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    top = reference_top(model, windows, k, batch_size=2)
    assert top.top_k == k and top.logp.shape[:2] == (3, 11)
    saved = Reference("tiny", k, {"code": top}).save(tmp_path / "ref.safetensors")
    back = Reference.load(saved)
    assert back.k == k and back.model == "tiny"
    assert torch.equal(back.domains["code"].logp, top.logp) and torch.equal(back.domains["code"].windows, windows)
    assert (back.domains["code"].ids is None) == (k == 0)
    with pytest.raises(ValueError, match="other windows"):
        back.domains["code"].check_windows(windows[:2], "code")


def test_eval_reports_kl_to_the_original_equal_to_the_direct_computation(tmp_path: Path) -> None:
    """On the trained demo model (a random tiny model predicts near-uniform distributions: KL ~ 1e-5 says nothing)."""
    from moeslim.config import EvalConfig
    from moeslim.evaluate._logits import next_token_distribution
    from moeslim.evaluate.driver import eval_windows
    from moeslim.io import load

    plan, pruned = tmp_path / "p.json", tmp_path / "pruned"
    assert main(["plan", "prune", "demo", "--method", "frequency", "--keep", "4", "--data", "demo:code",
                 "--samples", "4", "--seq-len", "32", "--out", str(plan)]) == 0
    assert main(["apply", "demo", str(plan), "--out", str(pruned)]) == 0
    ref = tmp_path / "ref.safetensors"
    assert main(["eval", "demo", *EVAL, "--data", "demo:code", "--save-reference", str(ref),
                 "--out", str(tmp_path / "orig.json")]) == 0
    assert main(["eval", "demo", *EVAL, "--data", "demo:code", "--reference", str(ref),
                 "--out", str(tmp_path / "self.json")]) == 0
    itself = json.loads((tmp_path / "self.json").read_text())
    assert abs(itself["kl_divergence"]["code"]) < 1e-3 and itself["top1_agreement"]["code"] == 1.0
    original, tokenizer = load("demo")
    small, _ = load(str(pruned))
    (_, _, windows), = eval_windows(tokenizer, EvalConfig(data=("demo:code",), seq_len=32, max_windows=3))
    p, q = next_token_distribution(original, windows), next_token_distribution(small, windows)
    expected = float(kl_full(p, q).mean())  # the same number computed here from both full distributions
    assert expected > 0.05
    for given in (str(ref), "demo"):  # the saved file, or the original model itself
        out = tmp_path / f"pruned-{len(given)}.json"
        assert main(["eval", str(pruned), *EVAL, "--data", "demo:code", "--reference", given, "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["kl_divergence"]["code"] == pytest.approx(expected, rel=1e-3)
        assert result["top1_agreement"]["code"] == pytest.approx(
            float(top1_agreement(p.argmax(-1), q).double().mean()))


def test_a_reference_of_other_windows_is_refused(tiny_model_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ref = tmp_path / "ref.safetensors"
    assert main(["eval", str(tiny_model_dir), *EVAL, "--data", "demo:code", "--save-reference", str(ref),
                 "--out", str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tiny_model_dir), *EVAL, "--data", "demo:code", "--seed", "1", "--reference", str(ref),
                 "--out", str(tmp_path / "b.json")]) == 2
    assert "computed on other windows" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), *EVAL, "--data", "demo:prose", "--reference", str(ref),
                 "--out", str(tmp_path / "c.json")]) == 2
    assert "has no domain 'prose'" in capsys.readouterr().err


def test_the_side_by_side_table_shows_kl_and_top1() -> None:
    from moeslim.evaluate.results import VariantResult
    from moeslim.evaluate.table import side_by_side_table

    results = [VariantResult("original", perplexity={"code": 10.0}, kl_divergence={"code": 0.0},
                             top1_agreement={"code": 1.0}),
               VariantResult("pruned", perplexity={"code": 12.0}, kl_divergence={"code": 0.25, "prose": 0.75},
                             top1_agreement={"code": 0.9, "prose": 0.8})]
    table = side_by_side_table(results)
    assert table.header[2:4] == ("KL", "top-1")
    assert table.rows[1][2:4] == ("0.5000", "85.0%")


def test_top_k_reference_is_kept_for_large_vocabularies(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--kl-top-k k: the reference file holds k tokens per position and the KL is the coarsened lower bound."""
    ref = tmp_path / "ref.safetensors"
    assert main(["eval", str(tiny_model_dir), *EVAL, "--data", "demo:code", "--kl-top-k", "16",
                 "--save-reference", str(ref), "--out", str(tmp_path / "a.json")]) == 0
    top = Reference.load(ref).domains["code"]
    assert isinstance(top, ReferenceTop) and top.top_k == 16 and top.logp.shape[-1] == 16
