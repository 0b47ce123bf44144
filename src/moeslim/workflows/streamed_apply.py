"""``apply --stream``: apply prune/skip plans to a checkpoint one decoder layer at a time, shard by shard.

The whole model is never held: for each decoder layer a meta-device skeleton of the *original* model gets
only that layer's tensors from the shards, the plans are applied to it with the ordinary ``apply`` (on meta
tensors slicing is free, so only the real layer costs anything), and the layer's tensors are written, in the
checkpoint's on-disk layout (transformers' own ``revert_weight_conversion``), as one shard. The weights
outside the layers and config.json (with the ``moeslim`` section ``apply`` records) come from one skeleton
with the plans applied. Everything goes into a temp folder that is renamed into place (``outputs.atomic_dir``).

Quantize plans (``apply_quantize_streamed``): the GPTQ pass runs on the streamed model and hands each layer's
packed experts to a writer while the layer is loaded; the per-layer parts are merged (bytes copied, tensors
never loaded) into the two files of the runtime's quantized format (``runtime/lowbit_io.py``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.config import ConfigError
from moeslim.outputs import TMP_PREFIX
from moeslim.plans import Plan
from moeslim.progress import steps
from moeslim.runtime.shard_files import merge_safetensors, on_disk_layout

STREAMED_KINDS = ("prune", "skip")  # apply_streamed; quantize: apply_quantize_streamed


def _skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """A meta-device model of ``config`` (a copy: ``apply`` edits the model's config in place)."""
    from transformers import AutoModelForCausalLM

    from moeslim.models.lazy import params_on_meta

    with params_on_meta():
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, trust_remote_code=False).eval()


def _apply_all(model: nn.Module, plans: Sequence[Plan], force: bool) -> None:
    from moeslim.appliers import apply

    for plan in plans:
        apply(model, plan, force=force)


def stream_apply(source: str, plans: Sequence[Plan], out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", overwrite: bool = False, force: bool = False,
                 inputs: Iterable[str | Path] = (), resume: str | None = None, progress: bool = False) -> Path | None:
    """``apply --stream``: prune/skip plans (``apply_streamed``), or one quantize plan (``apply_quantize_streamed``).

    A quantize plan is applied alone: its GPTQ pass calibrates the checkpoint it reads, so apply the prune or
    skip plans first (``--stream``), then quantize the written checkpoint.
    """
    kinds = [p.kind for p in plans]
    if "quantize" in kinds:
        if len(plans) != 1:
            raise ConfigError(f"apply --stream takes a quantize plan on its own (got {', '.join(kinds)}): apply the "
                              "other plans with --stream first, then the quantize plan made on their result")
        return apply_quantize_streamed(source, plans[0], out_dir, dtype=dtype, device=device, overwrite=overwrite,
                                       force=force, inputs=inputs, resume=resume, progress=progress)
    if resume is not None:
        raise ConfigError("--resume with apply --stream is for quantize plans (prune/skip plans stream in one pass)")
    return apply_streamed(source, plans, out_dir, dtype=dtype, overwrite=overwrite, force=force, inputs=inputs,
                          progress=progress)


def apply_streamed(source: str, plans: Sequence[Plan], out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                   overwrite: bool = False, force: bool = False, inputs: Iterable[str | Path] = (),
                   progress: bool = False) -> Path:
    """Apply prune/skip ``plans`` to the checkpoint folder ``source`` and write the result to ``out_dir``.
    ``progress``: a line per written layer on stderr.

    Peak memory ~ one decoder layer (in ``dtype``) + the non-layer weights. Tensors are stored in the
    source's storage dtype. The result loads with stock transformers / ``moeslim.load``.
    """
    from safetensors.torch import save_file

    from moeslim.io import checkpoint_dtype
    from moeslim.models import decoder_layers
    from moeslim.models.lazy import CheckpointIndex, free_module, load_streamed
    from moeslim.outputs import atomic_dir

    refused = sorted({p.kind for p in plans} - set(STREAMED_KINDS))
    if refused:
        raise ConfigError(f"apply_streamed handles {' and '.join(STREAMED_KINDS)} plans, not {', '.join(refused)}; "
                          "a quantize plan is streamed on its own (apply_quantize_streamed)")
    _refuse_router_refit(plans)
    storage = checkpoint_dtype(source)
    base: Any
    base, tokenizer = load_streamed(source, dtype)
    original_config = copy.deepcopy(base.config)
    index = CheckpointIndex(original_config._name_or_path, base)
    layer_count = len(decoder_layers(base))
    names = [f"model-{i + 1:05d}-of-{layer_count + 1:05d}.safetensors" for i in range(layer_count + 1)]
    weight_map: dict[str, str] = {}
    with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        for i in steps(range(layer_count), "apply", layer_count, enabled=progress):
            model = _skeleton(original_config, dtype)  # original shapes: layer i's tensors fit
            index.load(model, index.layer_keys[i], "cpu", f"decoder layer {i}")
            _apply_all(model, plans, force)
            layer = decoder_layers(model)[i]
            prefix = next(n for n, m in model.named_modules() if m is layer) + "."
            state = {prefix + k: v for k, v in layer.state_dict().items()}
            tensors = on_disk_layout(model, state, storage)
            save_file(tensors, str(tmp / names[i]), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, names[i]))
            free_module(layer)
            del model, layer, state, tensors
        _apply_all(base, plans, force)  # the final config (expert counts, moeslim section) + non-layer weights
        layer_params = {id(t) for t in decoder_layers(base).state_dict(keep_vars=True).values()}
        tied = set(getattr(base, "all_tied_weights_keys", {}) or {})
        rest = {k: v for k, v in base.state_dict(keep_vars=True).items()
                if id(v) not in layer_params and k not in tied}
        tensors = on_disk_layout(base, {k: v.detach() for k, v in rest.items()}, storage)
        save_file(tensors, str(tmp / names[-1]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, names[-1]))
        total = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
        if storage is not None:
            base.config.dtype = storage
        base.config.save_pretrained(tmp)
        generation = Path(original_config._name_or_path) / "generation_config.json"
        if generation.is_file():
            (tmp / generation.name).write_text(generation.read_text())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# -- quantize plans ------------------------------------------------------------------------------------------

class _LayerParts:
    """Each decoder layer's share of the two quantized-checkpoint files, one pair of files per layer.

    ``layer-<i>.lowbit.safetensors`` is written first, ``layer-<i>.base.safetensors`` last (the commit), each
    through a rename, so a layer with a base part is complete. ``key`` ties the parts to one run's arguments:
    parts of another run are removed. The parts are merged into the checkpoint's files at the end.
    """

    def __init__(self, folder: Path, key: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        stamp = folder / "parts.key"
        if not stamp.is_file() or stamp.read_text() != key:
            for old in folder.glob("layer-*.safetensors"):
                old.unlink()
            stamp.write_text(key)

    def path(self, index: int, which: str) -> Path:
        return self.folder / f"layer-{index}.{which}.safetensors"

    def done(self, index: int) -> bool:
        return self.path(index, "base").is_file()

    def write(self, index: int, base: dict[str, torch.Tensor], lowbit: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        for which, tensors in (("lowbit", lowbit), ("base", base)):
            target = self.path(index, which)
            tmp = target.with_name(f".{target.name}.tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, target)

    def remove(self) -> None:
        for path in (*self.folder.glob("layer-*.safetensors"), self.folder / "parts.key"):
            path.unlink(missing_ok=True)


def _qualified(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _layer_tensors(model: nn.Module, index: int, packed: Any, moe: Any, settings: Any,
                   storage: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, lowbit) tensors of decoder layer ``index`` (on its device now) as ``save_quantized`` names them:
    the packed experts (and attention projections) as ``LowBitTensor`` state dicts, the rest in ``storage``."""
    from moeslim.appliers.quantize import quantize_attention_weight
    from moeslim.models import decoder_layers
    from moeslim.models.expert_math import expert_weight_views

    layer = decoder_layers(model)[index]
    prefix = _qualified(model, layer) + "."
    lowbit: dict[str, torch.Tensor] = {}
    if packed is not None:
        views = expert_weight_views(moe)
        experts = _qualified(model, moe.experts)
        for name, tensor in ((views.up_name, packed.up), (views.down_name, packed.down)):
            lowbit.update(tensor.to_state_dict(f"{experts}.{name}"))
    if settings.attention_bits is not None:
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and "attn" in name.split(".")[0]:
                weight = quantize_attention_weight(module, settings.attention_bits, settings.group_size)
                lowbit.update(weight.to_state_dict(f"{prefix}{name}.weight"))
    packed_names = {k.rsplit(".", 1)[0] for k in lowbit if k.endswith(".qmeta")}
    base = {}
    for name, tensor in layer.state_dict().items():
        if prefix + name in packed_names:
            continue
        value = tensor.detach().cpu()
        base[prefix + name] = (value.to(storage) if storage is not None and value.is_floating_point()
                               else value).contiguous()
    return base, {k: v.cpu().contiguous() for k, v in lowbit.items()}


def _non_layer_tensors(model: nn.Module, storage: torch.dtype | None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The weights outside the decoder layers, tied aliases written once (as ``save_quantized`` does)."""
    from moeslim.models import decoder_layers
    from moeslim.runtime.checkpoint_files import cast_floating, tensors_written_once

    layer_names = tuple(_qualified(model, layer) + "." for layer in decoder_layers(model))
    tensors, aliases = tensors_written_once({name: tensor for name, tensor in model.state_dict().items()
                                             if not name.startswith(layer_names)})
    return cast_floating(tensors, storage), aliases


def apply_quantize_streamed(source: str, plan: Plan, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu", calibration: Any = None, overwrite: bool = False,
                            force: bool = False, inputs: Iterable[str | Path] = (), resume: str | None = None,
                            progress: bool = False) -> Path | None:
    """Apply a quantize ``plan`` to the checkpoint folder ``source`` one decoder layer at a time.

    GPTQ plans: the layer-wise pass of ``methods.quant.transform.gptq_experts`` runs on the streamed model
    (each layer read from the shards onto ``device``), and each layer's packed experts are written out as
    soon as they are computed; RTN plans read, round and write each layer. Peak memory ~ one layer + the
    calibration activations + one layer's Hessians. The result is the checkpoint ``apply`` + ``save``
    write (``moeslim_base`` / ``moeslim_lowbit`` safetensors, same tensors), merged from per-layer parts.

    ``calibration``: the plan's windows (redrawn from the plan with the checkpoint's tokenizer when None).
    ``resume``: a run key; the per-layer state then lives beside ``out_dir`` (``.NAME.layers/``) and a killed
    run rerun with the same key continues at the next layer. Under torchrun the calibration windows and the
    GPTQ work are split over the processes and rank 0 writes (the other ranks return None).
    """
    from moeslim.appliers import check_plan_fits
    from moeslim.appliers.quantize import gptq_input_ids, quantize_section, quantize_settings, rtn_experts
    from moeslim.calibrate.distributed import world
    from moeslim.calibrate.resume import LayerCheckpoint
    from moeslim.io import checkpoint_dtype
    from moeslim.methods.quant.transform import gptq_experts
    from moeslim.models import decoder_layers, find_moe_layers
    from moeslim.models.lazy import ShardedLayers, load_streamed
    from moeslim.outputs import atomic_dir, check_output_dir
    from moeslim.runtime.lowbit_io import BASE_FILE, LOWBIT_FILE

    check_output_dir(out_dir, overwrite=overwrite, inputs=inputs)
    storage = checkpoint_dtype(source)
    model: Any
    model, tokenizer = load_streamed(source, dtype)
    if not force:
        check_plan_fits(model, plan)
    settings = quantize_settings(model, plan)
    moe = {layer.layer_idx: layer for layer in find_moe_layers(model)}
    me = world()
    out = Path(out_dir)
    state = out.parent / f".{out.name}.layers" if resume is not None else None
    key = resume or "once"
    # Without --resume the parts are this run's temp files, named so the next run removes them after a kill.
    parts = _LayerParts(state if state is not None else out.parent / f"{TMP_PREFIX}{os.getpid()}-{out.name}.parts",
                        key) if me.is_main else None

    def write(index: int, packed: Any) -> None:
        if parts is not None:
            parts.write(index, *_layer_tensors(model, index, packed, moe.get(index), settings, storage))

    try:
        results = None
        device = torch.device(device)
        checkpoint = None
        if settings.quantizer == "gptq":
            if calibration is None:
                calibration = _plan_calibration(plan, tokenizer)
            input_ids = gptq_input_ids(plan, calibration)
            checkpoint = LayerCheckpoint(state, key, rank=me.rank) if state is not None else None
            results = gptq_experts(model, settings.bits, input_ids, settings.config, device, progress,
                                   on_packed=lambda layer, packed: write(layer.layer_idx, packed),
                                   checkpoint=checkpoint)
        if not me.is_main or parts is None:
            if checkpoint is not None:
                checkpoint.finish()
            return None
        store = ShardedLayers(model)
        layer_count = len(decoder_layers(model))
        # RTN plans; dense and unplanned layers of GPTQ plans (a GPTQ plan's pass reported its own layers)
        rtn = progress and settings.quantizer == "rtn"
        for index in steps(range(layer_count), "RTN", layer_count, enabled=rtn):
            if parts.done(index):
                continue
            with store.on_device(index, device):
                widths = settings.bits.get(index)
                packed = None
                if widths is not None and settings.quantizer == "rtn":
                    packed = rtn_experts(moe[index], widths, settings.group_size, settings.config.symmetric)
                elif widths is not None and settings.quantizer == "gptq":
                    raise RuntimeError(f"decoder layer {index} was not GPTQ'd")  # the pass writes every planned layer
                write(index, packed)
        section = dict(getattr(model.config, "moeslim", None) or {})  # what ``moeslim.apply`` records
        section.update(quantize_section(model, settings, results))
        section["applied"] = [*section.get("applied", []),
                              {"kind": plan.kind, "method": plan.provenance.method, "data": plan.provenance.data}]
        model.config.moeslim = section
        rest, aliases = _non_layer_tensors(model, storage)
        with atomic_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
            from safetensors.torch import save_file

            head = parts.folder / "rest.safetensors"
            save_file(rest, str(head), metadata={"format": "pt"})
            layers = range(len(decoder_layers(model)))
            merge_safetensors([head, *(parts.path(i, "base") for i in layers)], tmp / BASE_FILE,
                              {"format": "pt", "aliases": json.dumps(aliases)})
            merge_safetensors([parts.path(i, "lowbit") for i in layers], tmp / LOWBIT_FILE,
                              {"format": "moeslim-lowbit"})
            head.unlink()
            _write_quantized_config(model, tmp, storage, source)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        if checkpoint is not None:  # only now: a kill before the checkpoint is in place resumes from the parts
            checkpoint.finish()
        parts.remove()
        with contextlib.suppress(OSError):
            parts.folder.rmdir()
        return out
    except BaseException:
        if resume is None and parts is not None:  # a one-shot run leaves no parts behind
            shutil.rmtree(parts.folder, ignore_errors=True)
        raise


def _plan_calibration(plan: Plan, tokenizer: Any) -> Any:
    """The plan's calibration windows, redrawn as ``moeslim apply`` redraws them."""
    from moeslim.data.calibration_set import build_calibration_set, calibration_config

    if tokenizer is None:
        raise ConfigError("this GPTQ quantize plan needs its calibration windows, which need the model's tokenizer")
    return build_calibration_set(calibration_config(plan.summary.get("calibration") or {}), tokenizer)


def _write_quantized_config(model: Any, folder: Path, storage: torch.dtype | None, source: str) -> None:
    """config.json and generation_config.json as ``save_quantized`` writes them for the loaded model."""
    from transformers import GenerationConfig

    from moeslim.runtime.checkpoint_files import record_dtype
    from moeslim.runtime.lowbit_forward import IMPLEMENTATION
    from moeslim.runtime.routed_experts import use_implementation

    use_implementation(model.config, IMPLEMENTATION)  # what installing the packed experts sets
    model.config.save_pretrained(folder)
    record_dtype(folder, storage)
    generation = (GenerationConfig.from_pretrained(source) if (Path(source) / "generation_config.json").is_file()
                  else getattr(model, "generation_config", None))
    if generation is not None:
        generation.save_pretrained(folder)


def _refuse_router_refit(plans: Sequence[Plan]) -> None:
    """A prune plan with ``recalibrate_router`` refits router rows in a calibration pass, which streaming skips."""
    if any(p.kind == "prune" and p.provenance.config.get("recalibrate_router") for p in plans):
        raise ConfigError("this prune plan refits the router (recalibrate_router), which needs a calibration pass "
                          "that apply --stream does not run; apply it without --stream")
