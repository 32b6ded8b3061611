"""DiffusionGemma at scale: built on the meta device, its weights loaded shard by shard, gathered once to save.

`meta_model(dir)` builds the model from a dir's config.json without allocating any weight (no rank ever holds
the whole model in fp32 on the host). After sharding (dg_pipeline.training.sharding), `load_sharded_weights`
materialises each rank's shards on its device and reads into them only the rows the rank owns
(`safe_open(...).get_slice`), one tensor at a time. `gather_model` is the way back: every rank takes part in
gathering each tensor and rank 0 alone builds a plain DiffusionGemmaForBlockDiffusion from them (in the dtype
to save), which `save_model` then writes.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from dg_pipeline.core.errors import InputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def meta_model(config: DiffusionGemmaConfig) -> DiffusionGemmaForBlockDiffusion:
    """The model with every parameter and buffer on the meta device (instant, no memory)."""
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    return model.eval()


def config_of(model_dir: str | Path) -> DiffusionGemmaConfig:
    return DiffusionGemmaConfig.from_pretrained(model_dir)


def nonpersistent_buffers(config: DiffusionGemmaConfig) -> dict[str, torch.Tensor]:
    """Values of the buffers checkpoints do not hold (rotary frequencies, embedding scales), computed on the CPU
    by the model's own initialiser while the weights stay on the meta device."""
    model = meta_model(config)
    values = {}
    for module_name, module in model.named_modules():
        names = [n for n in module._buffers if n in module._non_persistent_buffers_set]
        if not names:
            continue
        for n in names:
            module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
        model._init_weights(module)  # fills the buffers; parameters on meta are untouched
        for n in names:
            values[f"{module_name}.{n}" if module_name else n] = module._buffers[n]
    return values


class CheckpointTensors:
    """Lazy, sliceable access to a model dir's safetensors by name (single file or sharded with an index)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if (self.model_dir / INDEX_FILE).is_file():
            weight_map = json.loads((self.model_dir / INDEX_FILE).read_text())["weight_map"]
        elif (self.model_dir / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise InputError(f"input={self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; sharded loading reads "
                             f"safetensors (save the model with save_pretrained)")
        self._stack = ExitStack()
        self._files: dict[str, object] = {}
        if weight_map is None:
            handle = self._open(SINGLE_FILE)
            self.file_of = {k: SINGLE_FILE for k in handle.keys()}
        else:
            self.file_of = dict(weight_map)

    def _open(self, name: str):
        if name not in self._files:
            self._files[name] = self._stack.enter_context(safe_open(str(self.model_dir / name), framework="pt"))
        return self._files[name]

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of tensor `key` (all rows by default), read without the rest."""
        tensor_slice = self._open(self.file_of[key]).get_slice(key)
        if start is None:
            return tensor_slice[:]
        return tensor_slice[start:stop]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shard_rows(rows: int, rank: int, ranks: int) -> tuple[int, int]:
    """[start, stop) of the rows rank `rank` owns when `rows` are split as torch.chunk splits them (FSDP2's dim-0
    sharding: ceil(rows / ranks) each, the last ranks possibly short or empty)."""
    chunk = -(-rows // ranks)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def _local_rows(param) -> tuple[torch.Tensor, int, int]:
    """(local tensor, first global row, last global row + 1) of a parameter sharded on dim 0 (or whole)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param.data, 0, param.shape[0] if param.dim() else 0
    placements = param.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"sharded loading reads dim-0 shards on a 1-D mesh; got placements {placements}")
    mesh = param.device_mesh
    start, stop = shard_rows(param.shape[0], mesh.get_local_rank(), mesh.size())
    return param.to_local(), start, stop


def checkpoint_names(model) -> dict[int, list[str]]:
    """Every name a parameter goes by (tied weights have several), keyed by the parameter's identity."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


@torch.no_grad()
def load_sharded_weights(model, model_dir: str | Path, device: torch.device | str) -> None:
    """Materialise a sharded meta-device `model` on `device` and fill it from `model_dir`: each rank reads only the
    rows it owns of each tensor (or whole tensors for what is not sharded), one tensor at a time."""
    model.to_empty(device=device)
    for name, value in nonpersistent_buffers(model.config).items():
        model.get_buffer(name).copy_(value)
    with CheckpointTensors(model_dir) as tensors:
        for aliases in checkpoint_names(model).values():
            key = next((n for n in aliases if n in tensors), None)
            if key is None:
                raise InputError(f"input={model_dir}: the weights lack {aliases[0]} (tried {', '.join(aliases)}); "
                                 f"the checkpoint is incomplete or from another model")
            param = model.get_parameter(aliases[0])
            local, start, stop = _local_rows(param)
            if stop > start:
                local.copy_(tensors.rows(key, start, stop).to(device=local.device, dtype=local.dtype))
        persistent = [n for n, _ in model.named_buffers(remove_duplicate=False) if n in tensors]
        for name in persistent:
            buffer = model.get_buffer(name)
            buffer.copy_(tensors.rows(name).to(device=buffer.device, dtype=buffer.dtype))


def _full(tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def gather_model(model, dtype: torch.dtype, is_rank_zero: bool) -> DiffusionGemmaForBlockDiffusion | None:
    """Gather a sharded `model` into a plain DiffusionGemmaForBlockDiffusion on rank 0 (in `dtype`, on the CPU);
    every rank must call it (each tensor is one collective), the others get None. Tied weights stay tied."""
    plain = meta_model(model.config) if is_rank_zero else None
    for aliases in checkpoint_names(model).values():
        full = _full(model.get_parameter(aliases[0]))
        if plain is not None:
            value = torch.nn.Parameter(full.detach().to(device="cpu", dtype=dtype).clone(),
                                       requires_grad=False)
            for name in aliases:  # one Parameter object under every name, as the model ties them
                module_name, _, attr = name.rpartition(".")
                setattr(plain.get_submodule(module_name) if module_name else plain, attr, value)
        del full
    if plain is None:
        return None
    buffers = nonpersistent_buffers(model.config)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        value = buffers[name] if name in buffers else buffer.detach().to("cpu")
        owner = plain.get_submodule(module_name) if module_name else plain
        owner._buffers[attr] = value.to(dtype) if value.is_floating_point() else value  # as model.to(dtype) does
    plain.generation_config = model.generation_config
    return plain.eval()
