"""What moeslim can do with a model, decided from its config alone (before any weight is loaded).

``refusal(config)`` returns the message for a model moeslim cannot handle (or None): a family listed in
``EXCLUDED`` with the reason and the closest supported family, a vision-language wrapper whose text decoder is
supported but that has no causal-LM class, a config value a family adapter is not exact for
(``FamilySpec.requires``), or a config without any expert count (a dense model). ``method_support(family)``
says which compression methods work for a supported family (the README table is generated from it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .families import _EXPERT_COUNT_KEYS, FAMILIES, FamilySpec, UnsupportedModelError, family_of


@dataclass(frozen=True)
class Exclusion:
    """A MoE family moeslim refuses: why, and what to use instead."""

    reason: str
    closest: str | None = None


_VLM = "vision-language model without a causal-LM class for its text decoder (AutoModelForCausalLM cannot load it)"
_SUPPORTED_TEXT = "load its text decoder alone: the `{}` family is supported"

EXCLUDED: dict[str, Exclusion] = {
    "dbrx": Exclusion("experts are 2D (E*I, H) matrices w1 / v1 / w2 (DbrxExperts), not fused 3D experts", "mixtral"),
    "jetmoe": Exclusion("mixture of attention heads plus ParallelExperts (input_linear / output_linear), not fused "
                        "experts with a linear router", "mixtral"),
    "deepseek_v4": Exclusion("hash routing: its first layers route by token id (DeepseekV4HashRouter), which "
                             "pruning cannot reproduce by masking a router", "deepseek_v3"),
    "longcat_flash": Exclusion("zero-computation experts share the router's index space with the real experts",
                               "deepseek_v3"),
    "llama4_text": Exclusion("the router score scales the expert input (sigmoid(score) * x), so the block is not a "
                             "weighted sum of expert outputs", "qwen3_moe"),
    "zaya": Exclusion("the router is an MLP (router_hidden_size), not a linear map whose rows can be dropped",
                      "mixtral"),
    "inkling_text": Exclusion("the router has E + 1 outputs (an extra null expert) and 3D shared experts",
                              "inkling2_text"),
    "axk1": Exclusion("the block normalises the combined routed + shared output (post_mlp_layernorm), so the "
                      "block is not linear in the expert outputs", "axk2"),
    "gemma4_text": Exclusion("the MoE runs beside a dense MLP inside the decoder layer (no separate MoE block) "
                             "and is off by default (enable_moe_block)", "qwen3_moe"),
    "diffusion_gemma": Exclusion("block-diffusion model, not a causal LM"),
    "diffusion_gemma_text": Exclusion("block-diffusion model, not a causal LM"),
    "openai_privacy_filter": Exclusion("token classifier without a causal-LM head", "gpt_oss"),
    "nllb-moe": Exclusion("encoder-decoder translation model", "mixtral"),
    "switch_transformers": Exclusion("encoder-decoder model", "mixtral"),
    "doge": Exclusion("its experts are embedding tables retrieved by product keys (no fused experts)", "mixtral"),
    "vitpose_backbone": Exclusion("vision backbone (its experts are per-dataset heads), not a language model"),
    "nemotron3_5_transcribe": Exclusion("speech-recognition model without a causal-LM class", "nemotron_h"),
    # vision-language wrappers without a causal-LM class
    "qwen3_vl_moe": Exclusion(_VLM, "qwen3_moe"),
    "glm4v_moe": Exclusion(_VLM, "glm4_moe"),
    "ernie4_5_vl_moe": Exclusion(_VLM, "ernie4_5_moe"),
    "glm5_next": Exclusion(_VLM, "glm_moe_dsa"),
    "hy_v4_vl": Exclusion(_VLM, "hy_v4"),
    "deepseek_ocr2": Exclusion(_VLM, "deepseek_v2"),
    "unlimited_ocr": Exclusion(_VLM, "deepseek_v2"),
    "muse_spark": Exclusion(_VLM, "qwen3_moe"),
    "mistral_large4": Exclusion(_VLM, "deepseek_v3"),
    "mistral4": Exclusion("registered as an image-text-to-text model only (no AutoModelForCausalLM mapping)",
                          "deepseek_v3"),
    "step3p7": Exclusion(_VLM, "deepseek_v3"),
    "step3p5": Exclusion("text decoder of step3p7, without a causal-LM class", "deepseek_v3"),
    "qwen3_omni_moe": Exclusion("omni (audio/vision/speech) model without a causal-LM class", "qwen3_moe"),
    "llama4": Exclusion("its text decoder (llama4_text) scales the expert input by the router score", "qwen3_moe"),
    "gemma4": Exclusion("its text decoder (gemma4_text) runs the MoE beside a dense MLP in the decoder layer",
                        "qwen3_moe"),
    "inkling_mm_model": Exclusion("its text decoder (inkling_text) has a router with an extra null expert",
                                  "inkling2_text"),
}


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _text_part(config: Any) -> Any:
    if isinstance(config, dict):
        text = config.get("text_config")
        return text if isinstance(text, dict) and text.get("model_type") else config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _has_causal_lm(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _is_registered(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def _excluded_message(model_type: str, exclusion: Exclusion) -> str:
    closest = f"; closest supported family: {exclusion.closest}" if exclusion.closest else ""
    return f"model_type {model_type!r} is not supported: {exclusion.reason}{closest}"


def requirement_violations(spec: FamilySpec, config: Any) -> list[str]:
    """``key=value (needs wanted)`` for every ``spec.requires`` entry the config breaks."""
    bad = []
    for key, wanted in spec.requires:
        value = _get(config, key)
        if value is not None and value != wanted:
            bad.append(f"{key}={value!r} (moeslim's {spec.name} adapter needs {wanted!r})")
    return bad


def refusal(config: Any) -> str | None:
    """Why moeslim cannot handle a model with this config (a config object or config.json dict), or None."""
    model_type = str(_get(config, "model_type"))
    text = _text_part(config)
    text_type = str(_get(text, "model_type"))
    for name in dict.fromkeys((model_type, text_type)):
        if name in EXCLUDED:
            return _excluded_message(name, EXCLUDED[name])
    if text_type in FAMILIES:
        if text is not config and not _has_causal_lm(model_type):
            return (f"model_type {model_type!r} has no causal-LM class (AutoModelForCausalLM cannot load it); "
                    + _SUPPORTED_TEXT.format(text_type))
        bad = requirement_violations(FAMILIES[text_type], text)
        if bad:
            return f"model_type {text_type!r} with {'; '.join(bad)} is not supported; set it or use another family"
        return None
    if model_type in FAMILIES:
        return None
    if _is_registered(model_type) and not _has_causal_lm(model_type):
        parent = EXCLUDED.get(model_type.removesuffix("_text").removesuffix("_thinker"))
        closest = (f"closest supported family: {parent.closest}" if parent and parent.closest
                   else f"supported families: {', '.join(sorted(FAMILIES))}")
        return f"model_type {model_type!r} has no causal-LM class (AutoModelForCausalLM cannot load it); {closest}"
    if not any(isinstance(_get(text, k), int) for k in _EXPERT_COUNT_KEYS):
        return (f"model_type {model_type!r} is not a MoE family moeslim knows and its config has no expert count "
                f"(looked for {list(_EXPERT_COUNT_KEYS)}): moeslim compresses Mixture-of-Experts models; "
                f"supported families: {', '.join(sorted(FAMILIES))}")
    return None  # an unlisted MoE: the generic row tries it (structure + router probing)


def check_config(config: Any) -> None:
    """Raise ``UnsupportedModelError`` with ``refusal(config)`` when there is one."""
    message = refusal(config)
    if message is not None:
        raise UnsupportedModelError(message)


def check_config_file(folder: Path) -> None:
    """Refuse a local checkpoint from its config.json alone, before any weight is read."""
    path = folder / "config.json"
    if not path.is_file():
        return  # transformers names the missing file itself
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnsupportedModelError(f"{path}: not a readable JSON config ({err}); fix or re-download it") from err
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{path}: expected a JSON object, got {type(config).__name__}")
    message = refusal(config)
    if message is not None:
        raise UnsupportedModelError(f"{folder}: {message}")


def check_layerwise(model: Any) -> None:
    """Refuse layer-wise calibration for families whose decoder layers cannot run one at a time."""
    spec = family_of(_text_part(getattr(model, "config", model)))
    if spec.layerwise_blocker:
        raise UnsupportedModelError(
            f"{spec.name}: layer-wise calibration (pruning, calibrated skipping, PMQ / GPTQ quantization) cannot "
            f"run this family: {spec.layerwise_blocker}. What works: inspect, and quantize with method='uniform' "
            f"and quantizer='rtn'"
        )


@dataclass(frozen=True)
class MethodSupport:
    """Which methods work for a family: True, or the reason they do not."""

    prune: bool | str
    skip: bool | str
    quantize: bool | str


def method_support(spec: FamilySpec) -> MethodSupport:
    """What works for a supported family (drives the README table)."""
    if spec.layerwise_blocker:
        reason = f"no layer-wise calibration: {spec.layerwise_blocker}"
        return MethodSupport(prune=reason, skip=reason, quantize="uniform RTN only (" + reason + ")")
    skip: bool | str = f"no dynamic skipping: {spec.skip_blocker}" if spec.skip_blocker else True
    return MethodSupport(prune=True, skip=skip, quantize=True)
