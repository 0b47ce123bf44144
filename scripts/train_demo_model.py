"""Train an embedded demo MoE model from scratch on CPU.

Two layouts share everything but the config:

* ``--layout mixtral`` (``assets/demo-moe``): ``MixtralForCausalLM``, 8 experts, top-2;
* ``--layout fine`` (``assets/demo-fine``): ``Qwen3MoeForCausalLM``, many small experts
  (default 64 experts of intermediate size 80, top-8, renormalised top-k weights), the
  fine-grained layout of Qwen3-MoE / OLMoE. It reuses the demo-moe tokenizer (``--tokenizer``)
  so both models share the corpus and evaluation code.

Steps (all seeded and deterministic):

1. train a byte-level BPE tokenizer on the train split of the demo corpus
   (``scripts/build_demo_corpus.py`` must have been run first), or load ``--tokenizer``;
2. train the model (per-layer load-balancing loss) on batches that mix the ``code`` and
   ``prose`` domains in equal parts;
3. save the bf16 model, the tokenizer and ``training_log.jsonl`` to ``--out``.

Usage::

    # measure step time without saving anything
    .venv/bin/python scripts/train_demo_model.py --bench 5 --experts-impl eager
    # the real runs
    .venv/bin/python scripts/train_demo_model.py --steps 1500
    .venv/bin/python scripts/train_demo_model.py --layout fine --steps 800
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "src" / "moeslim" / "assets"
DEFAULT_CORPUS = ASSETS / "corpus"
DEFAULT_TRAIN_CORPUS = REPO / ".scratch" / "corpus"

DOMAINS = ("code", "prose")
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|pad|>"]
VOCAB_SIZE = 8192
CONTEXT = 256
# Per layout: output folder, token cache folder, experts per layer, top-k, expert intermediate size, tokenizer to reuse
# (None = train one). The fine layout follows Qwen3-30B-A3B's ratios scaled to hidden 256:
# expert width ~0.3 x hidden, top-8 of 64, renormalised top-k weights.
LAYOUTS: dict[str, dict[str, Any]] = {
    "mixtral": {"out": ASSETS / "demo-moe", "experts": 8, "top_k": 2, "expert_dim": 448, "tokenizer": None,
                "work": REPO / ".scratch" / "demo-train"},
    "fine": {"out": ASSETS / "demo-fine", "experts": 64, "top_k": 8, "expert_dim": 80,
             "tokenizer": ASSETS / "demo-moe", "work": REPO / ".scratch" / "fine-train"},
}


def read_texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(train_corpus: Path, out_dir: Path) -> Any:
    """Byte-level BPE on both domains' train splits, saved in transformers format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets exact for code, where whitespace is meaningful.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [t for d in DOMAINS for t in read_texts(train_corpus / f"{d}.train.jsonl")]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token="<|pad|>",
        model_max_length=CONTEXT,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def load_or_train_tokenizer(train_corpus: Path, work: Path, existing: Path | None = None) -> Any:
    """``existing`` (a model folder with tokenizer files) wins; else the cached or a newly trained one."""
    from transformers import AutoTokenizer

    if existing is not None:
        if not (existing / "tokenizer.json").exists():
            raise FileNotFoundError(f"--tokenizer {existing} has no tokenizer.json; pass a folder that has one")
        return AutoTokenizer.from_pretrained(str(existing))
    tok_dir = work / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(tok_dir))
    return train_tokenizer(train_corpus, tok_dir)


def token_stream(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """Concatenate documents, each followed by EOS, into one int32 token stream."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def load_streams(tokenizer: Any, folder: Path, split: str, work: Path) -> dict[str, np.ndarray]:
    """Token streams per domain, cached in the work dir (tokenizing 14 MB takes a while)."""
    streams = {}
    for domain in DOMAINS:
        cache = work / f"{domain}.{split}.npy"
        if cache.exists():
            streams[domain] = np.load(cache)
            continue
        streams[domain] = token_stream(tokenizer, read_texts(folder / f"{domain}.{split}.jsonl"))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, streams[domain])
    return streams


def eval_windows(stream: np.ndarray, n: int) -> torch.Tensor:
    """First ``n`` non-overlapping CONTEXT-token windows: a fixed, comparable eval set."""
    n = min(n, len(stream) // CONTEXT)
    return torch.from_numpy(stream[: n * CONTEXT].astype(np.int64)).view(n, CONTEXT)


def sample_batch(streams: dict[str, np.ndarray], per_domain: int, rng: np.random.Generator) -> torch.Tensor:
    """Random CONTEXT-token windows, ``per_domain`` from each domain (equal mixing)."""
    rows = []
    for domain in DOMAINS:
        stream = streams[domain]
        starts = rng.integers(0, len(stream) - CONTEXT, size=per_domain)
        rows.extend(stream[s : s + CONTEXT] for s in starts)
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def build_config(tokenizer: Any, args: argparse.Namespace) -> Any:
    """Same trunk for both layouts (4 layers, hidden 256, GQA 8/4 heads of 32); only the MoE differs."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    eos = tokenizer.convert_tokens_to_ids(EOS)
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer), "hidden_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
        "max_position_embeddings": CONTEXT, "num_experts_per_tok": args.top_k,
        "output_router_logits": True, "router_aux_loss_coef": args.aux_coef, "tie_word_embeddings": True,
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id,
        "sliding_window": None,
    }
    if args.layout == "mixtral":
        config = MixtralConfig(**common, intermediate_size=args.expert_dim, num_local_experts=args.experts,
                               router_jitter_noise=0.0)
    else:
        # intermediate_size only sizes dense MLP layers, of which there are none (every layer is MoE).
        config = Qwen3MoeConfig(**common, moe_intermediate_size=args.expert_dim, intermediate_size=4 * args.expert_dim,
                                num_experts=args.experts, norm_topk_prob=True, decoder_sparse_step=1,
                                mlp_only_layers=[], use_sliding_window=False)
    config._attn_implementation = args.attn_impl
    config._experts_implementation = args.experts_impl
    return config


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(model: Any, windows: dict[str, torch.Tensor], batch: int) -> dict[str, float]:
    """Mean next-token cross-entropy per domain (no aux loss) on the fixed windows."""
    model.eval()
    out = {}
    for domain, w in windows.items():
        total, count = 0.0, 0
        for i in range(0, len(w), batch):
            x = w[i : i + batch]
            logits = model(input_ids=x, output_router_logits=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += x[:, 1:].numel()
        out[domain] = total / count
    model.train()
    return out


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss computed per layer, then averaged (1.0 = balanced).

    transformers' built-in Mixtral aux loss concatenates all layers before averaging, so an
    expert starved in one layer can be compensated by the same expert index in another layer;
    in a pilot this left experts with 0 % of the tokens. Balancing each layer avoids that.
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        n_experts = probs.size(-1)
        top = probs.topk(top_k, dim=-1).indices
        share = torch.nn.functional.one_hot(top, n_experts).float().sum(1).mean(0) / top_k
        losses.append(n_experts * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def train_step(model: Any, opt: torch.optim.Optimizer, x: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    out = model(input_ids=x, output_router_logits=True)
    logits = out.logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))
    balance = per_layer_balance_loss(out.router_logits, model.config.num_experts_per_tok)
    loss = ce + args.aux_coef * balance
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    return {"loss": ce.item(), "balance_loss": balance.item()}


def bench(model: Any, opt: torch.optim.Optimizer, streams: dict[str, np.ndarray],
          args: argparse.Namespace) -> None:
    """Time a few steps (after one warm-up step) to size the real run."""
    rng = np.random.default_rng(args.seed)
    train_step(model, opt, sample_batch(streams, args.batch // 2, rng), args)
    t0 = time.perf_counter()
    for _ in range(args.bench):
        train_step(model, opt, sample_batch(streams, args.batch // 2, rng), args)
    dt = (time.perf_counter() - t0) / args.bench
    tok_s = args.batch * CONTEXT / dt
    print(f"experts={args.experts_impl} attn={args.attn_impl} batch={args.batch}: "
          f"{dt:.3f} s/step, {tok_s:.0f} tok/s")


def train(model: Any, opt: torch.optim.Optimizer, streams: dict[str, np.ndarray],
          val: dict[str, torch.Tensor], args: argparse.Namespace, log: Any) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", mininterval=10)
    for step in bar:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        stats = train_step(model, opt, sample_batch(streams, args.batch // 2, rng), args)
        record: dict[str, Any] = {"step": step + 1, "lr": lr, **stats,
                                  "elapsed_s": round(time.perf_counter() - start, 1)}
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last:
            record["val_loss"] = validation_loss(model, val, args.batch)
        if (step + 1) % args.log_every == 0 or "val_loss" in record:
            log.write(json.dumps(record) + "\n")
            log.flush()
        bar.set_postfix(loss=f"{stats['loss']:.3f}", bal=f"{stats['balance_loss']:.3f}")
        # Safety net for a shared machine: stop (and still save) rather than miss a deadline. --max-steps
        # repeats such a stop exactly (same schedule, same stopping step) on any machine.
        stop = (args.deadline_min and record["elapsed_s"] > args.deadline_min * 60) or step + 1 == args.max_steps
        if stop and not last:
            if "val_loss" not in record:
                record["val_loss"] = validation_loss(model, val, args.batch)
                log.write(json.dumps(record) + "\n")
            break
    steps_done = int(record["step"])
    wall = time.perf_counter() - start
    return {"event": "done", "steps": steps_done, "planned_steps": args.steps,
            "train_tokens": steps_done * args.batch * CONTEXT, "wall_time_s": round(wall, 1)}


def save(model: Any, tokenizer: Any, out: Path) -> None:
    # Router logits are only needed for the training loss; callers can ask for them.
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default="mixtral", choices=sorted(LAYOUTS),
                   help="mixtral: 8 experts top-2 (demo-moe); fine: Qwen3-MoE, 64 small experts top-8 (demo-fine)")
    p.add_argument("--out", type=Path, default=None, help="default: the layout's asset folder")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="reuse this folder's tokenizer (default for --layout fine: assets/demo-moe)")
    p.add_argument("--experts", type=int, default=None, help="experts per layer (default: per layout)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: per layout)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--train-corpus", type=Path, default=DEFAULT_TRAIN_CORPUS)
    p.add_argument("--work", type=Path, default=None, help="tokenizer / token cache (default: per layout)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16, help="sequences per step, half per domain")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--expert-dim", type=int, default=None, help="expert intermediate size (default: per layout)")
    p.add_argument("--aux-coef", type=float, default=0.05, help="per-layer balance loss weight")
    p.add_argument("--experts-impl", default="grouped_mm", choices=["eager", "batched_mm", "grouped_mm"])
    p.add_argument("--attn-impl", default="sdpa", choices=["eager", "sdpa"])
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=64, help="per domain, during training")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--deadline-min", type=float, default=0.0,
                   help="stop early (and save) after this many minutes; 0 = never")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop (and save) after this many steps; the lr schedule still follows --steps; 0 = never")
    p.add_argument("--bench", type=int, default=0, help="only time this many steps, save nothing")
    args = p.parse_args()
    layout = LAYOUTS[args.layout]
    for key in ("out", "tokenizer", "experts", "top_k", "expert_dim", "work"):
        if getattr(args, key) is None:
            setattr(args, key, layout[key])
    if not 1 <= args.top_k <= args.experts:
        p.error(f"--top-k {args.top_k} must lie in 1..--experts ({args.experts})")
    return args


def main() -> None:
    from transformers import AutoModelForCausalLM

    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = load_or_train_tokenizer(args.train_corpus, args.work, args.tokenizer)
    streams = load_streams(tokenizer, args.train_corpus, "train", args.work)
    val_streams = load_streams(tokenizer, args.corpus, "validation", args.work)
    val = {d: eval_windows(s, args.eval_windows) for d, s in val_streams.items()}
    config = build_config(tokenizer, args)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    if args.bench:
        bench(model, opt, streams, args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "training_log.jsonl").open("w", encoding="utf-8") as log:
        header = {"event": "config", **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                        if k not in {"out", "corpus", "train_corpus", "work", "tokenizer"}},
                  "train_tokens_available": {d: int(len(s)) for d, s in streams.items()}}
        log.write(json.dumps(header) + "\n")
        summary = train(model, opt, streams, val, args, log)
        log.write(json.dumps(summary) + "\n")
    save(model, tokenizer, args.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
