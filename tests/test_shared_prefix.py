"""SharedPrefixHFLM (each context scored once for all its continuations) answers what lm-eval's HFLM answers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from test_tasks import tiny_model, tiny_tokenizer

from moeslim.evaluate.shared_prefix import SharedPrefixHFLM, split_calls
from moeslim.evaluate.tasks import _TASK_SPECS, build_offline_tasks, run_tasks
from moeslim.models import load_model

TOL = 1e-4
ITEMS = 10  # per task: 2 tasks x 10 items x 4 choices = 80 requests


class RecordingHook:
    """Stands in for lm-eval's CacheHook: what the model reports for its answer cache."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []

    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        self.calls.append((attr, req, res))


@pytest.fixture(scope="module", params=["demo", "demo-fine"])
def demo(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return load_model(request.param)


@pytest.fixture(scope="module")
def task_requests(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """(context, continuation) of every choice of the first ITEMS items of both offline tasks."""
    written = build_offline_tasks(tmp_path_factory.mktemp("tasks"), n_items=ITEMS)
    assert set(written) == set(_TASK_SPECS)
    reqs = []
    for name, path in written.items():
        for line in path.read_text().splitlines():
            item = json.loads(line)
            reqs += [(item["context"], _TASK_SPECS[name][2] + choice) for choice in item["choices"]]
    return reqs


def _answers(lm: HFLM, reqs: list[tuple[str, str]]) -> tuple[list[tuple[float, bool]], RecordingHook]:
    hook = RecordingHook()
    lm.cache_hook = hook
    got = lm.loglikelihood([Instance("loglikelihood", {}, args, i) for i, args in enumerate(reqs)],
                           disable_tqdm=True)
    return got, hook


def _assert_same(got: list[tuple[float, bool]], ref: list[tuple[float, bool]]) -> None:
    assert len(got) == len(ref)
    for (ll, greedy), (ref_ll, ref_greedy) in zip(got, ref, strict=True):
        assert ll == pytest.approx(ref_ll, abs=TOL)
        assert greedy == ref_greedy


def _base_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the requests that reach HFLM's own _loglikelihood_tokens from here on."""
    calls: list[int] = []
    base = HFLM._loglikelihood_tokens

    def counted(self: HFLM, requests: list, *args: Any, **kwargs: Any) -> list:
        calls.append(len(requests))
        return base(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", counted)
    return calls


def test_demo_task_answers_equal_hflm(demo, task_requests, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = demo
    ref, ref_hook = _answers(HFLM(pretrained=model, tokenizer=tok, batch_size=8), task_requests)
    base_calls = _base_calls(monkeypatch)
    lm = SharedPrefixHFLM(pretrained=model, tokenizer=tok, batch_size=8)
    got, hook = _answers(lm, task_requests)
    assert base_calls == [] and lm._cache_ok  # every request took the shared path
    _assert_same(got, ref)
    # the answer cache hears of every request once, under its own request
    assert sorted(req for _, req, _ in hook.calls) == sorted(req for _, req, _ in ref_hook.calls)
    assert {attr for attr, _, _ in hook.calls} == {"loglikelihood"}


@pytest.mark.parametrize("runtime", ["skipping", "odp"])
def test_installed_runtimes(runtime: str, task_requests, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic skipping decides per token: shared path. Online dynamic pruning protects the top tokens of each
    forward's whole sequence (an attention hook), which separate context and continuation forwards would
    change (by more than 1 nat here): HFLM's path. Both answer what HFLM answers."""
    from moeslim.runtime.odp import install_odp
    from moeslim.runtime.skipping import install_skipping

    model, tok = load_model("demo")
    betas = dict.fromkeys(range(model.config.num_hidden_layers), 0.5)
    if runtime == "skipping":
        install_skipping(model, betas)
    else:
        install_odp(model, betas, protect=0.02)
    reqs = task_requests[: 4 * ITEMS // 2]
    ref, _ = _answers(HFLM(pretrained=model, tokenizer=tok, batch_size=8), reqs)
    base_calls = _base_calls(monkeypatch)
    got, _ = _answers(SharedPrefixHFLM(pretrained=model, tokenizer=tok, batch_size=8), reqs)
    assert base_calls == ([] if runtime == "skipping" else [len(reqs)])
    _assert_same(got, ref)


def test_token_requests_mixed_lengths_and_truncation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared contexts, one-token continuations, several batches, and requests longer than max_length + 1
    (HFLM truncates those from the left: they go to HFLM's own path) in one call, in request order."""
    model, tok = load_model("demo")
    rng = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(2, len(tok), (n,), generator=rng).tolist()

    contexts = [ids(n) for n in (5, 17, 30, 1, 44, 9, 23, 60, 12, 3, 38)]
    reqs = []
    for k, ctx in enumerate(contexts):
        for n in (1, 4, 9, 2)[: 1 + k % 4]:
            reqs.append(((f"c{k}", f"x{n}"), ctx, ids(n)))
    long_ctx = ids(70)
    reqs += [(("long", "a"), long_ctx, ids(5)), (("long", "b"), long_ctx, ids(30))]  # 75 fits, 100 does not
    reqs.insert(3, (("long", "c"), ids(90), ids(3)))
    kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tok, "batch_size": 3, "max_length": 80}
    ref = HFLM(**kwargs)._loglikelihood_tokens(reqs, disable_tqdm=True)
    base_calls = _base_calls(monkeypatch)
    lm = SharedPrefixHFLM(**kwargs)
    lm.cache_hook = RecordingHook()
    got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert base_calls == [2]  # the two requests over 81 tokens
    _assert_same(got, ref)
    assert len(lm.cache_hook.calls) == len(reqs)


def test_unshareable_cache_goes_to_hflm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sliding-window model's cache layers cannot be row-copied exactly: HFLM scores it, same answers."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    model.config.sliding_window = 8
    reqs = [("The quick brown", " fox jumps"), ("The quick brown", " dog"), ("Experts are", " selected by")] * 3
    ref, _ = _answers(HFLM(pretrained=model, tokenizer=tok, batch_size=2), reqs)
    base_calls = _base_calls(monkeypatch)
    lm = SharedPrefixHFLM(pretrained=model, tokenizer=tok, batch_size=2)
    got, hook = _answers(lm, reqs)
    assert lm._cache_ok is False and base_calls == [len(reqs)]
    _assert_same(got, ref)
    assert len(hook.calls) == len(reqs)


def test_run_tasks_accuracy_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_tasks on the demo model: the same accuracies as with HFLM's own scoring."""
    model, tok = load_model("demo")
    after = run_tasks(model, tok, limit=30, task_dir=tmp_path / "after")
    monkeypatch.setattr(SharedPrefixHFLM, "_loglikelihood_tokens", HFLM._loglikelihood_tokens)
    before = run_tasks(model, tok, limit=30, task_dir=tmp_path / "before")
    assert all(res["status"] == "ran" and res["n"] == 30 for res in after.values())
    assert after == before


def test_split_calls_is_optimal() -> None:
    """Against every way of cutting rows sorted by decreasing width into consecutive calls."""
    for widths in ([20, 19, 12, 11, 11, 3, 2, 1], [5, 5, 5, 5], [30, 1], [7]):
        def cost(pieces: list[range], w: list[int] = widths) -> int:
            return sum(32 + len(p) * w[p.start] for p in pieces)

        best = min(
            cost([range(a, b) for a, b in itertools.pairwise((0, *cuts, len(widths)))])
            for n in range(len(widths))
            for cuts in itertools.combinations(range(1, len(widths)), n)
        )
        pieces = split_calls(widths, 32)
        assert [i for p in pieces for i in p] == list(range(len(widths)))
        assert cost(pieces) == best
