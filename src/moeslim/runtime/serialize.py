"""Save/load of models whose runtime state lives beside the standard weights: one registry of the forms.

Each runtime that needs more than ``save_pretrained`` is registered here by its key in the ``moeslim`` config
section (``_FORMS``): compact non-uniform experts (``runtime/nonuniform.py``), packed low-bit experts
(``runtime/lowbit_io.py``), low-rank experts (``runtime/lowrank.py``); and the runtimes re-installed on any
form after loading (``_INSTALLED``): ``skip`` (skipping, or online dynamic pruning, ``runtime/odp.py``).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.models.attrs import pretrained
from moeslim.runtime.checkpoint_files import cast_floating, record_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredForm:
    """A checkpoint form that ``save_pretrained`` cannot write: when a model's moeslim section ``holds`` it, its own
    writer and reader are used (imported when used, so loading a plain model imports none of the runtimes)."""

    name: str
    holds: Callable[[dict[str, Any]], bool]
    module: str  # moeslim.runtime.<module>
    save: str  # its save(model, out_dir, dtype=...)
    load: str  # its load(path, dtype=..., device=...) -> (model, tokenizer)

    def function(self, which: str) -> Callable[..., Any]:
        return getattr(importlib.import_module(f"moeslim.runtime.{self.module}"), which)


def _compact(section: dict[str, Any]) -> bool:
    """Compact non-uniform experts in floating point (quantized or low-rank ones are the low-bit or low-rank form's:
    they cut the layers to their counts before installing their experts)."""
    from moeslim.runtime.nonuniform import is_compact

    return is_compact(section) and not _packed(section) and "lowrank" not in section


def _packed(section: dict[str, Any]) -> bool:
    """Packed low-bit tensors: quantized experts, or packed attention / embedding (``packed_nonexpert``)."""
    return "quantize" in section or "packed_nonexpert" in section


# The forms a saved moeslim checkpoint can take, the first that holds wins; anything else is a plain
# transformers checkpoint. Runtimes re-installed on top of any form (after loading) are in ``_INSTALLED``.
_FORMS = (
    StoredForm("compact non-uniform experts", _compact, "nonuniform", "save_compact", "load_compact"),
    StoredForm("packed low-bit experts", _packed, "lowbit_io", "save_quantized", "load_quantized"),
    # low-rank layers beside quantized ones (a joint plan) are the low-bit form's: its base file holds the factors
    StoredForm("low-rank experts", lambda s: "lowrank" in s and not _packed(s), "lowrank", "save_lowrank",
               "load_lowrank"),
)
_INSTALLED = {"skip": ("odp", "install_skip_section")}  # section key -> (module, install(model, entry))


_HOLD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def held_dtype(section: dict[str, Any]) -> torch.dtype | None:
    """The float dtype an applied joint plan holds the model in (``joint.hold_dtype``), None when it kept the
    model's: such a checkpoint is saved in it and ``load`` holds it in it, whatever dtype is asked, so the
    model holds the bytes its plan was sized for."""
    name = (section.get("joint") or {}).get("hold_dtype")
    if name is None:
        return None
    if name not in _HOLD_DTYPES:
        raise ValueError(f"moeslim section joint.hold_dtype={name!r}: expected one of {', '.join(_HOLD_DTYPES)}")
    return _HOLD_DTYPES[name]


def stored_form(section: dict[str, Any]) -> StoredForm | None:
    """The form a model with this moeslim config ``section`` is saved in (None: a plain transformers checkpoint)."""
    held = [form for form in _FORMS if form.holds(section)]
    if len(held) > 1:
        raise ValueError(f"a model with {' and '.join(f.name for f in held)} cannot be saved or loaded as one "
                         "checkpoint yet; apply one of them, save, and apply the other to the saved model")
    return held[0] if held else None


def save_pretrained_with_runtime(model: nn.Module, out_dir: Path, dtype: torch.dtype | None = None) -> None:
    """Save ``model`` (and its runtime sections) into ``out_dir``; floating tensors in ``dtype`` if given.

    ``dtype`` is how the checkpoint is stored, not how the model computes: a bfloat16 checkpoint loaded in
    float32 for calibration is written back in bfloat16, so compressing never makes a checkpoint bigger.
    """
    from moeslim.models.loading import quiet_loading

    section = getattr(model.config, "moeslim", None) or {}
    form = stored_form(section)
    dtype = held_dtype(section) or dtype
    with quiet_loading():  # transformers' "Writing model shards" bar: the command says what it wrote
        if form is not None:
            form.function(form.save)(model, out_dir, dtype=dtype)
        elif dtype is None:
            pretrained(model).save_pretrained(out_dir)
        else:
            pretrained(model).save_pretrained(out_dir, state_dict=cast_floating(model.state_dict(), dtype))
            record_dtype(out_dir, dtype)


def load_with_runtime(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                      ) -> tuple[nn.Module, Any]:
    """Load ``name`` in the form its moeslim section says, check its weights, and re-install its runtimes."""
    from moeslim.models import load_model, resolve_model_path
    from moeslim.models.loading import check_finite

    path = Path(resolve_model_path(name))
    section = _moeslim_section(path)
    form = stored_form(section)
    held = held_dtype(section)
    if held is not None and held != dtype:
        # the plan was sized for its hold dtype: loading in another would hold other bytes than it targets
        log.warning("%s holds its weights in %s (its joint plan's hold_dtype); loading in %s instead of %s",
                    name, str(held).removeprefix("torch."), str(held).removeprefix("torch."),
                    str(dtype).removeprefix("torch."))
    dtype = held or dtype
    if form is None:
        model, tokenizer = load_model(name, dtype=dtype, device=device)  # checks its weights itself
    else:
        model, tokenizer = form.function(form.load)(path, dtype=dtype, device=device)
        check_finite([*model.named_parameters(), *model.named_buffers()], name)
    for key, (module, install) in _INSTALLED.items():
        if key in section:
            getattr(importlib.import_module(f"moeslim.runtime.{module}"), install)(model, section[key])
    return model, tokenizer


def _moeslim_section(path: Path) -> dict[str, Any]:

    config_file = path / "config.json"
    if not config_file.is_file():
        return {}
    return json.loads(config_file.read_text()).get("moeslim") or {}
