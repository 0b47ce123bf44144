"""Evaluate a trained demo MoE model and write its model card and reference numbers.

Works for both layouts of ``scripts/train_demo_model.py``: ``assets/demo-moe`` (Mixtral, 8 experts)
and ``assets/demo-fine`` (Qwen3-MoE, 64 fine-grained experts). Writes into the model folder:

* ``eval.json``: validation perplexity per domain, unigram baseline, expert load per layer
  and domain (validation and calibration splits), dead-expert counts, and the reference
  perplexity on the small slice checked by the tests;
* ``README.md``: the model card.

Usage::

    .venv/bin/python scripts/demo_model_card.py
    .venv/bin/python scripts/demo_model_card.py --model src/moeslim/assets/demo-fine
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
# Above this many experts the card summarises each layer's load instead of listing every expert.
FULL_TABLE_MAX_EXPERTS = 16
# Histogram bins of an expert's load share, as multiples of the uniform share 1/E (left-closed).
LOAD_BINS = (0.0, 0.5, 0.8, 1.25, 2.0)


def num_experts(cfg: Any) -> int:
    """Experts per MoE layer: Mixtral names it num_local_experts, Qwen3-MoE / OLMoE num_experts."""
    for key in ("num_local_experts", "num_experts"):
        if isinstance(getattr(cfg, key, None), int):
            return int(getattr(cfg, key))
    raise ValueError(f"{type(cfg).__name__} has neither num_local_experts nor num_experts; not a demo MoE config")


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
    n_exp = num_experts(cfg)
    counts = np.zeros((cfg.num_hidden_layers, n_exp))
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
            counts[layer] += np.bincount(top.numpy(), minlength=n_exp)
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
    active = total - expert + expert * cfg.num_experts_per_tok // num_experts(cfg)
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
                              "params": param_counts(model),
                              "checkpoint_mb": (model_dir / "model.safetensors").stat().st_size / 1e6, "domains": {}}
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
    # Calibration split (what `moeslim plan prune` calibrates on by default): an expert no token
    # routes to there would be pruned blind, so the card reports dead experts on it too.
    calib = [windows(token_stream(tokenizer, read_texts(corpus / f"{d}.calibration.jsonl"))) for d in DOMAINS]
    _, calib_load = evaluate(model, torch.cat(calib))
    result["expert_load_calibration"] = calib_load.round(5).tolist()
    result["dead_experts"] = {
        "validation": [int((np.asarray(layer) == 0).sum()) for layer in result["expert_load_pooled"]],
        "calibration": [int((layer == 0).sum()) for layer in calib_load],
    }
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


def load_histogram_table(result: dict[str, Any]) -> str:
    """Per layer and split: min / max load share, their ratio, dead experts and a histogram of the loads
    in multiples of the uniform share (for layers with too many experts to list one by one)."""
    edges = [*LOAD_BINS, math.inf]
    bins = [f"{lo:g}-{hi:g}x" if hi != math.inf else f">={lo:g}x" for lo, hi in zip(edges, edges[1:], strict=False)]
    head = "| split | layer | min % | max % | max/min | dead | " + " | ".join(bins) + " |"
    rows = [head, "|---|---|---|---|---|---|" + "---|" * len(bins)]
    splits = {**{d: result["domains"][d]["expert_load"] for d in DOMAINS},
              "both (validation)": result["expert_load_pooled"],
              "calibration": result["expert_load_calibration"]}
    for split, layers in splits.items():
        for layer, load in enumerate(layers):
            share = np.asarray(load)
            rel = share * len(share)  # 1.0 = uniform share
            hist = np.histogram(rel, bins=np.array(edges[:-1] + [np.inf]))[0]
            ratio = f"{share.max() / share.min():.1f}" if share.min() > 0 else "inf"
            rows.append(f"| {split} | {layer} | {100 * share.min():.2f} | {100 * share.max():.2f} | {ratio} | "
                        f"{int((share == 0).sum())} | " + " | ".join(str(int(h)) for h in hist) + " |")
    return "\n".join(rows)


def load_section(result: dict[str, Any], cfg: dict[str, Any]) -> str:
    n_exp, top_k = num_experts_json(cfg), cfg["num_experts_per_tok"]
    if n_exp <= FULL_TABLE_MAX_EXPERTS:
        return (f"Expert load: share (%) of the top-{top_k} routing assignments that each expert receives, per layer\n"
                f"and domain (`both` = the two validation sets pooled), on all validation windows:\n\n"
                f"{load_table(result)}")
    dead = result["dead_experts"]
    return (f"Expert load: share of the top-{top_k} routing assignments that each of the {n_exp} experts of a\n"
            f"layer receives (uniform = {100 / n_exp:.2f} %), on all validation windows per domain, both pooled,\n"
            f"and on the calibration split (both domains). The histogram columns count experts whose share\n"
            f"lies in the given range of multiples of the uniform share; `dead` = experts that receive no\n"
            f"token at all. Dead experts per layer: validation {dead['validation']}, calibration\n"
            f"{dead['calibration']}. Per-expert shares are in `eval.json`.\n\n{load_histogram_table(result)}")


def num_experts_json(cfg: dict[str, Any]) -> int:
    """``num_experts`` for a config.json dict (see ``num_experts``)."""
    return int(cfg.get("num_local_experts") or cfg["num_experts"])


def architecture(cfg: dict[str, Any]) -> tuple[str, str]:
    """Card title and the architecture paragraph for the model's layout."""
    trunk = (f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']},\n"
             f"{cfg['num_attention_heads']} query heads / {cfg['num_key_value_heads']} KV heads "
             f"of dim {cfg['head_dim']}")
    tail = (f"RoPE, context {cfg['max_position_embeddings']},\nvocabulary {cfg['vocab_size']}, tied input/output "
            "embeddings). Weights are stored in bfloat16.")
    n_exp, top_k = num_experts_json(cfg), cfg["num_experts_per_tok"]
    if cfg["model_type"] == "mixtral":
        title = f"moeslim demo MoE (Mixtral-style, {n_exp} experts, top-{top_k})"
        body = (f"`MixtralForCausalLM` ({trunk},\n{n_exp} SwiGLU experts per layer with intermediate size "
                f"{cfg['intermediate_size']},\ntop-{top_k} routing, {tail}")
        return title, body
    renorm = "renormalised" if cfg.get("norm_topk_prob") else "raw softmax"
    title = f"moeslim fine-grained demo MoE (Qwen3-MoE, {n_exp} experts, top-{top_k})"
    body = (f"`Qwen3MoeForCausalLM` ({trunk}, QK-norm,\n{n_exp} small SwiGLU experts in every layer with "
            f"intermediate size {cfg['moe_intermediate_size']},\ntop-{top_k} routing with {renorm} top-k weights, "
            f"no shared expert, {tail}\n\n"
            f"Why this shape: the fine-grained layout of Qwen3-30B-A3B / OLMoE scaled down to the demo trunk:\n"
            f"expert width {cfg['moe_intermediate_size'] / cfg['hidden_size']:.2f} x hidden (Qwen3-30B-A3B: "
            f"0.375, OLMoE: 0.5) and top-{top_k} of {n_exp} experts (OLMoE: 8 of 64, Qwen3: 8 of 128), so each\n"
            f"token's FFN is a sum of {top_k} narrow experts and pruning chooses among C({n_exp}, keep) kept sets\n"
            f"per layer, far beyond enumeration (the Mixtral demo has C(8, keep) <= 70). The expert width\n"
            f"is what keeps {n_exp} experts x {cfg['num_hidden_layers']} layers within the ~40 MB budget in bf16.")
    return title, body


def ppl_row(domain: str, r: dict[str, Any]) -> str:
    return f"| {domain} | {r['validation_tokens']:,} | {r['windows']} | {r['ppl']:.2f} | {r['unigram_ppl']:.1f} |"


def early_stop_note(summary: dict[str, Any]) -> str:
    """Say so when the wall-clock safety net (--deadline-min) ended training before the planned steps."""
    done, last = summary["done"], summary["last_val"]
    if done["steps"] >= done["planned_steps"]:
        return ""
    deadline = summary["config"]["deadline_min"]
    return (f"\nTraining was stopped by the wall-clock safety net (`--deadline-min {deadline}`)"
            f"\non a machine shared with other jobs, at learning rate {last['lr']:.2g} of the cosine schedule\n"
            f"(the planned run decays to {0.1 * summary['config']['lr']:.2g}).")


def model_card(result: dict[str, Any], cfg: dict[str, Any], summary: dict[str, Any], model_dir: Path) -> str:
    p, d = result["params"], result["domains"]
    tc, done = summary["config"], summary["done"]
    wall_min = done["wall_time_s"] / 60
    tv = ", ".join(f"{v:.3f}" for v in result["domain_load_tv_distance"])
    sample = result["greedy_sample"]["text"]
    title, arch = architecture(cfg)
    model_dir_rel = model_dir.resolve().relative_to(REPO) if model_dir.resolve().is_relative_to(REPO) else model_dir
    layout = tc.get("layout", "mixtral")
    tokenizer_note = ("trained with `tokenizers` on the train split of the corpus" if layout == "mixtral" else
                      "the tokenizer of `moeslim/assets/demo-moe`, reused unchanged so both demo\nmodels share the "
                      "corpus and the evaluation code")
    layout_flag = "" if layout == "mixtral" else f" --layout {layout}"
    # A run cut by the wall-clock safety net is repeated exactly by stopping at the same step.
    # The thread count is part of the recipe: reductions differ between thread counts, so the bits do too.
    stop_flag = (f" --max-steps {done['steps']}" if done["steps"] < done["planned_steps"] else "")
    stop_flag += f" --threads {tc['threads']}"
    tests = "tests/test_demo_model.py" if layout == "mixtral" else "tests/test_demo_fine_model.py"
    return f"""# {title}

A tiny mixture-of-experts causal language model trained from scratch on CPU, shipped with
`moeslim` so that examples and tests can exercise expert pruning / merging / slimming on a
real trained MoE offline. It is a toy: it is not useful for generating text.

## Architecture

{arch}

| parameters | count |
|---|---|
| total | {p["total"]:,} |
| experts (all layers) | {p["experts"]:,} |
| activated per token | {p["activated_per_token"]:,} |
| embedding (tied with LM head) | {p["embedding"]:,} |
| checkpoint (`model.safetensors`, bf16) | {result["checkpoint_mb"]:.1f} MB |

Tokenizer: byte-level BPE ({cfg["vocab_size"]} tokens, `<|endoftext|>` as BOS/EOS/UNK, `<|pad|>`
for padding): {tokenizer_note}.

## Training data

`moeslim/assets/corpus` (see its README): Python code (CPython standard library) and English
prose (paragraphs of the CPython documentation), both PSF licensed. Only the validation / test /
calibration splits are shipped; the train split is rebuilt with `scripts/build_demo_corpus.py`.
Every training batch holds equal numbers of 256-token windows from each domain.

## Training

AdamW (betas 0.9/0.95, weight decay 0.1), peak lr {tc["lr"]}, {tc["warmup"]} warmup steps then
cosine decay to 10 %, gradient clipping {tc["clip"]}, batch {tc["batch"]} x {CONTEXT} tokens,
Switch-style load-balancing loss computed per layer and averaged over layers
(coefficient {tc["aux_coef"]}; the built-in transformers aux loss pools all layers, which let single
experts starve in a first run), seed {tc["seed"]}, {tc["threads"]} CPU threads
(experts implementation `{tc["experts_impl"]}`, attention `{tc["attn_impl"]}`).
Trained for {done["steps"]} steps (planned {done["planned_steps"]}) = {done["train_tokens"]:,} tokens
in {wall_min:.1f} min wall time on a shared 2-core CPU ({platform.machine()}).{early_stop_note(summary)}
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

{load_section(result, cfg)}

Total-variation distance between the code and prose expert distributions per layer: {tv}.

Greedy sample ({SAMPLE_TOKENS} new tokens) for the prompt `{PROMPT!r}`:

```
{sample}
```

Reference numbers are in `eval.json`; `{tests}` re-checks them.
Rebuild: `python scripts/build_demo_corpus.py && python scripts/train_demo_model.py{layout_flag}
--steps {tc["steps"]} --warmup {tc["warmup"]} --eval-every {tc["eval_every"]}{stop_flag}
&& python scripts/demo_model_card.py --model {model_dir_rel}`.

License: PSF License Version 2 (as the training data).
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--train-corpus", type=Path, default=DEFAULT_TRAIN_CORPUS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--card-only", action="store_true",
                   help="rewrite README.md from the existing eval.json (no evaluation)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.card_only:
        result = json.loads((args.model / "eval.json").read_text())
        # eval.json files written before the size was recorded: it is a plain file property.
        result.setdefault("checkpoint_mb", (args.model / "model.safetensors").stat().st_size / 1e6)
    else:
        result = compute(args.model, args.corpus, args.train_corpus)
        (args.model / "eval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    cfg = json.loads((args.model / "config.json").read_text())
    card = model_card(result, cfg, training_summary(args.model), args.model)
    (args.model / "README.md").write_text(card, encoding="utf-8")
    print(card)


if __name__ == "__main__":
    main()
