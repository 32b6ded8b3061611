"""The exported checkpoint format, in one place: tensor formats of a quantized linear, the modules that must stay
unquantized, the layers that share an input, tied-weight naming, and a lazy reader of the safetensors files.

The writer (unified.py), the checker (checker.py), the reload (reload.py) and the size benchmark all read these
definitions, so a rule is stated once. export/FORMAT.md documents the same rules for people.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.io import read_json
from dg_pipeline.model.vllm_contract import ARCHITECTURE

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
# Written by the export stage; the checker and the reload read them.
HF_QUANT_CONFIG = "hf_quant_config.json"
GENERATION_CONFIG = "generation_config.json"
# One of these holds the vocabulary; tokenizer_config.json holds the special tokens and the class.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True)
class LinearFormat:
    """How one quantized linear [out, in] is stored: its tensors (leaf names), dtypes and packing."""

    algo: str  # the upper-case quant_algo of hf_quant_config.json
    weight_dtype: torch.dtype
    weight_scale_dtype: torch.dtype
    leaves: tuple[str, ...]  # every tensor a quantized linear of this format must have
    inputs_per_byte: int  # input features packed into one stored weight element
    group_size: int | None  # input features per block scale (None: one per-tensor scale)

    def weight_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, in_features // self.inputs_per_byte

    def weight_scale_shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return () if self.group_size is None else (out_features, in_features // self.group_size)


FP8 = LinearFormat("FP8", torch.float8_e4m3fn, torch.float32, ("weight", "weight_scale", "input_scale"), 1, None)
NVFP4 = LinearFormat(
    "NVFP4", torch.uint8, torch.float8_e4m3fn, ("weight", "weight_scale", "weight_scale_2", "input_scale"), 2, 16
)
LINEAR_FORMATS = {f.algo: f for f in (FP8, NVFP4)}
FORMAT_BY_WEIGHT_DTYPE = {f.weight_dtype: f for f in (FP8, NVFP4)}
# Tensors that only exist next to a quantized weight (KV-cache scales sit on k_proj / v_proj).
SCALE_LEAVES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale")

# Modules that must stay in the original precision, and why (the checker quotes the reason).
KEEP_UNQUANTIZED: tuple[tuple[str, str], ...] = (
    ("lm_head", "vLLM cannot load a quantized lm_head (and it is tied to the embeddings)"),
    ("*.router*", "MoE routers are read as plain linears by the loaders"),
    ("*.self_conditioning*", "vLLM builds the self-conditioning MLP from plain nn.Linear layers"),
    ("*.vision_tower*", "the vision tower is loaded unquantized"),
    ("*.embed_vision*", "the vision projection is loaded unquantized"),
    ("*.embed_tokens", "embeddings are tied to lm_head and stay unquantized"),
)

# Linears that read the same input are fused by the loaders (dg_pipeline.model.vllm_contract.fused_group); TensorRT-LLM
# asserts that their NVFP4 input_scale and weight_scale_2 are identical.
SHARED_SCALE_LEAVES = ("input_scale", "weight_scale_2")

# Tied weights: the encoder's text backbone IS the decoder's; the export stores the decoder's names only
# (vLLM maps both model.decoder.* and model.encoder.language_model.* onto one backbone, model.*).
ENCODER_TEXT_PREFIX = "model.encoder.language_model."
DECODER_PREFIX = "model.decoder."
# Buffers are copied, not tied, so the encoder keeps its own copy of these.
UNTIED_BUFFER_LEAVES = ("layer_scalar",)

# Fused 3-D expert parameters of the HF class and their per-expert export names.
FUSED_EXPERTS = re.compile(r"^(?P<experts>.+\.experts)\.(?P<param>gate_up_proj|down_proj)$")
# Any tensor of a fused expert parameter (the parameter itself or scales named after it).
FUSED_EXPERT_REMNANT = re.compile(r"\.experts\.(?:gate_up_proj|down_proj)(?:$|[._])")
PER_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def split_leaf(name: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight'); a top-level name has module ''."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def matches_module(module: str, patterns: Iterable[str]) -> bool:
    """True when `module` is matched by one of exclude_modules' patterns, the way vLLM reads them: by wildcard
    (fnmatch) or as a dotted prefix/substring."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(module, pattern + ".*"):
            return True
        if "*" not in pattern and (module == pattern or pattern in module):
            return True
    return False


def keep_unquantized_reason(module: str) -> str | None:
    """Why `module` must stay unquantized, or None when it may be quantized."""
    for pattern, reason in KEEP_UNQUANTIZED:
        if fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(module, pattern + ".*"):
            return reason
    return None


def canonical_tied_name(name: str) -> str:
    """The name a tied encoder weight is stored under (the decoder's); other names are unchanged."""
    if name.startswith(ENCODER_TEXT_PREFIX) and split_leaf(name)[1] not in UNTIED_BUFFER_LEAVES:
        return DECODER_PREFIX + name[len(ENCODER_TEXT_PREFIX):]
    return name


# ------------------------------------------------------------------------------------------------ safetensors

# safetensors' dtype codes -> torch dtypes
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    name: str
    file: str  # the safetensors file (relative to the export dir)
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def weight_files(export_dir: str | Path) -> list[str]:
    """The safetensors files of a checkpoint dir (single file, or the shards its index names)."""
    export_dir = Path(export_dir)
    index = export_dir / SAFETENSORS_INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index}: no `weight_map`; the index is not a safetensors index")
        return sorted(set(weight_map.values()))
    if (export_dir / SINGLE_SAFETENSORS).exists():
        return [SINGLE_SAFETENSORS]
    raise InputError(f"{export_dir}: no {SINGLE_SAFETENSORS} or {SAFETENSORS_INDEX}; not an exported checkpoint")


class CheckpointTensors:
    """Lazy view of a checkpoint's tensors: names, dtypes and shapes from the headers; values on demand."""

    def __init__(self, export_dir: str | Path):
        self.dir = Path(export_dir)
        self.files = weight_files(self.dir)
        self.tensors: dict[str, StoredTensor] = {}
        missing = [f for f in self.files if not (self.dir / f).exists()]
        if missing:
            raise InputError(f"{self.dir / SAFETENSORS_INDEX}: names shard(s) {missing} that are not in the dir")
        for file in self.files:
            with safe_open(self.dir / file, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise InputError(f"{self.dir / file}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                    self.tensors[name] = StoredTensor(name, file, dtype, tuple(sl.get_shape()))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[StoredTensor]:
        return iter(self.tensors.values())

    def get(self, name: str) -> StoredTensor | None:
        return self.tensors.get(name)

    def load(self, name: str) -> torch.Tensor:
        with safe_open(self.dir / self.tensors[name].file, framework="pt") as f:
            return f.get_tensor(name)

    def load_all(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for file in self.files:
            with safe_open(self.dir / file, framework="pt") as f:
                for name in f.keys():
                    out[name] = f.get_tensor(name)
        return out

    def modules(self) -> dict[str, dict[str, StoredTensor]]:
        """module name -> {leaf: tensor}."""
        by_module: dict[str, dict[str, StoredTensor]] = {}
        for t in self.tensors.values():
            module, leaf = split_leaf(t.name)
            by_module.setdefault(module, {})[leaf] = t
        return by_module


def quantized_format(leaves: dict[str, StoredTensor]) -> LinearFormat | None:
    """The format of a stored module from its weight dtype, or None when the weight is not quantized."""
    weight = leaves.get("weight")
    if weight is not None and weight.dtype in FORMAT_BY_WEIGHT_DTYPE:
        return FORMAT_BY_WEIGHT_DTYPE[weight.dtype]
    return None


def effective_quantization(qc: dict) -> dict:
    """config.json's quantization_config read as vLLM's ModelOpt config reads it (modelopt.py from_config): the
    nested hf_quant_config form, or the flat form (`ignore`, `kv_cache_scheme` {type float, num_bits 8} = FP8)."""
    if isinstance(qc.get("quantization"), dict):
        return dict(qc["quantization"])
    scheme = qc.get("kv_cache_scheme")
    fp8_kv = isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8
    return {
        "quant_algo": qc.get("quant_algo"),
        "kv_cache_quant_algo": "FP8" if fp8_kv else None,
        "exclude_modules": qc.get("ignore") if "ignore" in qc else [],
        "group_size": qc.get("group_size"),
    }


def read_quant_config(export_dir: str | Path) -> dict | None:
    """The quantization settings vLLM reads (config.json's quantization_config, else hf_quant_config.json's
    `quantization` block), or None for an unquantized checkpoint."""
    export_dir = Path(export_dir)
    config = export_dir / "config.json"
    qc = read_json(config).get("quantization_config") if config.exists() else None
    if isinstance(qc, dict):
        return effective_quantization(qc)
    path = export_dir / HF_QUANT_CONFIG
    return read_json(path).get("quantization") if path.exists() else None
