"""The MoE families of the installed transformers, found from its ``models/`` tree, and what moeslim does
with each (``scripts/moe_families.py`` prints this; ``src/moeslim/models/README.md`` is its markdown).

A model folder is a MoE folder when its modeling file has a fused experts module (``@use_experts_implementation``
or a class named ``...Experts`` / ``...SparseMoeBlock`` / ``...MoE``), or its configuration declares an expert
count (``num_experts``, ``num_local_experts``, ``n_routed_experts``, ``moe_num_experts``). Every model type whose
config class is defined in such a folder is listed, except pure encoder sub-configs (vision / audio towers).
Nothing is hand-listed here: a new transformers release shows its new families as "unclassified".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .families import FAMILIES, FamilySpec
from .support import EXCLUDED, method_support, refusal

_MOE_CLASS = re.compile(r"^(?:@use_experts_implementation|class \w+(?:Experts|SparseMoeBlock|MoE|Moe)\()", re.M)
_EXPERT_KEY = re.compile(r"^\s+(num_experts|num_local_experts|n_routed_experts|moe_num_experts)\s*[:=]", re.M)
_DECORATOR = re.compile(r"@use_experts_implementation\(([^)]*)\)")
_ENCODER_PARTS = ("vision", "audio", "encoder", "sam_", "talker", "code_predictor")


@dataclass(frozen=True)
class FamilyRow:
    """One row of the family table."""

    model_type: str
    folder: str
    config_class: str
    causal_lm: str | None
    router: str
    shared: str
    dense: str
    layout: str
    status: str  # "supported" or the refusal reason
    prune: str
    skip: str
    quantize: str

    @property
    def supported(self) -> bool:
        return self.status == "supported"


def _models_root() -> Path:
    import transformers

    return Path(transformers.__file__).parent / "models"


def _is_moe_folder(folder: Path) -> bool:
    modeling = " ".join(p.read_text(errors="ignore") for p in folder.glob("modeling_*.py"))
    configuration = " ".join(p.read_text(errors="ignore") for p in folder.glob("configuration_*.py"))
    return bool(_MOE_CLASS.search(modeling) or _EXPERT_KEY.search(configuration))


def _modeling_source(folder: Path, causal_lm: str | None) -> str:
    """The modeling code of a model type: its causal-LM class's module (which may live in another folder,
    e.g. Sarvam reuses DeepSeek-V3), else the folder's modeling files."""
    if causal_lm is not None:
        import importlib
        import inspect

        import transformers

        try:
            module = importlib.import_module(getattr(transformers, causal_lm).__module__)
            return inspect.getsource(module)
        except (AttributeError, ImportError, OSError, TypeError):
            pass
    return " ".join(p.read_text(errors="ignore") for p in folder.glob("modeling_*.py"))


def _layout(modeling: str) -> str:
    """The fused experts layout, read from the ``@use_experts_implementation(...)`` arguments."""
    if "@use_experts_implementation" not in modeling:
        return "no fused experts"
    args = " ".join(_DECORATOR.findall(modeling))
    parts = ["transposed" if "is_transposed=True" in args else "normal"]
    if "has_bias=True" in args:
        parts.append("bias")
    if "has_gate=False" in args:
        parts.append("no gate")
    if "is_concatenated=False" in args:
        parts.append("interleaved gate/up")
    return ", ".join(parts)


def router_kind(spec: FamilySpec) -> str:
    """A short human description of a family's routing function and its settings."""
    renorm = (f"renorm `{spec.renormalize_key}`" if spec.renormalize_key
              else "renorm" if spec.renormalize else "no renorm")
    scale = f", x `{spec.scaling_key}`" if spec.scaling_key else ""
    kinds = {
        "softmax_topk": f"softmax -> top-k, {renorm}{scale}",
        "topk_softmax": "top-k -> softmax",
        "softmax_group": f"softmax -> group-limited top-k, no renorm{scale}",
        "sigmoid_group": f"sigmoid + bias, grouped, {renorm}{scale}",
        "sigmoid_topk": f"sigmoid (+ bias), {renorm}{scale}",
        "logit_topk_sigmoid": f"top-k on logits + bias -> sigmoid, {renorm}",
        "softmax_biased_topk": "softmax + bias -> top-k, renorm",
        "sparsemixer": "sparsemixer (top-2)",
    }
    return kinds[spec.routing]


def _shared(spec: FamilySpec) -> str:
    if not spec.shared_attrs:
        return "-"
    gate = f" x sigmoid(`{spec.shared_gate_attr}`)" if spec.shared_gate_attr else ""
    return "`" + "`/`".join(spec.shared_attrs) + "`" + gate


def _method(value: bool | str) -> str:
    return "yes" if value is True else str(value)


def _config_classes(folder: Path) -> dict[str, str]:
    """{model_type: config class name} for the config classes defined in this folder."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    text = " ".join(p.read_text(errors="ignore") for p in folder.glob("configuration_*.py"))
    return {mt: cls for mt, cls in CONFIG_MAPPING_NAMES.items() if cls and re.search(rf"^class {cls}\b", text, re.M)}


def _row(model_type: str, folder: Path, config_class: str) -> FamilyRow:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    layout = _layout(_modeling_source(folder, causal_lm))
    spec = FAMILIES.get(model_type)
    try:
        message = refusal(CONFIG_MAPPING[model_type]())
    except Exception as err:  # a default config that does not even build: report it, never crash the table
        message = f"its default config does not build ({type(err).__name__})"
    if spec is not None and causal_lm is None:
        message = message or "no causal-LM class"
    if spec is None and message is None:
        text_types = {getattr(CONFIG_MAPPING[model_type]().get_text_config(), "model_type", None)}
        supported_text = sorted(t for t in text_types if t in FAMILIES and t != model_type)
        parent = EXCLUDED.get(folder.name)
        if supported_text:
            message = f"supported through its text decoder `{supported_text[0]}`"
        elif causal_lm is None and parent is not None:
            closest = f" (closest: `{parent.closest}`)" if parent.closest else ""
            message = f"part of `{folder.name}` ({parent.reason}){closest}"
        else:
            message = "unclassified: a MoE folder moeslim has no row for (new in this transformers?)"
    if model_type in EXCLUDED:
        message = EXCLUDED[model_type].reason + (
            f" (closest: `{EXCLUDED[model_type].closest}`)" if EXCLUDED[model_type].closest else "")
    status = "supported" if spec is not None and message is None else str(message)
    if spec is not None and status == "supported":
        support = method_support(spec)
        prune, skip, quantize = (_method(v) for v in (support.prune, support.skip, support.quantize))
    else:
        prune = skip = quantize = "-"
    return FamilyRow(
        model_type=model_type, folder=folder.name, config_class=config_class, causal_lm=causal_lm,
        router=router_kind(spec) if spec else "-", shared=_shared(spec) if spec else "-",
        dense=spec.dense_rule if spec and spec.dense_rule != "none" else "-", layout=layout,
        status=status, prune=prune, skip=skip, quantize=quantize,
    )


def discover(root: Path | None = None) -> list[FamilyRow]:
    """One row per model type of every MoE folder of the installed transformers, sorted by model type."""
    return list(_discover(root or _models_root()))


@cache
def _discover(root: Path) -> tuple[FamilyRow, ...]:
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        if not _is_moe_folder(folder):
            continue
        for model_type, config_class in _config_classes(folder).items():
            if any(part in model_type for part in _ENCODER_PARTS) and model_type not in FAMILIES:
                continue
            rows.append(_row(model_type, folder, config_class))
    return tuple(sorted(rows, key=lambda r: r.model_type))
