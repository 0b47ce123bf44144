"""``moeslim export --stream``: GGUF and compressed-tensors from a checkpoint folder, one decoder layer at a time.

The model is never held: a skeleton of it (decoder layers on the meta device, ``models.lazy``) gives the config,
the layer layout and every tensor's name and shape; the tensors are read from the safetensors files when the
writer reaches them and dropped after. Two kinds of folder:

- a transformers checkpoint (original, or pruned by ``moeslim apply``): one decoder layer at a time through
  transformers' own key conversion (``ShardedLayers``), so every family loads as ``from_pretrained`` loads it;
  the layers are read in the checkpoint's dtype when every floating tensor has it (bfloat16 stays bfloat16: half
  the memory of float32, the same values), else in float32;
- a moeslim quantized checkpoint (``moeslim_base`` / ``moeslim_lowbit.safetensors``): one tensor at a time, the
  packed experts dequantized (GGUF) or re-packed (compressed-tensors) from their codes.

The output is the in-memory export's (``export_gguf`` / ``export_compressed_tensors`` of ``moeslim.load(folder)``):
the same tensors in the same order, so the same GGUF bytes and the same compressed-tensors tensors and config.
Peak memory: one decoder layer (plus its transient copies while converted) and the weights outside the layers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeslim.export.errors import UnsupportedExportError

__all__ = ["StreamedCheckpoint", "export_compressed_tensors_streamed", "export_gguf_streamed", "open_checkpoint"]


@dataclass
class StreamedCheckpoint:
    """A checkpoint folder read on demand: ``model`` is a skeleton (layers on meta) for config and shapes.

    ``layer_state(i)`` / ``rest_state()``: the float tensors of decoder layer ``i`` / outside the layers under the
    model's names; ``read_lowbit(names)``: packed parameters ({name: LowBitTensor}; a transformers checkpoint has
    none). ``storage``: the one floating dtype the checkpoint stores, when it has one.
    """

    model: nn.Module
    tokenizer: Any
    folder: Path
    storage: torch.dtype | None
    layer_state: Callable[[int], contextlib.AbstractContextManager[dict[str, torch.Tensor]]]
    rest_state: Callable[[], dict[str, torch.Tensor]]
    read_lowbit: Callable[[list[str]], dict[str, Any]]
    lowbit_order: list[str]  # packed parameter names in the order the loaded model lists them
    layer_prefixes: list[str]

    @property
    def quantized(self) -> bool:
        return bool(self.lowbit_order)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What ``gguf.model_tensors(moeslim.load(folder))`` lists, in its order, one layer resident at a time."""
        packed = set(self.lowbit_order)
        state_keys = [k for k in self.model.state_dict() if k not in packed]
        rest = self.rest_state()
        with contextlib.ExitStack() as stack:
            current, layer = -1, dict[str, torch.Tensor]()
            for key in state_keys:
                index = self.layer_of(key)
                if index is None:
                    yield key, rest[key]
                    continue
                if index != current:
                    layer = {}
                    stack.close()
                    layer = stack.enter_context(self.layer_state(index))
                    current = index
                yield key, layer[key]
        for name in self.lowbit_order:
            yield name, self.read_lowbit([name])[name].dequantize()

    def layer_of(self, key: str) -> int | None:
        """The decoder layer a tensor name lies in (None: outside the layers)."""
        return next((i for i, p in enumerate(self.layer_prefixes) if key.startswith(p)), None)


class StreamingExportError(UnsupportedExportError):
    """The folder cannot be exported with --stream (and why)."""


def _refuse_runtime_forms(folder: Path) -> dict[str, Any]:
    """The moeslim section; refuses the runtime forms streaming does not read (compact non-uniform experts,
    low-rank experts, skipping), naming them."""
    config = folder / "config.json"
    section = (json.loads(config.read_text()).get("moeslim") or {}) if config.is_file() else {}
    from moeslim.runtime.serialize import stored_form

    form = stored_form(section)
    held = [form.name] if form is not None and form.name != "packed low-bit experts" else []
    if "lowrank" in section and "low-rank experts" not in held:  # a joint plan's low-rank layers in low-bit form
        held.append("low-rank experts")
    held += ["skipping" for key in ("skip",) if key in section]
    held += ["packed attention / token embedding" for key in ("packed_nonexpert",) if key in section]
    if held:
        raise StreamingExportError(f"export --stream reads transformers checkpoints (original, pruned) and moeslim "
                                   f"quantized ones; {folder} holds {' and '.join(held)}: export it without --stream")
    return section


def _uniform_dtype(files: Iterable[Path]) -> torch.dtype | None:
    """The one floating dtype of every floating tensor in ``files`` (safetensors headers), else None."""
    from safetensors import safe_open

    floating = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    found: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                dtype = handle.get_slice(key).get_dtype()
                if dtype.startswith(("F", "BF")):
                    found.add(dtype)
    return floating.get(found.pop()) if len(found) == 1 else None


def open_checkpoint(name: str) -> StreamedCheckpoint:
    """The checkpoint folder ``name`` ("demo" or a local folder) for a streamed export; refuses other forms."""
    from moeslim.models import resolve_model_path
    from moeslim.runtime.lowbit_io import BASE_FILE, LOWBIT_FILE

    folder = Path(resolve_model_path(name))
    if not folder.is_dir():
        raise StreamingExportError(f"export --stream reads a local checkpoint folder; {name!r} is not one (download "
                                   "it first, e.g. `hf download NAME --local-dir DIR`)")
    section = _refuse_runtime_forms(folder)
    if "quantize" in section or (folder / LOWBIT_FILE).is_file():
        return _open_quantized(folder, BASE_FILE, LOWBIT_FILE)
    return _open_transformers(str(resolve_model_path(name)), folder)


def _open_transformers(path: str, folder: Path) -> StreamedCheckpoint:
    from moeslim.models.lazy import ShardedLayers, checkpoint_shards, load_streamed

    storage = _uniform_dtype(checkpoint_shards(folder))
    model, tokenizer = load_streamed(path, storage or torch.float32)
    store = ShardedLayers(model, path)
    prefixes = store.index.layer_prefixes

    @contextlib.contextmanager
    def layer_state(index: int) -> Iterator[dict[str, torch.Tensor]]:
        with store.on_device(index, torch.device("cpu")) as layer:
            yield {prefixes[index] + k: v for k, v in layer.state_dict().items()}

    def rest_state() -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if not any(k.startswith(p) for p in prefixes)}

    return StreamedCheckpoint(model, tokenizer, folder, storage, layer_state, rest_state, lambda names: {}, [],
                              prefixes)


def _open_quantized(folder: Path, base_file: str, lowbit_file: str) -> StreamedCheckpoint:
    """A moeslim quantized checkpoint: every tensor is stored under the model's own name, so each is read alone."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from moeslim.methods.quant.fused import LowBitTensor
    from moeslim.models import decoder_layers
    from moeslim.runtime.checkpoint_files import saved_tokenizer

    for file in (base_file, lowbit_file):
        if not (folder / file).is_file():
            raise StreamingExportError(f"{folder} is not a moeslim quantized checkpoint: {file} is missing")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # as load_quantized reads it
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(layer)] + "." for layer in decoder_layers(model)]
    with safe_open(str(folder / base_file), framework="pt") as handle:
        aliases: dict[str, str] = json.loads((handle.metadata() or {}).get("aliases", "{}"))
        base_keys = list(handle.keys())  # noqa: SIM118
    with safe_open(str(folder / lowbit_file), framework="pt") as handle:
        lowbit_keys = list(handle.keys())  # noqa: SIM118
    packed = [k.removesuffix(".qmeta") for k in lowbit_keys if k.endswith(".qmeta")]
    # load_quantized installs them in file order; the loaded model lists them module by module
    position = {n: i for i, n in enumerate(names.values())}
    order = sorted(packed, key=lambda p: (position.get(p.rpartition(".")[0], -1), packed.index(p)))
    storage = _uniform_dtype([folder / base_file])

    def read(keys: list[str], file: str) -> dict[str, torch.Tensor]:
        with safe_open(str(folder / file), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in keys}

    @contextlib.contextmanager
    def layer_state(index: int) -> Iterator[dict[str, torch.Tensor]]:
        yield read([k for k in base_keys if k.startswith(prefixes[index])], base_file)

    def rest_state() -> dict[str, torch.Tensor]:
        rest = read([k for k in base_keys if not any(k.startswith(p) for p in prefixes)], base_file)
        rest.update({alias: rest[source] for alias, source in aliases.items() if source in rest})
        return rest

    def read_lowbit(names: list[str]) -> dict[str, Any]:
        state = read([k for k in lowbit_keys if any(k.startswith(f"{p}.q") for p in names)], lowbit_file)
        return {p: LowBitTensor.from_state_dict(state, p) for p in names}

    return StreamedCheckpoint(model, saved_tokenizer(folder), folder, storage, layer_state, rest_state, read_lowbit,
                              order, prefixes)


def export_gguf_streamed(source: str, out: str | Path, **options: Any) -> Any:
    """``export_gguf`` of the checkpoint folder ``source`` (the same file), one decoder layer read at a time.

    ``options``: those of ``export_gguf`` (qtype, plan, llama_quantize, imatrix, name, inputs, overwrite,
    progress, top_k). With ``llama_quantize`` the intermediate holds a bfloat16 checkpoint's matrices as BF16 (float16:
    F16), not F32: see ``gguf.write_gguf``.
    """
    from moeslim.export.gguf import write_gguf
    from moeslim.outputs import output_lock

    with output_lock(out):
        checkpoint = open_checkpoint(source)
        defaults: dict[str, Any] = {"qtype": "F16", "plan": None, "llama_quantize": None, "imatrix": None,
                                    "name": None, "inputs": (), "overwrite": False, "progress": False,
                                    "top_k": None}
        return write_gguf(checkpoint.model, checkpoint.tokenizer, checkpoint.tensors, out, **{**defaults, **options})


def _layer_experts(checkpoint: StreamedCheckpoint, index: int) -> dict[str, Any]:
    """The packed experts of decoder layer ``index`` ({parameter name: LowBitTensor})."""
    return checkpoint.read_lowbit([n for n in checkpoint.lowbit_order if checkpoint.layer_of(n) == index])


def _ct_widths(checkpoint: StreamedCheckpoint, scheme: str) -> Any:
    """How the packed experts are written (``CtWidths``: one width per decoder layer, as the in-memory export
    allows), read one layer at a time, or None when there are none; refuses what ``export_compressed_tensors``
    refuses, with its messages."""
    from moeslim.export.compressed_tensors import CT_SCHEMES, ct_widths, on_grid, stored_scheme
    from moeslim.methods.quant.fused import KEEP_BITS

    other = [n for n in checkpoint.lowbit_order if ".experts." not in n]
    if other:
        raise UnsupportedExportError(f"compressed-tensors export writes quantized experts only; also quantized: "
                                     f"{other[:4]} (plan without quantize_attention)")
    if scheme not in CT_SCHEMES:
        raise UnsupportedExportError(f"scheme={scheme!r}: use one of {', '.join(CT_SCHEMES)}")
    if not checkpoint.quantized:
        return None
    widths: dict[int, set[int]] = {}
    inputs: dict[int, set[int]] = {}
    groups: set[int] = set()
    kinds: dict[int, tuple[bool, bool]] = {}  # layer: (planned symmetric, zero points on the symmetric grid)
    for index in range(len(checkpoint.layer_prefixes)):
        experts = list(_layer_experts(checkpoint, index).values())
        if not experts:  # a dense decoder layer
            continue
        if any(t.transposed for t in experts):
            raise UnsupportedExportError("compressed-tensors export needs (E, out, in) expert tensors")
        widths[index] = {b for t in experts for b in t.bits}
        inputs[index] = {t.out_in[1] for t in experts}
        groups |= {t.group_size for t in experts}
        symmetric = all(t.symmetric for t in experts)
        quantized = len(widths[index]) == 1 and KEEP_BITS not in widths[index]  # else refused or left dense
        grid = quantized and scheme != "asymmetric" and (symmetric or on_grid(experts, next(iter(widths[index]))))
        kinds[index] = symmetric, grid
    return ct_widths(widths, groups, inputs, lambda idx, b: stored_scheme(b, scheme, *kinds[idx]))


def _dense_skeleton(checkpoint: StreamedCheckpoint, dtype: torch.dtype) -> nn.Module:
    """A meta model of the checkpoint's config without its moeslim section (the in-memory export's dense copy)."""
    from transformers import AutoModelForCausalLM

    source: Any = checkpoint.model.config
    config = source.__class__.from_dict({k: v for k, v in source.to_dict().items() if k != "moeslim"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def export_compressed_tensors_streamed(source: str, out: str | Path, *, scheme: str = "symmetric",
                                       overwrite: bool = False, inputs: Iterable[str | Path] = (),
                                       progress: bool = False) -> Any:
    """``export_compressed_tensors`` of the checkpoint folder ``source`` (a moeslim quantized checkpoint, or a
    transformers one: then a plain checkpoint), one decoder layer at a time: each layer's tensors are put in the
    checkpoint's on-disk layout (transformers' ``revert_weight_conversion``), its experts replaced by their
    pack-quantized tensors (the same functions, the same checks) and written as a part; the parts are merged
    (bytes copied) into the shards. The same tensors and config.json as the in-memory export; the dense tensors
    are stored in the checkpoint's floating dtype (a bfloat16 checkpoint stays bfloat16; ``moeslim.load``
    computes in float32, so the in-memory export writes float32 there: the same values)."""
    from safetensors.torch import save_file

    from moeslim.export.compressed_tensors import CtExport, ExpertsLayout, replace_experts
    from moeslim.models.loading import quiet_loading
    from moeslim.outputs import atomic_dir, output_lock, temp_dir_beside
    from moeslim.progress import steps
    from moeslim.runtime.shard_files import merge_safetensors, on_disk_layout

    with output_lock(out):
        from moeslim.outputs import check_output_dir

        check_output_dir(out, overwrite=overwrite, inputs=inputs)
        checkpoint = open_checkpoint(source)
        found = _ct_widths(checkpoint, scheme)
        dtype = checkpoint.storage or torch.float32
        dense: Any = _dense_skeleton(checkpoint, dtype)
        tied = bool(getattr(dense.config, "tie_word_embeddings", False))
        replaced = 0
        layers = len(checkpoint.layer_prefixes)
        with atomic_dir(out, overwrite=overwrite, inputs=inputs) as tmp, temp_dir_beside(out) as stage:
            parts = Path(stage)
            with quiet_loading():  # config.json and generation_config.json as save_pretrained writes them
                dense.save_pretrained(parts, state_dict={})
            rest = {k: v for k, v in checkpoint.rest_state().items() if not (tied and k == "lm_head.weight")}
            save_file(on_disk_layout(dense, rest, dtype), str(parts / "rest.safetensors"), metadata={"format": "pt"})
            del rest
            for index in steps(range(layers), "compressed-tensors", layers, unit="layers", enabled=progress):
                with checkpoint.layer_state(index) as held:
                    state = dict(held)
                experts = _layer_experts(checkpoint, index)
                state.update({name: t.dequantize() for name, t in experts.items()})
                tensors = on_disk_layout(dense, state, dtype)
                del state
                if found is not None and index in found.stored:  # a layer at 16 bits stays dense
                    fused = {n.rpartition(".")[2]: t for n, t in experts.items()}
                    layout = ExpertsLayout({index: fused["gate_up_proj"]}, {index: fused["down_proj"]}, found)
                    replaced += replace_experts(tensors, layout)
                save_file(tensors, str(parts / f"layer-{index}.safetensors"), metadata={"format": "pt"})
                del tensors
            _write_shards([parts / "rest.safetensors", *(parts / f"layer-{i}.safetensors" for i in range(layers))],
                          tmp, merge_safetensors)
            config = json.loads((parts / "config.json").read_text())
            if found is not None:
                config["quantization_config"] = found.config().to_dict()
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "generation_config.json").write_bytes((parts / "generation_config.json").read_bytes())
            if checkpoint.tokenizer is not None:
                checkpoint.tokenizer.save_pretrained(tmp)
        written = found.stored if found is not None else {}
        expected = sum(int(checkpoint.model.get_parameter(n).shape[0]) * (2 if n.endswith("gate_up_proj") else 1)
                       for n in checkpoint.lowbit_order if checkpoint.layer_of(n) in written)
        if replaced != expected:
            raise RuntimeError(f"wrote {replaced} packed expert weights, expected {expected}")
        if found is None:
            return CtExport(Path(out), None, None, False, None, 0)
        return found.result(Path(out), replaced)


_MAX_SHARD = 50 * 10**9  # save_pretrained's default max_shard_size ("50GB")


def _write_shards(parts: list[Path], folder: Path, merge: Callable[..., None]) -> None:
    """The parts' tensors as save_pretrained shards them: one ``model.safetensors`` up to 50 GB, else numbered
    shards of whole parts and an index."""
    from moeslim.runtime.shard_files import safetensors_header

    sizes = [p.stat().st_size for p in parts]
    groups: list[list[Path]] = [[]]
    total = 0
    for part, size in zip(parts, sizes, strict=True):
        if groups[-1] and total + size > _MAX_SHARD:
            groups.append([])
            total = 0
        groups[-1].append(part)
        total += size
    if len(groups) == 1:
        merge(parts, folder / "model.safetensors", {"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups):
        name = f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
        merge(group, folder / name, {"format": "pt"})
        for part in group:
            weight_map.update(dict.fromkeys(safetensors_header(part)[0], name))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
