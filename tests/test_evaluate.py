"""Perplexity, cost and generation on tiny random Mixtral models (CPU, seconds)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moeslim.evaluate.perplexity import perplexity, sliding_perplexity


def tiny_mixtral(vocab_size: int = 128, seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    return MixtralForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> MixtralForCausalLM:
    return tiny_mixtral()


def _direct_nll(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    with torch.no_grad():
        logits = model(windows).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logp.gather(-1, windows[:, 1:, None]).squeeze(-1)
    return -picked.sum().item(), picked.numel()


def test_perplexity_matches_direct_computation(model: MixtralForCausalLM) -> None:
    windows = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(1))
    res = perplexity(model, windows, batch_size=2, progress=False)
    nll, tokens = _direct_nll(model, windows)
    assert res["method"] == "fixed"
    assert res["tokens"] == tokens == 5 * 15
    assert math.isfinite(res["ppl"])
    assert res["nll"] == pytest.approx(nll, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert "window_nll" not in res


def test_per_window_nll_is_each_windows_direct_nll(model: MixtralForCausalLM) -> None:
    windows = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(2))
    res = perplexity(model, windows, batch_size=2, progress=False, per_window=True)
    assert len(res["window_nll"]) == 5
    for row, got in zip(windows, res["window_nll"], strict=True):
        assert got == pytest.approx(_direct_nll(model, row[None])[0], rel=1e-5)
    assert sum(res["window_nll"]) == pytest.approx(res["nll"], rel=1e-9)


def test_sliding_with_stride_equal_window_is_fixed(model: MixtralForCausalLM) -> None:
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(2))
    fixed = perplexity(model, ids.view(4, 16), progress=False)
    sliding = sliding_perplexity(model, ids, window=16, stride=16, progress=False)
    assert sliding["method"] == "sliding"
    assert sliding["tokens"] == fixed["tokens"]
    assert sliding["ppl"] == pytest.approx(fixed["ppl"], rel=1e-5)


def test_sliding_scores_every_token_once(model: MixtralForCausalLM) -> None:
    ids = torch.randint(0, 128, (50,), generator=torch.Generator().manual_seed(3))
    res = sliding_perplexity(model, ids, window=16, stride=8, progress=False)
    assert res["tokens"] == 49  # every token after the first, once
    # window covering the whole stream is exact full-context perplexity
    full = sliding_perplexity(model, ids, window=64, stride=8, progress=False)
    nll, _ = _direct_nll(model, ids[None])
    assert full["nll"] == pytest.approx(nll, rel=1e-5)


# ---------------------------------------------------------------- cost


def test_param_bytes_by_dtype_and_quantized(model: MixtralForCausalLM) -> None:
    # Resident bytes are measured from the tensors held (parameters and buffers, each storage once);
    # packed low-bit storage is tested in tests/test_lowbit_runtime.py.
    from moeslim.evaluate.cost import param_bytes

    tensors = {t.untyped_storage().data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    n = sum(t.numel() * t.element_size() for t in tensors.values())
    assert param_bytes(model) == {"total": n, "by_dtype": {"float32": n}, "quantized": 0, "method": "tensors"}

    experts = torch.nn.Module()
    experts.w = torch.nn.Parameter(torch.zeros(10, 10))
    tied = torch.nn.Linear(4, 4).half()
    wrapper = torch.nn.Sequential(tied, experts, torch.nn.Module())
    wrapper[2].weight = tied.weight  # shared: counted once
    res = param_bytes(wrapper)
    assert res == {"total": 2 * 20 + 400, "by_dtype": {"float16": 40, "float32": 400}, "quantized": 0,
                   "method": "tensors"}


def test_activated_params_and_static_expert_calls(model: MixtralForCausalLM) -> None:
    from moeslim.evaluate.cost import activated_params, expert_calls_per_token

    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    act = activated_params(model)
    assert act["total"] == total and act["expert"] == expert
    assert act["activated"] == total - expert + expert * 2 // 4  # top-2 of 4 experts
    calls = expert_calls_per_token(model)
    assert calls == {"per_token": 4.0, "per_layer": [2.0, 2.0], "source": "static"}


def test_expert_calls_read_runtime_counters(model: MixtralForCausalLM) -> None:
    from moeslim.evaluate.cost import expert_calls_per_token

    experts = [layer.mlp.experts for layer in model.model.layers]
    hooks = []
    for i, mod in enumerate(experts):
        mod.moeslim_counters = {"expert_calls": 0, "tokens": 0}

        def count(m, args, out, calls_per_token=1 + i):  # fake runtime: layer i runs 1+i experts/token
            n = args[0].shape[0]
            m.moeslim_counters["tokens"] += n
            m.moeslim_counters["expert_calls"] += calls_per_token * n

        hooks.append(mod.register_forward_hook(count))
    try:
        res = expert_calls_per_token(model, torch.randint(0, 128, (2, 8)))
    finally:
        for h in hooks:
            h.remove()
        for mod in experts:
            del mod.moeslim_counters
    assert res["source"] == "counted"
    assert res["per_token"] == pytest.approx(1 + 2)


def test_disk_bytes_and_peak_memory(tmp_path) -> None:
    from moeslim.evaluate.cost import disk_bytes

    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"x" * 23)
    assert disk_bytes(tmp_path) == 123

    # A fresh interpreter: earlier tests leave freed pages in this process's heap, which a new allocation
    # can reuse without growing the RSS that the measurement reads.
    script = (
        "import torch\n"
        "from moeslim.evaluate.cost import peak_memory\n"
        "def allocate():\n"
        "    t = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched\n"
        "    return int(t.sum())\n"
        "value, mem = peak_memory(allocate, interval_s=0.001)\n"
        "print(json.dumps({'value': value, **mem}))\n"
    )
    out = subprocess.run([sys.executable, "-c", "import json\n" + script], capture_output=True, text=True,
                         check=True).stdout
    mem = json.loads(out.strip().splitlines()[-1])
    assert mem["value"] == 64 * 1024 * 1024 // 4
    assert mem["method"] in {"rss_sampled", "ru_maxrss_delta"}
    if mem["method"] == "rss_sampled":
        assert mem["peak_bytes"] > 32 * 1024 * 1024


def test_compare_speed_interleaved(model: MixtralForCausalLM) -> None:
    from moeslim.evaluate.cost import compare_speed

    other = tiny_mixtral(seed=1)
    ids = torch.randint(0, 128, (1, 8))
    res = compare_speed({"a": model, "b": other}, ids, new_tokens=4, repeats=2, warmup=1, show=False)
    assert list(res) == ["a", "b"]
    assert res["a"]["decode_ratio"] == 1.0 and res["a"]["prefill_ratio"] == 1.0
    for r in res.values():
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and r["decode_ratio"] > 0


# ---------------------------------------------------------------- generation and the driver


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["def f(x):\n    return x\n", "Experts are chosen per token."], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def test_side_by_side_is_deterministic() -> None:
    from moeslim.evaluate.generation import side_by_side

    tok = _tiny_tokenizer()
    models = {"a": tiny_mixtral(len(tok)), "b": tiny_mixtral(len(tok), seed=1)}
    prompts = ["def f(x):\n", "Experts are"]
    first = side_by_side(models, tok, prompts, max_new_tokens=5)
    assert first == side_by_side(models, tok, prompts, max_new_tokens=5)
    assert set(first) == set(prompts) and all(set(v) == {"a", "b"} for v in first.values())


def test_evaluate_model_end_to_end(tmp_path, monkeypatch) -> None:
    import json

    import moeslim.evaluate.driver as driver
    from moeslim.config import EvalConfig
    from moeslim.evaluate import VariantResult, evaluate_model

    tok = _tiny_tokenizer()
    m = tiny_mixtral(len(tok))
    text = {"text": "def f(x):\n    return x * 2\n" * 20}
    data = tmp_path / "mycode.jsonl"
    data.write_text("\n".join(json.dumps(text) for _ in range(3)) + "\n")
    timed: list[tuple[int, int]] = []
    real = driver.compare_speed

    def recording(models, prompt, new_tokens, repeats, **kw):
        timed.append((new_tokens, repeats))
        return real(models, prompt, new_tokens=new_tokens, repeats=repeats, **kw)

    monkeypatch.setattr(driver, "compare_speed", recording)
    config = EvalConfig(data=(str(data),), seq_len=32, max_windows=4, speed=True, speed_repeats=2,
                        speed_new_tokens=5)
    res = evaluate_model(m, tok, config, name="tiny", checkpoint_dir=tmp_path)
    assert timed == [(5, 2)]  # the config's speed settings are the ones used
    assert isinstance(res, VariantResult) and res.name == "tiny"
    assert math.isfinite(res.perplexity["mycode"])
    held = {t.untyped_storage().data_ptr(): t for t in [*m.parameters(), *m.buffers()]}  # resident: buffers too
    assert res.param_bytes == sum(t.numel() * t.element_size() for t in held.values())
    assert res.disk_bytes and res.disk_bytes > 0
    assert res.expert_calls_per_token == 4.0 and res.speed_ratio == 1.0 and res.decode_tps > 0
    assert VariantResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res


def test_cost_of_packed_experts_is_found_through_the_moe_layers() -> None:
    """Packed experts hold no float parameters; counts must still see every MoE layer and expert weight."""
    from tiny_models import tiny_model

    import moeslim
    from moeslim.evaluate.cost import activated_params, expert_calls_per_token
    from moeslim.methods.quant.config import QuantizeConfig
    from moeslim.methods.quant.driver import plan_quantize

    model = tiny_model("qwen3_moe")
    before = activated_params(model)
    calls = expert_calls_per_token(model)
    plan = plan_quantize(model, torch.randint(3, 64, (2, 8)), QuantizeConfig(method="uniform", bits=4,
                                                                              quantizer="rtn"))
    moeslim.apply(model, plan)
    assert not any(p.ndim == 3 for p in model.parameters())  # the experts are packed
    assert activated_params(model) == before
    assert expert_calls_per_token(model) == calls and calls["per_token"] > 0
