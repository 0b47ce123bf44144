"""Multiple-choice task accuracy through lm-evaluation-harness: bundled offline tasks built from the corpus
test split, plus standard harness tasks (hellaswag, ...) when their data can be reached.

The in-memory model is wrapped by lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)`` (its subclass
``SharedPrefixHFLM``, which runs each item's context once for all its choices), so whatever runtime ``apply``
installed on it (skipping, packed low-bit experts) is what the harness scores."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import tempfile
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import torch
from transformers import PreTrainedTokenizerBase

from moeslim.config import ConfigError
from moeslim.data.sources import bundled_corpus_dir
from moeslim.evaluate.quiet import third_party_output
from moeslim.hub import hub_reachable
from moeslim.progress import steps

OFFLINE_TASKS = ("moeslim_code_nextline", "moeslim_prose_continuation")
CONTEXT_LINES = 8  # code task: lines of context before the line to predict
PROSE_CONTEXT_WORDS = 40
N_CHOICES = 4


# ---------------------------------------------------------------- task construction (pure, seeded)


def _read_docs(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


def _is_content_line(line: str) -> bool:
    """Lines worth predicting: enough characters to be distinguishable, not a comment or docstring edge."""
    body = line.strip()
    return len(body) >= 12 and not body.startswith(("#", '"""', "'''"))


class _LengthPool:
    """Candidate distractors sorted by length, so 'similar length' is a bisect, not a scan."""

    def __init__(self, items: list[tuple[int, str]]) -> None:  # (doc index, text)
        self.items = sorted(items, key=lambda it: (len(it[1]), it[1], it[0]))
        self.lengths = [len(text) for _, text in self.items]

    def pick(self, rng: random.Random, length: int, doc: int, exclude: set[str], k: int) -> list[str] | None:
        centre = bisect_left(self.lengths, length)
        window = self.items[max(0, centre - 40) : centre + 40]
        pool = sorted({text for d, text in window if d != doc and text not in exclude})
        return rng.sample(pool, k) if len(pool) >= k else None


def _mc_item(rng: random.Random, context: str, answer: str, distractors: list[str]) -> dict:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(answer)}


def code_nextline_items(docs: Sequence[str], n_items: int, seed: int) -> list[dict]:
    """Given CONTEXT_LINES lines of a Python file, pick its true next line among N_CHOICES; the
    distractors are content lines of other files with a similar length (so length gives no hint)."""
    rng = random.Random(seed)
    lines = [doc.splitlines() for doc in docs]
    pool = _LengthPool([(d, ln) for d, ls in enumerate(lines) for ln in ls if _is_content_line(ln)])
    slots = [
        (d, i) for d, ls in enumerate(lines) for i in range(CONTEXT_LINES, len(ls)) if _is_content_line(ls[i])
    ]
    rng.shuffle(slots)
    items: list[dict] = []
    for d, i in slots:
        answer = lines[d][i]
        distractors = pool.pick(rng, len(answer), d, {answer}, N_CHOICES - 1)
        if distractors is None:
            continue
        context = "\n".join(lines[d][i - CONTEXT_LINES : i]) + "\n"
        items.append(_mc_item(rng, context, answer, distractors))
        if len(items) == n_items:
            break
    return items


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _sentences(doc: str) -> list[str]:
    return [s.strip() for para in doc.split("\n") for s in _SENTENCE_END.split(para) if s.strip()]


def prose_continuation_items(docs: Sequence[str], n_items: int, seed: int) -> list[dict]:
    """Given a passage of about PROSE_CONTEXT_WORDS words, pick its true next sentence among
    N_CHOICES; distractors are sentences of other documents with a similar length."""
    rng = random.Random(seed)
    sents = [_sentences(doc) for doc in docs]
    ok = [[4 <= len(s.split()) <= 40 for s in ss] for ss in sents]
    pool = _LengthPool(
        [(d, s) for d, ss in enumerate(sents) for s, good in zip(ss, ok[d], strict=True) if good]
    )
    slots = [(d, k) for d, ss in enumerate(sents) for k in range(1, len(ss)) if ok[d][k]]
    rng.shuffle(slots)
    items: list[dict] = []
    for d, k in slots:
        words = " ".join(sents[d][:k]).split()
        if len(words) < PROSE_CONTEXT_WORDS // 2:
            continue
        answer = sents[d][k]
        distractors = pool.pick(rng, len(answer), d, {answer}, N_CHOICES - 1)
        if distractors is None:
            continue
        items.append(_mc_item(rng, " ".join(words[-PROSE_CONTEXT_WORDS:]), answer, distractors))
        if len(items) == n_items:
            break
    return items


# (task name, corpus domain, item builder, delimiter between context and choice)
_TASK_SPECS = {
    "moeslim_code_nextline": ("code", code_nextline_items, ""),  # context already ends with "\n"
    "moeslim_prose_continuation": ("prose", prose_continuation_items, " "),
}


def _task_yaml(name: str, data_file: Path, delimiter: str) -> str:
    # JSON is valid YAML: no yaml-escaping questions for paths or the delimiter
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "target_delimiter": delimiter,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    return json.dumps(config, indent=2) + "\n"


def build_offline_tasks(
    out_dir: str | Path, corpus_dir: str | Path | None = None, n_items: int = 200, seed: int = 0
) -> dict[str, Path]:
    """Write `<task>.jsonl` (items: context, choices, label) and `<task>.yaml` (lm-eval config) for
    each offline task from the corpus test split. Returns {task name: jsonl path}. Deterministic."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus_dir = Path(corpus_dir) if corpus_dir is not None else bundled_corpus_dir()
    written: dict[str, Path] = {}
    for name, (domain, build, delimiter) in _TASK_SPECS.items():
        source = corpus_dir / f"{domain}.test.jsonl"
        if not source.exists():
            continue
        items = build(_read_docs(source), n_items, seed)
        data = out_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
        (out_dir / f"{name}.yaml").write_text(_task_yaml(name, data, delimiter), encoding="utf-8")
        written[name] = data
    return written


# ---------------------------------------------------------------- running


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


@contextmanager
def _offline_env(offline: bool) -> Iterator[None]:
    """Make HF libraries fail fast instead of hanging on a download when there is no network."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    if offline:
        os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _lm_eval_score(lm: object, task_names: list[str], manager: object, limit: int | None) -> dict:
    # lm-eval's ``evaluate``, set up as its ``simple_evaluate`` sets up our tasks (its default seeds, zero-shot
    # when a task names no shot count), without what simple_evaluate adds after scoring and we never read: a
    # ``git describe`` child process for its version stamp (which prints "fatal: not a git repository" to the
    # terminal outside a git checkout) and torch's environment report.
    import numpy as np
    from lm_eval import evaluate

    seed, other_seed = 0, 1234  # simple_evaluate's DEFAULT_RANDOM_SEED / DEFAULT_OTHER_SEED
    random.seed(seed)
    np.random.seed(other_seed)
    torch.manual_seed(other_seed)
    loaded = manager.load(task_names)  # type: ignore[attr-defined]
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=other_seed)
    out = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)
    results: dict[str, dict] = {}
    for name in task_names:
        metrics = (out or {}).get("results", {}).get(name, {})
        n = (out or {}).get("n-samples", {}).get(name, {}).get("effective")
        results[name] = {
            "acc": metrics.get("acc,none"),
            "acc_norm": metrics.get("acc_norm,none"),
            "n": n,
        }
    return results


def run_tasks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task_names: Sequence[str] = OFFLINE_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    task_dir: str | Path | None = None,
    corpus_dir: str | Path | None = None,
    n_items: int = 200,
    seed: int = 0,
    log: TextIO | None = None,
    progress: bool = False,
) -> dict[str, dict]:
    """Accuracy per task: {task: {"acc", "acc_norm", "n", "status", "backend"}}.

    status is "ran", "skipped: offline" (standard task without network), "skipped: no data" (offline
    task whose corpus split is missing) or "failed: <error>". Offline task files go to task_dir (kept,
    e.g. in a run folder) or a temporary folder. What the harness prints (its progress bars and warnings) goes
    to ``log`` or nowhere, not to the console; ``progress``: our own line per task scored, on stderr. Raises when
    lm-eval is not installed.
    """
    if not task_names:
        return {}
    if not lm_eval_available():
        raise ConfigError("task accuracy needs lm-evaluation-harness: pip install 'moeslim[eval]' "
                           "(or evaluate without tasks: --tasks none)")
    offline = [t for t in task_names if t in _TASK_SPECS]
    standard = [t for t in task_names if t not in _TASK_SPECS]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moeslim-tasks-") as tmp:
        folder = Path(task_dir) if task_dir is not None else Path(tmp)
        written = build_offline_tasks(folder, corpus_dir, n_items, seed) if offline else {}
        for name in offline:
            if name not in written:
                results[name] = _skipped("skipped: no data")
        online = bool(standard) and hub_reachable()
        for name in standard:
            if not online:
                results[name] = _skipped("skipped: offline")
        harness_tasks = [t for t in offline if t in written] + (standard if online else [])
        if harness_tasks:
            results.update(_run_harness(model, tokenizer, harness_tasks, folder, limit, batch_size, online, log,
                                         progress))
    return {name: results[name] for name in task_names}


def _skipped(status: str) -> dict:
    return {"acc": None, "acc_norm": None, "n": 0, "status": status, "backend": None}


def _run_harness(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    folder: Path,
    limit: int | None,
    batch_size: int,
    online: bool,
    log: TextIO | None = None,
    progress: bool = False,
) -> dict[str, dict]:
    import sys

    import lm_eval
    from lm_eval.tasks import TaskManager

    from moeslim.evaluate.shared_prefix import SharedPrefixHFLM

    backend = f"lm-eval {lm_eval.__version__}"
    out: dict[str, dict] = {}
    console = sys.stderr  # where our progress goes while the harness's own output is redirected
    with third_party_output(log), _offline_env(not online):
        lm = SharedPrefixHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        # indexing the harness's thousands of bundled task configs takes seconds: only when needed
        manager = TaskManager(include_path=str(folder), include_defaults=any(n not in _TASK_SPECS for n in names))
        # one at a time: a standard task failing must not lose the others
        for name in steps(names, "tasks", len(names), unit="tasks", enabled=progress, stream=console):
            try:
                res = _lm_eval_score(lm, [name], manager, limit)[name]
                out[name] = {**res, "status": "ran", "backend": backend}
            except Exception as err:  # noqa: BLE001 - any harness/dataset failure is reported, not raised
                out[name] = {**_skipped(f"failed: {type(err).__name__}: {err}"[:300]), "backend": backend}
    return out
