"""lm-eval bridge and offline tasks on a tiny model with an in-memory byte-level BPE tokenizer."""

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


lm_eval = pytest.importorskip("lm_eval")


def test_loglikelihood_equals_direct_computation(tok_model) -> None:
    from lm_eval.api.instance import Instance

    from moeslim.evaluate.lm_eval_bridge import MoeslimLM

    tok, model = tok_model
    lm = MoeslimLM(model, tok, batch_size=2, progress=False)
    reqs = [("The quick brown", " fox jumps"), ("def add(a, b):\n", "    return a + b"), ("Experts", " are")]
    instances = [Instance("loglikelihood", {}, args, i) for i, args in enumerate(reqs)]
    got = lm.loglikelihood(instances, disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(reqs, got, strict=True):
        # the harness moves trailing whitespace of the context into the continuation
        whole = tok.encode(ctx + cont, add_special_tokens=False)
        n_ctx = len(tok.encode(ctx.rstrip(), add_special_tokens=False))
        assert ll == pytest.approx(_direct_ll(model, whole[:n_ctx], whole[n_ctx:]), abs=1e-4)
        assert isinstance(greedy, bool)


def test_rolling_and_generate(tok_model) -> None:
    from lm_eval.api.instance import Instance

    from moeslim.evaluate.lm_eval_bridge import MoeslimLM

    tok, model = tok_model
    text = SENTENCES[0] + " " + SENTENCES[2]
    ids = tok.encode(text, add_special_tokens=False)
    lm = MoeslimLM(model, tok, max_length=8, progress=False)  # forces several rolling chunks
    (rolled,) = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True
    )
    full = MoeslimLM(model, tok, max_length=512, progress=False)
    (whole,) = full.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True
    )
    assert whole == pytest.approx(_direct_ll(model, [tok.eos_token_id], ids), abs=1e-4)
    assert rolled < 0 and rolled != pytest.approx(whole, abs=1e-6)  # less context, different number
    (gen,) = lm.generate_until(
        [Instance("generate_until", {}, ("The quick", {"until": ["\n"], "max_gen_toks": 5}), 0)],
        disable_tqdm=True,
    )
    assert isinstance(gen, str) and "\n" not in gen


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


def test_offline_task_runs_through_lm_eval(tok_model, corpus_dir: Path, tmp_path: Path) -> None:
    tok, model = tok_model
    res = run_tasks(
        model,
        tok,
        ["moeslim_code_nextline", "moeslim_prose_continuation", "hellaswag"],
        limit=6,
        batch_size=8,
        task_dir=tmp_path,
        corpus_dir=corpus_dir,
        n_items=12,
    )
    for name in ("moeslim_code_nextline", "moeslim_prose_continuation"):
        assert res[name]["status"] == "ran", res[name]
        assert res[name]["backend"].startswith("lm-eval")
        assert 0.0 <= res[name]["acc"] <= 1.0 and 0.0 <= res[name]["acc_norm"] <= 1.0
        assert res[name]["n"] == 6
    assert res["hellaswag"]["status"].startswith(("skipped", "ran", "failed"))
    builtin = run_tasks(
        model, tok, ["moeslim_code_nextline"], limit=6, corpus_dir=corpus_dir, n_items=12, backend="builtin"
    )
    # same items, same scoring rule: the built-in scorer agrees with the harness
    assert builtin["moeslim_code_nextline"]["acc"] == pytest.approx(res["moeslim_code_nextline"]["acc"])
