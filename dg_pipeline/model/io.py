"""Load and save DiffusionGemma model dirs.

`load_base(dir)` is the one way in: it inspects what the dir holds (dg_pipeline.model.inspect) and returns a
DiffusionGemmaForBlockDiffusion either loaded as is (a DiffusionGemma checkpoint) or converted (a Gemma 4 causal LM,
dg_pipeline.model.convert). `load_model` is its short form. `save_model` writes a dir that
`DiffusionGemmaForBlockDiffusion.from_pretrained`, AutoTokenizer and vLLM load, atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaGenerationConfig,
)

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.io import atomic_dir
from dg_pipeline.core.manifest import MANIFEST, verify_manifest
from dg_pipeline.data.tokenizer import save_tokenizer, tokenizer_mismatch
from dg_pipeline.model.convert import ConversionReport, convert_checkpoint
from dg_pipeline.model.inspect import CheckpointInfo, from_pretrained_complete, inspect_checkpoint
from dg_pipeline.model.structure import untied_backbone_weights
from dg_pipeline.model.vllm_contract import ARCHITECTURE, complete_engine_attributes
from dg_pipeline.settings.sampler import eos_token_ids
from dg_pipeline.settings.sampler import generation_config as sampler_generation_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# LoadedModel.kind (and verify.json's source kind for a loaded base)
KIND_DIFFUSION_GEMMA = "diffusion_gemma"
KIND_GEMMA4_CONVERTED = "gemma4_converted"


def resolve_device(device: str) -> str:
    """`device=auto` as the device this host has (cuda when available, else cpu)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"device={device}: choose cpu, cuda or auto")
    return device


def resolve_dtype(dtype: str | torch.dtype, key: str = "model.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise InputError(f"{key}={dtype}: unknown dtype; choose one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


@dataclass
class LoadedModel:
    model: DiffusionGemmaForBlockDiffusion
    tokenizer: object
    kind: str  # KIND_DIFFUSION_GEMMA | KIND_GEMMA4_CONVERTED
    info: CheckpointInfo
    conversion: ConversionReport | None = None


def load_tokenizer(info: CheckpointInfo, key: str = "model.base"):
    """The dir's tokenizer; refuses one with more tokens than the model has embedding rows."""
    vocab_size = (info.config.get("text_config") or info.config).get("vocab_size")
    try:
        tokenizer = AutoTokenizer.from_pretrained(info.path)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{key}={info.path}: the tokenizer files there do not load ({e})") from None
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise InputError(
            f"{key}={info.path}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
            f"the tokenizer belongs to another model"
        )
    mismatch = tokenizer_mismatch(tokenizer, info.path)
    if mismatch:
        raise InputError(f"{key}={info.path}: {mismatch}")
    return tokenizer


def _load_diffusion_gemma(info: CheckpointInfo, dtype: torch.dtype, key: str) -> DiffusionGemmaForBlockDiffusion:
    model = from_pretrained_complete(DiffusionGemmaForBlockDiffusion, info, dtype, key, "DiffusionGemma")
    untied = untied_backbone_weights(model)
    if untied:
        raise InputError(
            f"{key}={info.path}: encoder and decoder weights are not shared after loading ({', '.join(untied[:3])}); "
            f"config.json must keep tie_word_embeddings=true"
        )
    return model


def verify_release_manifest(model_dir: Path) -> None:
    """A dir holding a release manifest (a bf16 export bundle) is loaded only if every file matches its sha256."""
    if (model_dir / MANIFEST).is_file():
        verify_manifest(model_dir)


def load_base(
    path: str | Path,
    canvas_length: int | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    check_parity: bool = False,
    key: str = "model.base",
    seed: int = 0,
) -> LoadedModel:
    """A DiffusionGemma from a DiffusionGemma dir (as is) or a Gemma 4 causal-LM dir (converted), in eval mode.

    canvas_length: None keeps a DiffusionGemma checkpoint's own (and 256 for a conversion); a value overrides it.
    check_parity: for a conversion, measure the parity figures into `.conversion` before dropping the source.
    Every bad dir raises one InputError naming `key`, the dir/file and what was expected.
    """
    info = inspect_checkpoint(path, key=key)
    verify_release_manifest(Path(info.path))
    torch_dtype = resolve_dtype(dtype)
    if canvas_length is not None and (not isinstance(canvas_length, int) or canvas_length <= 0):
        raise InputError(f"model.canvas_length={canvas_length}: must be a positive integer (the block length)")
    tokenizer = load_tokenizer(info, key=key)  # before the weights: a bad tokenizer fails fast
    conversion = None
    if info.is_diffusion_gemma:
        model = _load_diffusion_gemma(info, torch_dtype, key).to(device)
        kind = KIND_DIFFUSION_GEMMA
        if canvas_length is not None:
            model.config.canvas_length = canvas_length
    else:
        model, conversion = convert_checkpoint(
            info, canvas_length or 256, torch_dtype, device, check_parity=check_parity, seed=seed, key=key
        )
        kind = KIND_GEMMA4_CONVERTED
    model.generation_config = sampler_generation_config(tokenizer, base=model.generation_config, model_config=model.config)
    return LoadedModel(model.eval(), tokenizer, kind, info, conversion)


def stop_token_ids(model) -> tuple[int, ...]:
    """Every id `model` stops generating at (its generation config's eos list, else its config's): where the sampler
    stops, where a chat turn's supervision ends and where the scorers read a response to."""
    return eos_token_ids(getattr(model, "generation_config", None), model.config)


def load_model(
    path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu", canvas_length: int | None = None
):
    """(DiffusionGemmaForBlockDiffusion, tokenizer) from a model dir (a Gemma 4 dir is converted on the fly)."""
    loaded = load_base(path, canvas_length=canvas_length, dtype=dtype, device=device, key="input")
    return loaded.model, loaded.tokenizer


def load_model_skeleton(path: str | Path, key: str = "input"):
    """(DiffusionGemmaForBlockDiffusion on the meta device, tokenizer) from a DiffusionGemma model dir: the dir is
    checked as `load_model` checks it, but no weight is read (a sharded run loads each rank's shards later,
    dg_pipeline.model.sharded_io)."""
    from dg_pipeline.model.sharded_io import meta_model

    info = inspect_checkpoint(path, key=key)
    verify_release_manifest(Path(info.path))
    if not info.is_diffusion_gemma:
        raise InputError(f"{key}={info.path}: sharded training starts from a DiffusionGemma dir, this is a Gemma 4 "
                         f"checkpoint; convert it first (stage=base model.base={info.path})")
    tokenizer = load_tokenizer(info, key=key)
    model = meta_model(DiffusionGemmaConfig.from_pretrained(info.path))
    generation_file = Path(info.path) / "generation_config.json"
    if generation_file.is_file():
        model.generation_config = DiffusionGemmaGenerationConfig.from_pretrained(info.path)
    model.generation_config = sampler_generation_config(tokenizer, base=model.generation_config,
                                                        model_config=model.config)
    return model, tokenizer


def save_model(model, tokenizer, out_dir: str | Path, generation_config=None) -> Path:
    """Write weights (safetensors), config, tokenizer and generation_config.json into `out_dir`, atomically.

    generation_config: None = the model's own, with unset sampler keys filled from the DiffusionGemma defaults.
    config.json's text_config.eos_token_id is written as the generation config's stop ids (e.g. [1, 106]), so both
    files name every id generation stops at.
    """
    model.generation_config = sampler_generation_config(
        tokenizer, base=generation_config or model.generation_config, model_config=model.config
    )
    model.config.get_text_config().eos_token_id = model.generation_config.eos_token_id
    model.config.architectures = [ARCHITECTURE]
    complete_engine_attributes(model.config)  # what serving engines read and transformers does not write
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
    return out_dir
