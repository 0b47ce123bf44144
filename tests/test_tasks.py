"""Task accuracy through lm-eval's HFLM and the bundled offline tasks, on a tiny model with an in-memory
byte-level BPE tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

from moeslim.evaluate.tasks import build_offline_tasks, run_tasks

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Experts are selected by a router for every token.",
    "import os\nimport sys\nprint(os.getcwd())\n",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_model(vocab_size: int) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    return MixtralForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok_model() -> tuple[PreTrainedTokenizerFast, MixtralForCausalLM]:
    tok = tiny_tokenizer()
    return tok, tiny_model(len(tok))


def _direct_ll(model: torch.nn.Module, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
    return sum(logp[len(ctx) + j - 1, t].item() for j, t in enumerate(cont))


def _code_doc(rng: random.Random, n_lines: int) -> str:
    names = ["alpha", "beta", "gamma", "delta", "value", "result", "index", "buffer"]
    return "\n".join(
        f"{rng.choice(names)}_{i} = {rng.choice(names)}({i}, {rng.randint(0, 999)})" for i in range(n_lines)
    )


def _prose_doc(rng: random.Random, n_sents: int) -> str:
    words = [
        "router",
        "expert",
        "token",
        "layer",
        "model",
        "weight",
        "prune",
        "skip",
        "keeps",
        "every",
        "the",
        "a",
        "of",
        "with",
    ]
    return " ".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "."
        for _ in range(n_sents)
    )


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus")
    for domain, make in (("code", lambda: _code_doc(rng, 30)), ("prose", lambda: _prose_doc(rng, 20))):
        lines = [json.dumps({"text": make()}) for _ in range(6)]
        (folder / f"{domain}.test.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_harness_scores_the_installed_runtime(tok_model) -> None:
    """HFLM over the in-memory model scores what its installed runtime (here: skipping) computes."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from moeslim.runtime.skipping import install_skipping

    tok, original = tok_model
    model = tiny_model(len(tok))
    install_skipping(model, {0: 0.9, 1: 0.9})  # skips most second experts: logits differ from the original
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    reqs = [("The quick brown", " fox jumps"), ("def add(a, b):\n", "    return a + b"), ("Experts", " are")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, args, i) for i, args in enumerate(reqs)],
                           disable_tqdm=True)
    differs = False
    for (ctx, cont), (ll, _greedy) in zip(reqs, got, strict=True):
        # the harness moves trailing whitespace of the context into the continuation
        whole = tok.encode(ctx + cont, add_special_tokens=False)
        n_ctx = len(tok.encode(ctx.rstrip(), add_special_tokens=False))
        assert ll == pytest.approx(_direct_ll(model, whole[:n_ctx], whole[n_ctx:]), abs=1e-4)
        differs |= abs(ll - _direct_ll(original, whole[:n_ctx], whole[n_ctx:])) > 1e-3
    assert differs  # the skipping forward really ran inside the harness


def test_offline_tasks_are_deterministic(corpus_dir: Path, tmp_path: Path) -> None:
    a = build_offline_tasks(tmp_path / "a", corpus_dir, n_items=10, seed=3)
    b = build_offline_tasks(tmp_path / "b", corpus_dir, n_items=10, seed=3)
    assert set(a) == {"moeslim_code_nextline", "moeslim_prose_continuation"}
    for name in a:
        assert a[name].read_text() == b[name].read_text()
        items = [json.loads(line) for line in a[name].read_text().splitlines()]
        assert len(items) == 10
        for it in items:
            assert len(set(it["choices"])) == 4 and 0 <= it["label"] < 4


def _reference_accuracy(model: torch.nn.Module, tok: PreTrainedTokenizerFast, path: Path, delimiter: str,
                        limit: int) -> tuple[float, float]:
    """acc / acc_norm by the multiple-choice rule, computed directly: argmax log-likelihood (per byte)."""
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    acc = acc_norm = 0
    for it in items:
        n_ctx = len(tok.encode(it["context"], add_special_tokens=False))
        lls, norms = [], []
        for choice in it["choices"]:
            whole = tok.encode(it["context"] + delimiter + choice, add_special_tokens=False)
            ll = _direct_ll(model, whole[:n_ctx], whole[n_ctx:])
            lls.append(ll)
            norms.append(ll / len((delimiter + choice).encode()))
        acc += int(max(range(len(lls)), key=lls.__getitem__) == it["label"])
        acc_norm += int(max(range(len(norms)), key=norms.__getitem__) == it["label"])
    return acc / len(items), acc_norm / len(items)


def test_offline_task_accuracy_equals_direct_scoring(tok_model, corpus_dir: Path, tmp_path: Path) -> None:
    from moeslim.evaluate.tasks import _TASK_SPECS

    tok, model = tok_model
    res = run_tasks(model, tok, ["moeslim_code_nextline", "moeslim_prose_continuation", "hellaswag"],
                    limit=6, batch_size=8, task_dir=tmp_path, corpus_dir=corpus_dir, n_items=12)
    for name in ("moeslim_code_nextline", "moeslim_prose_continuation"):
        assert res[name]["status"] == "ran", res[name]
        assert res[name]["backend"].startswith("lm-eval") and res[name]["n"] == 6
        acc, acc_norm = _reference_accuracy(model, tok, tmp_path / f"{name}.jsonl", _TASK_SPECS[name][2], 6)
        assert (res[name]["acc"], res[name]["acc_norm"]) == pytest.approx((acc, acc_norm))
    assert res["hellaswag"]["status"] == "skipped: offline"  # tests run with HF_HUB_OFFLINE=1
