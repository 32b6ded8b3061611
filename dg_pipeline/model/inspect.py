"""What a model directory holds, decided from its files before any weights are read.

`inspect_checkpoint(dir)` returns the kind (`diffusion_gemma`, `gemma4_text`, `gemma4`) or raises ONE InputError
that names the directory/file and what was expected there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.io import read_json

DIFFUSION_GEMMA = "diffusion_gemma"
GEMMA4_TEXT = "gemma4_text"  # Gemma4ForCausalLM
GEMMA4 = "gemma4"  # Gemma4ForConditionalGeneration (text + optional vision/audio towers)
SUPPORTED_MODEL_TYPES = (DIFFUSION_GEMMA, GEMMA4_TEXT, GEMMA4)

# Any one of these marks a directory as holding weights (single file or sharded).
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
# Any one of these marks a directory as holding a tokenizer (fast JSON or SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

EXPECTED = (
    "a Hugging Face model dir (config.json + model.safetensors + tokenizer) of a DiffusionGemma checkpoint "
    "(model_type diffusion_gemma) or a Gemma 4 causal LM (model_type gemma4_text or gemma4)"
)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    model_type: str
    architectures: tuple[str, ...]
    config: dict

    @property
    def is_diffusion_gemma(self) -> bool:
        return self.model_type == DIFFUSION_GEMMA

    @property
    def is_gemma4(self) -> bool:
        return self.model_type in (GEMMA4_TEXT, GEMMA4)

    @property
    def has_vision(self) -> bool:
        return self.config.get("vision_config") is not None


def inspect_checkpoint(path: str | Path, key: str = "model.base") -> CheckpointInfo:
    """Classify `path`; `key` is the config key that named it, quoted in every error."""
    raw = str(path)
    path = Path(raw).expanduser().resolve()
    if not path.exists():
        raise InputError(f"{key}={raw}: directory not found; expected {EXPECTED}")
    if not path.is_dir():
        raise InputError(f"{key}={raw}: {path} is a file, not a directory; expected {EXPECTED}")
    config_file = path / "config.json"
    if not config_file.exists():
        raise InputError(f"{key}={raw}: {config_file} is missing; expected {EXPECTED}")
    try:
        config = read_json(config_file)
    except InputError as e:
        raise InputError(f"{key}={raw}: {e}; expected {EXPECTED}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"{key}={raw}: {config_file} has model_type={model_type!r}; expected one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} ({EXPECTED})"
        )
    if not any((path / name).exists() for name in WEIGHT_FILES):
        raise InputError(
            f"{key}={raw}: no weights in {path} (looked for {', '.join(WEIGHT_FILES)}); save the model with "
            f"save_pretrained() into this directory"
        )
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise InputError(
            f"{key}={raw}: no tokenizer in {path} (looked for {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            f"next to the weights with tokenizer.save_pretrained({str(path)!r})"
        )
    return CheckpointInfo(path, model_type, tuple(config.get("architectures") or ()), config)


def damaged_weights_file(model_dir: Path) -> tuple[Path, str] | None:
    """The first *.safetensors file of `model_dir` whose header or data does not read back, with the reason."""
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)
        except SafetensorError as e:
            return path, str(e)
    return None


def from_pretrained_complete(model_class, info: CheckpointInfo, dtype, key: str, what: str):
    """`model_class.from_pretrained(info.path)`, refusing a checkpoint that lacks tensors (transformers would
    initialise them randomly and carry on)."""
    try:
        model, loading = model_class.from_pretrained(info.path, dtype=dtype, output_loading_info=True)
    except SafetensorError as e:
        damaged, why = damaged_weights_file(Path(info.path)) or (Path(info.path), str(e))
        raise InputError(f"{key}={info.path}: {damaged} is damaged ({why}): the file is truncated or was modified; "
                         f"restore it, or rerun the stage that wrote it") from None
    if loading["missing_keys"]:
        missing = sorted(loading["missing_keys"])
        raise InputError(
            f"{key}={info.path}: the weights lack {len(missing)} {what} tensors "
            f"(e.g. {', '.join(missing[:3])}); the checkpoint is incomplete or from another model"
        )
    return model
