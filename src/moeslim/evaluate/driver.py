"""evaluate_model: the one call the CLI makes per variant (perplexity per domain, tasks, cost, speed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from moeslim.config import EvalConfig
from moeslim.data import load_source, token_windows
from moeslim.evaluate._logits import model_device
from moeslim.evaluate.cost import (
    activated_params,
    compare_speed,
    disk_bytes,
    expert_calls_per_token,
    param_bytes,
    peak_memory,
)
from moeslim.evaluate.divergence import Reference, reference_top
from moeslim.evaluate.perplexity import perplexity
from moeslim.evaluate.results import VariantResult
from moeslim.evaluate.tasks import run_tasks

EVAL_SPLIT = "test"  # bundled sources without an explicit split are evaluated on held-out text


def domain_name(spec: str) -> str:
    """Short key of a data spec: demo:code[:test] -> code, path/to/x.jsonl -> x, hf:a/b:c -> a/b:c."""
    if spec.startswith("demo:"):
        return spec.split(":")[1]
    if spec.startswith("hf:"):
        return spec.removeprefix("hf:")
    return Path(spec).stem


def eval_windows(tokenizer: PreTrainedTokenizerBase, config: EvalConfig) -> list[tuple[str, Any, torch.Tensor]]:
    """(domain, source, windows (N, L)) per data spec: the seeded windows every evaluation of ``config`` scores."""
    out = []
    for spec in config.data:
        source = load_source(spec, split=EVAL_SPLIT)
        windows = token_windows(source, tokenizer, config.seq_len, num_samples=config.max_windows, seed=config.seed)
        out.append((domain_name(spec), source, windows))
    return out


def build_reference(model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: EvalConfig, name: str
                    ) -> Reference:
    """The KL reference of ``model`` (usually the original) on the windows ``config`` evaluates: its next-token
    log-probabilities per position (every token, or the top ``config.kl_top_k``)."""
    domains = {domain: reference_top(model, windows, config.kl_top_k, config.batch_size)
               for domain, _source, windows in eval_windows(tokenizer, config)}
    return Reference(model=name, k=config.kl_top_k, domains=domains)


def evaluate_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: EvalConfig,
    *,
    name: str = "model",
    description: str = "",
    plan: dict[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    task_dir: str | Path | None = None,
    reference: Reference | None = None,
    progress: bool = True,
    log: TextIO | None = None,
) -> VariantResult:
    """Evaluate one model as ``config`` says; every measurement asked for and possible ends up in the result.

    Perplexity: ``config.max_windows`` seeded windows of ``config.seq_len`` tokens per data spec (demo specs
    default to the test split). With ``reference`` (``build_reference`` of the original on the same config):
    KL divergence to it and top-1 agreement per domain, from the same forward passes. Tasks: see run_tasks
    (statuses in extra["task_status"]). Speed (optional): prefill / decode tokens/s on a prompt of the first
    domain, median of ``config.speed_repeats``; speed_ratio is 1.0 here, ratios between variants come from calling
    compare_speed on all of them together. ``progress``: perplexity batches and tasks scored on stderr; ``log``:
    where lm-eval's own output goes (None: nowhere).
    """
    model.eval()
    result = VariantResult(name=name, description=description, plan=plan)
    first_windows: torch.Tensor | None = None
    for domain, source, windows in eval_windows(tokenizer, config):
        top = None
        if reference is not None:
            if domain not in reference.domains:
                raise ValueError(f"the KL reference of {reference.model!r} has no domain {domain!r} "
                                 f"(it has {', '.join(reference.domains)}); evaluate the same data")
            top = reference.domains[domain]
            top.check_windows(windows, domain)
        if first_windows is None:
            first_windows = windows
            ppl, memory = peak_memory(
                perplexity, model, windows, batch_size=config.batch_size, device=model_device(model), reference=top,
                progress=progress, label=f"perplexity {domain}", per_window=True,
            )
            what = f"perplexity, batch {config.batch_size} x {config.seq_len}"
            result.extra["peak_memory"] = {**memory, "what": what}
        else:
            ppl = perplexity(model, windows, batch_size=config.batch_size, reference=top, progress=progress,
                             label=f"perplexity {domain}", per_window=True)
        result.perplexity[domain] = ppl["ppl"]
        if top is not None:
            result.kl_divergence[domain] = ppl["kl"]
            result.top1_agreement[domain] = ppl["top1"]
        result.extra.setdefault("perplexity_detail", {})[domain] = {
            **ppl,
            "source": source.name,
            "content_hash": source.content_hash,
        }
    if reference is not None:
        result.extra["kl_reference"] = {"model": reference.model, "top_k": reference.k}
    if config.tasks:
        status = run_tasks(model, tokenizer, list(config.tasks), limit=config.task_limit,
                           batch_size=config.batch_size, task_dir=task_dir, log=log,
                           progress=progress)
        result.tasks = {
            t: s["acc"] for t, s in status.items() if s["status"] == "ran" and s["acc"] is not None
        }
        result.extra["task_status"] = status
    _fill_cost(result, model, first_windows, checkpoint_dir)
    if config.speed and first_windows is not None:
        prompt = first_windows[:1, : min(config.seq_len, 128)]
        timing = compare_speed({name: model}, prompt, new_tokens=config.speed_new_tokens,
                               repeats=config.speed_repeats, show=False)[name]
        result.decode_tps, result.prefill_tps, result.speed_ratio = (
            timing["decode_tps"],
            timing["prefill_tps"],
            1.0,
        )
        result.extra["speed"] = timing
    return result


def _fill_cost(
    result: VariantResult, model: nn.Module, windows: torch.Tensor | None, checkpoint_dir: str | Path | None
) -> None:
    sizes = param_bytes(model)
    result.param_bytes = sizes["total"]
    result.extra["param_bytes"] = sizes
    if checkpoint_dir is not None and Path(checkpoint_dir).exists():
        result.disk_bytes = disk_bytes(checkpoint_dir)
    act = activated_params(model)
    result.activated_params = act["activated"]
    result.extra["params"] = act
    # a few windows are enough to read the skip counters; without a runtime this is static anyway
    calls = expert_calls_per_token(model, windows[:4] if windows is not None else None)
    result.expert_calls_per_token = calls["per_token"]
    result.extra["expert_calls"] = calls
