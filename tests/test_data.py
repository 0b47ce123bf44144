"""Data sources: bundled corpus, local files, hub specs offline, windows, content hashes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moeslim.data import DataSourceError, load_source, token_windows
from moeslim.data.sources import bundled_domains


@pytest.fixture(scope="module")
def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["<eos>"] = len(vocab)
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def test_bundled_corpus_has_two_domains_and_three_splits() -> None:
    assert {"code", "prose"} <= set(bundled_domains())
    for domain in ("code", "prose"):
        for split in ("calibration", "validation", "test"):
            source = load_source(f"demo:{domain}:{split}")
            assert source.name == f"demo:{domain}:{split}" and len(source.documents) > 5
    assert load_source("demo:code").name == "demo:code:calibration"
    assert load_source("demo:code", split="test").name == "demo:code:test"
    # splits hold different documents
    assert not set(load_source("demo:code:test").documents) & set(load_source("demo:code:calibration").documents)


def test_local_files_and_hash(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]) + "\n")
    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "c.parquet")
    assert load_source(str(tmp_path / "a.txt")).documents == ("hello world\n",)
    jsonl, parquet = load_source(str(tmp_path / "b.jsonl")), load_source(str(tmp_path / "c.parquet"))
    assert jsonl.documents == parquet.documents == ("one", "two")
    assert jsonl.content_hash == parquet.content_hash  # the hash is of the content, not the file
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one!"}) + "\n")
    assert load_source(str(tmp_path / "d.jsonl")).content_hash != jsonl.content_hash


def test_bad_specs_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="demo:DOMAIN"):
        load_source("nonsense")
    with pytest.raises(DataSourceError, match="bundled domains"):
        load_source("demo:klingon")
    with pytest.raises(DataSourceError, match="split"):
        load_source("demo:code:train")
    with pytest.raises(DataSourceError, match="does not exist"):
        load_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "e.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataSourceError, match="no 'text' field"):
        load_source(str(tmp_path / "e.jsonl"))


def test_hub_source_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataSourceError, match="cannot reach"):
        load_source("hf:allenai/c4:en:validation")
    assert time.perf_counter() - start < 5


def test_windows_are_deterministic_and_fixed_length(tmp_path: Path, char_tokenizer: PreTrainedTokenizerFast) -> None:
    docs = [f"document number {i} " * 5 for i in range(20)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    source = load_source(str(tmp_path / "docs.jsonl"))
    everything = token_windows(source, char_tokenizer, seq_len=16)
    total = sum(len(d) + 1 for d in docs)  # characters + one EOS per document
    assert everything.shape == (total // 16, 16)
    a = token_windows(source, char_tokenizer, 16, num_samples=5, seed=3)
    b = token_windows(source, char_tokenizer, 16, num_samples=5, seed=3)
    c = token_windows(source, char_tokenizer, 16, num_samples=5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(any(torch.equal(row, full) for full in everything) for row in a)
    with pytest.raises(DataSourceError, match="lower --seq-len"):
        token_windows(source, char_tokenizer, seq_len=10**6)


def _window_rows(windows: torch.Tensor, everything: torch.Tensor) -> list[int]:
    """Which of ``everything``'s windows (by index) each row of ``windows`` is."""
    return [next(i for i, full in enumerate(everything) if torch.equal(row, full)) for row in windows]


def test_even_windows_take_one_per_equal_stretch(tmp_path: Path, char_tokenizer: PreTrainedTokenizerFast) -> None:
    docs = [f"text {i:03d} " * 7 for i in range(60)]  # distinct windows: every document numbered
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    source = load_source(str(tmp_path / "docs.jsonl"))
    everything = token_windows(source, char_tokenizer, seq_len=16)
    count = everything.shape[0]
    assert count == 240  # 60 documents of 63 characters + EOS, 16 per window
    rows = _window_rows(token_windows(source, char_tokenizer, 16, num_samples=10, spacing="even"), everything)
    assert rows == [24 * i for i in range(10)]  # window 0 of each stretch of 24 windows
    shifted = _window_rows(token_windows(source, char_tokenizer, 16, num_samples=10, seed=5, spacing="even"),
                           everything)
    assert shifted == [r + 5 for r in rows]
    wrapped = _window_rows(token_windows(source, char_tokenizer, 16, num_samples=10, seed=24 + 5, spacing="even"),
                           everything)
    assert wrapped == shifted  # the offset is taken modulo the stretch length
    assert rows != _window_rows(token_windows(source, char_tokenizer, 16, num_samples=10, seed=0), everything)
    with pytest.raises(DataSourceError, match="'random' or 'even'"):
        token_windows(source, char_tokenizer, 16, num_samples=10, spacing="uneven")


def test_plans_record_the_spacing_and_old_plans_mean_random() -> None:
    from moeslim.config import CalibrationConfig, ConfigError
    from moeslim.data.calibration_set import calibration_config

    even = CalibrationConfig(data=("demo:code",), samples=8, spacing="even")
    spec = {"data": ["demo:code"], "samples": 8, "seq_len": 256, "seed": 0, "batch_size": 8, "spacing": "even",
            "windows": 8, "windows_hash": "x"}
    assert calibration_config(spec) == even
    old = {k: v for k, v in spec.items() if k != "spacing"}  # a plan written before the field existed
    assert calibration_config(old).spacing == "random"
    with pytest.raises(ConfigError, match="spacing='sparse'"):
        CalibrationConfig(spacing="sparse")  # type: ignore[arg-type]
