"""``moeslim inspect`` and ``moeslim plan prune`` on a tiny checkpoint of EVERY MoE model type the installed
transformers ships (as found by ``scripts/moe_families.py``): supported families work (exit 0), every other one
is refused with one ``error:`` line (exit 2), before any weight is read; nothing raises."""

from __future__ import annotations

import json
import shutil
import warnings
from functools import cache
from pathlib import Path

import pytest
from tiny_models import tiny_model

from moeslim.cli import main
from moeslim.models import FAMILIES, resolve_model_path
from moeslim.models.catalog import FamilyRow, discover

ROWS = {row.model_type: row for row in discover()}
CALIB = ["--data", "demo:code", "--samples", "2", "--seq-len", "16", "--batch-size", "2"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@cache
def _vocab() -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(resolve_model_path("demo")))


def _loads(row: FamilyRow) -> bool:
    """A supported family, or a wrapper whose causal-LM class runs a supported text decoder."""
    return row.causal_lm is not None and (row.supported or row.status.startswith("supported through"))


def _blocked(row: FamilyRow) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    text = CONFIG_MAPPING[row.model_type]().get_text_config().model_type
    return bool(FAMILIES[text].layerwise_blocker)


def _works(row: FamilyRow, command: str) -> bool:
    """Whether ``command`` must succeed: a supported family with a causal-LM class; pruning also needs
    layer-wise calibration (refused with the reason for the families that lack it)."""
    loads = _loads(row)
    return loads and (command == "inspect" or not _blocked(row))


def _checkpoint(row: FamilyRow, folder: Path) -> bool:
    """Write a tiny checkpoint plus the demo tokenizer; True when it has weights. Supported families get real
    weights; wrappers of a supported text decoder get them when their tiny config builds (vision towers do not
    always shrink); the rest get config.json only, and must be refused from it alone."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    folder.mkdir()
    for name in _TOKENIZER_FILES:
        shutil.copy(Path(resolve_model_path("demo")) / name, folder / name)
    if _loads(row):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = tiny_model(row.model_type, vocab=_vocab())
        except Exception:  # config validation errors of an unshrinkable vision tower
            if row.supported:
                raise
        else:
            model.save_pretrained(folder)
            return True
    (folder / "config.json").write_text(CONFIG_MAPPING[row.model_type]().to_json_string())
    return False


def _assert_clean(code: int, err: str, row: FamilyRow, command: str, weights: bool) -> None:
    if weights and _works(row, command):
        assert code == 0, f"{command} {row.model_type}: {err}"
    else:
        assert code == 2, f"{command} {row.model_type} exited {code}: {err}"
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in err, err


def test_the_catalog_finds_the_families() -> None:
    supported = [row for row in ROWS.values() if row.supported]
    assert len(supported) >= 40
    assert {"mixtral", "deepseek_v3", "qwen3_next", "ernie4_5_moe"} <= {row.model_type for row in supported}
    assert not [row.model_type for row in ROWS.values() if row.status.startswith("unclassified")]


@pytest.mark.parametrize("model_type", sorted(ROWS))
def test_inspect_and_plan_prune_work_or_refuse_cleanly(model_type: str, tmp_path: Path, capsys) -> None:
    row = ROWS[model_type]
    folder = tmp_path / "model"
    weights = _checkpoint(row, folder)
    code = main(["inspect", str(folder), "--out", str(tmp_path / "inspect")])
    err = capsys.readouterr().err
    _assert_clean(code, err, row, "inspect", weights)
    if not weights:  # refused from config.json alone (there is no weight file), naming the model type
        assert model_type in err or "safetensors" in err, err
    code = main(["plan", "prune", str(folder), "--method", "frequency", "--keep", "4", *CALIB,
                 "--out", str(tmp_path / "plan.json")])
    err = capsys.readouterr().err
    _assert_clean(code, err, row, "plan prune", weights)
    if weights and _works(row, "plan prune"):
        plan = json.loads((tmp_path / "plan.json").read_text())
        assert all(len(ids) == 4 for ids in plan["layers"].values())


def test_refusals_come_from_config_json_alone(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from moeslim.models import UnsupportedModelError, check_config_file, load_model, refusal

    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(LlamaConfig(num_hidden_layers=1).to_json_string())
    with pytest.raises(UnsupportedModelError, match="'llama' is not a MoE family .* no expert count"):
        load_model(str(dense))  # no weight file exists: the refusal must come before any loading
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match="config.json: not a readable JSON config"):
        check_config_file(broken)
    message = refusal({"model_type": "dbrx"})
    assert message is not None and "2D (E*I, H)" in message and "closest supported family: mixtral" in message
    message = refusal({"model_type": "qwen3_vl_moe", "text_config": {"model_type": "qwen3_vl_moe_text"}})
    assert message is not None and "closest supported family: qwen3_moe" in message
    assert refusal({"model_type": "my_custom_moe", "num_experts": 8}) is None  # the generic row may try it
    assert refusal({"model_type": "mixtral", "num_local_experts": 8}) is None


def test_config_values_an_adapter_is_not_exact_for_are_refused() -> None:
    import copy

    from moeslim.models import UnsupportedModelError, find_moe_layers, refusal

    message = refusal({"model_type": "cohere2_moe", "num_experts": 8, "expert_selection_fn": "sigmoid"})
    assert message is not None and "expert_selection_fn='sigmoid'" in message and "'softmax'" in message
    model = copy.deepcopy(tiny_model("cohere2_moe"))
    assert find_moe_layers(model)
    model.config.expert_selection_fn = "sigmoid"
    with pytest.raises(UnsupportedModelError, match="expert_selection_fn"):
        find_moe_layers(model)
