"""Evaluate the trained demo MoE model and write its model card and reference numbers.

Writes into the model folder:

* ``eval.json``: validation perplexity per domain, unigram baseline, expert load per layer
  and domain, and the reference perplexity on the small slice checked by the tests;
* ``README.md``: the model card.

Usage::

    .venv/bin/python scripts/demo_model_card.py
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "src" / "moeslim" / "assets" / "demo-moe"
DEFAULT_CORPUS = REPO / "src" / "moeslim" / "assets" / "corpus"
DEFAULT_TRAIN_CORPUS = REPO / ".scratch" / "corpus"

DOMAINS = ("code", "prose")
EOS = "<|endoftext|>"
CONTEXT = 256
# The tests recompute perplexity on this many leading windows per domain (kept small for speed).
TEST_SLICE_WINDOWS = 16
PROMPT = "def fibonacci(n):\n"
SAMPLE_TOKENS = 40


def read_texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def token_stream(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """Documents joined with EOS after each one, exactly as during training."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def windows(stream: np.ndarray, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping CONTEXT-token windows from the start of the stream (tail dropped)."""
    n = len(stream) // CONTEXT if limit is None else min(limit, len(stream) // CONTEXT)
    return torch.from_numpy(stream[: n * CONTEXT]).view(n, CONTEXT)


@torch.no_grad()
def evaluate(model: Any, wins: torch.Tensor, batch: int = 16) -> tuple[float, np.ndarray]:
    """Perplexity (each window scored independently) and top-k expert load per layer.

    The load is the share of all top-k routing assignments that each expert receives.
    """
    cfg = model.config
    counts = np.zeros((cfg.num_hidden_layers, cfg.num_local_experts))
    nll, n_tok = 0.0, 0
    for i in range(0, len(wins), batch):
        x = wins[i : i + batch]
        out = model(input_ids=x, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        n_tok += x[:, 1:].numel()
        for layer, router_logits in enumerate(out.router_logits):
            top = router_logits.topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
            counts[layer] += np.bincount(top.numpy(), minlength=cfg.num_local_experts)
    return math.exp(nll / n_tok), counts / counts.sum(axis=1, keepdims=True)


def unigram_ppl(train: np.ndarray, wins: torch.Tensor, vocab: int) -> float:
    """Add-one smoothed unigram model from the train split, scored on the same targets."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = wins[:, 1:].reshape(-1).numpy()
    return float(np.exp(-logp[targets].mean()))


def param_counts(model: Any) -> dict[str, int]:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * cfg.num_experts_per_tok // cfg.num_local_experts
    embed = model.get_input_embeddings().weight.numel()
    return {"total": total, "experts": expert, "activated_per_token": active, "embedding": embed}


def greedy_sample(model: Any, tokenizer: Any) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=SAMPLE_TOKENS, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(out[0], skip_special_tokens=False))


def training_summary(model_dir: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (model_dir / "training_log.jsonl").open()]
    done = next(r for r in records if r.get("event") == "done")
    config = next(r for r in records if r.get("event") == "config")
    last_val = [r for r in records if "val_loss" in r][-1]
    return {"config": config, "done": done, "last_val": last_val}


def compute(model_dir: Path, corpus: Path, train_corpus: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # bf16 weights, float32 compute: the tests evaluate the same way.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    result: dict[str, Any] = {"context": CONTEXT, "test_slice_windows": TEST_SLICE_WINDOWS,
                              "params": param_counts(model), "domains": {}}
    for domain in DOMAINS:
        val = token_stream(tokenizer, read_texts(corpus / f"{domain}.validation.jsonl"))
        train = token_stream(tokenizer, read_texts(train_corpus / f"{domain}.train.jsonl"))
        wins = windows(val)
        ppl, load = evaluate(model, wins)
        slice_ppl, _ = evaluate(model, windows(val, TEST_SLICE_WINDOWS))
        result["domains"][domain] = {
            "validation_tokens": int(len(val)), "windows": int(len(wins)), "ppl": ppl,
            "unigram_ppl": unigram_ppl(train, wins, len(tokenizer)),
            "slice_ppl": slice_ppl, "expert_load": load.round(5).tolist(),
        }
    loads = [np.array(result["domains"][d]["expert_load"]) for d in DOMAINS]
    # Every window holds the same number of routing assignments, so pooling = window-weighted mean.
    weights = [result["domains"][d]["windows"] for d in DOMAINS]
    pooled = sum(w * load for w, load in zip(weights, loads, strict=True)) / sum(weights)
    result["expert_load_pooled"] = pooled.round(5).tolist()
    # Total-variation distance between the two domains' expert distributions, per layer.
    result["domain_load_tv_distance"] = (0.5 * np.abs(loads[0] - loads[1]).sum(axis=1)).round(4).tolist()
    result["greedy_sample"] = {"prompt": PROMPT, "max_new_tokens": SAMPLE_TOKENS,
                               "text": greedy_sample(model, tokenizer)}
    return result


def load_table(result: dict[str, Any]) -> str:
    n_exp = len(result["domains"]["code"]["expert_load"][0])
    head = "| domain | layer | " + " | ".join(f"e{i}" for i in range(n_exp)) + " | min |"
    rows = [head, "|---|---|" + "---|" * (n_exp + 1)]
    per_domain = {d: result["domains"][d]["expert_load"] for d in DOMAINS}
    for domain, layers in {**per_domain, "both": result["expert_load_pooled"]}.items():
        for layer, load in enumerate(layers):
            cells = " | ".join(f"{100 * v:.1f}" for v in load)
            rows.append(f"| {domain} | {layer} | {cells} | {100 * min(load):.1f} |")
    return "\n".join(rows)


def ppl_row(domain: str, r: dict[str, Any]) -> str:
    return f"| {domain} | {r['validation_tokens']:,} | {r['windows']} | {r['ppl']:.2f} | {r['unigram_ppl']:.1f} |"


def model_card(result: dict[str, Any], cfg: dict[str, Any], summary: dict[str, Any]) -> str:
    p, d = result["params"], result["domains"]
    tc, done = summary["config"], summary["done"]
    wall_min = done["wall_time_s"] / 60
    tv = ", ".join(f"{v:.3f}" for v in result["domain_load_tv_distance"])
    sample = result["greedy_sample"]["text"]
    return f"""# moeslim demo MoE (Mixtral-style, 8 experts, top-2)

A tiny mixture-of-experts causal language model trained from scratch on CPU, shipped with
`moeslim` so that examples and tests can exercise expert pruning / merging / slimming on a
real trained MoE offline. It is a toy: it is not useful for generating text.

## Architecture

`MixtralForCausalLM` ({cfg["num_hidden_layers"]} layers, hidden {cfg["hidden_size"]},
{cfg["num_attention_heads"]} query heads / {cfg["num_key_value_heads"]} KV heads of dim {cfg["head_dim"]},
{cfg["num_local_experts"]} SwiGLU experts per layer with intermediate size {cfg["intermediate_size"]},
top-{cfg["num_experts_per_tok"]} routing, RoPE, context {cfg["max_position_embeddings"]},
vocabulary {cfg["vocab_size"]}, tied input/output embeddings). Weights are stored in bfloat16.

| parameters | count |
|---|---|
| total | {p["total"]:,} |
| experts (all layers) | {p["experts"]:,} |
| activated per token | {p["activated_per_token"]:,} |
| embedding (tied with LM head) | {p["embedding"]:,} |

Tokenizer: byte-level BPE ({cfg["vocab_size"]} tokens, `<|endoftext|>` as BOS/EOS/UNK, `<|pad|>`
for padding) trained with `tokenizers` on the train split of the corpus.

## Training data

`moeslim/assets/corpus` (see its README): Python code (CPython standard library) and English
prose (paragraphs of the CPython documentation), both PSF licensed. Only the validation / test /
calibration splits are shipped; the train split is rebuilt with `scripts/build_demo_corpus.py`.
Every training batch holds equal numbers of 256-token windows from each domain.

## Training

AdamW (betas 0.9/0.95, weight decay 0.1), peak lr {tc["lr"]}, {tc["warmup"]} warmup steps then
cosine decay to 10 %, gradient clipping {tc["clip"]}, batch {tc["batch"]} x {CONTEXT} tokens,
Switch-style load-balancing loss computed per layer and averaged over layers
(coefficient {tc["aux_coef"]}; the built-in Mixtral aux loss pools all layers, which let single
experts starve in a first run), seed {tc["seed"]}, {tc["threads"]} CPU threads
(experts implementation `{tc["experts_impl"]}`, attention `{tc["attn_impl"]}`).
Trained for {done["steps"]} steps (planned {done["planned_steps"]}) = {done["train_tokens"]:,} tokens
in {wall_min:.1f} min wall time on a shared 2-core CPU ({platform.machine()}).
Per-step train loss and periodic validation loss are in `training_log.jsonl`.

## Evaluation (validation split)

Perplexity over fixed non-overlapping windows of {CONTEXT} tokens of each domain's validation
split (documents concatenated with `<|endoftext|>` after each, tail dropped, each window scored
independently; bf16 weights, float32 compute). The unigram baseline uses the same tokenizer
with token frequencies from the train split (add-one smoothing), scored on the same targets.

| domain | tokens | windows | model ppl | unigram ppl |
|---|---|---|---|---|
{ppl_row("code", d["code"])}
{ppl_row("prose", d["prose"])}

Expert load: share (%) of the top-2 routing assignments that each expert receives, per layer
and domain (`both` = the two validation sets pooled), on all validation windows:

{load_table(result)}

Total-variation distance between the code and prose expert distributions per layer: {tv}.

Greedy sample ({SAMPLE_TOKENS} new tokens) for the prompt `{PROMPT!r}`:

```
{sample}
```

Reference numbers are in `eval.json`; `tests/test_demo_model.py` re-checks them.
Rebuild: `python scripts/build_demo_corpus.py && python scripts/train_demo_model.py
--steps {tc["steps"]} --warmup {tc["warmup"]} --eval-every {tc["eval_every"]} && python scripts/demo_model_card.py`.

License: PSF License Version 2 (as the training data).
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--train-corpus", type=Path, default=DEFAULT_TRAIN_CORPUS)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    result = compute(args.model, args.corpus, args.train_corpus)
    (args.model / "eval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    cfg = json.loads((args.model / "config.json").read_text())
    card = model_card(result, cfg, training_summary(args.model))
    (args.model / "README.md").write_text(card, encoding="utf-8")
    print(card)


if __name__ == "__main__":
    main()
