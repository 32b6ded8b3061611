"""Gemma 4 causal LM -> DiffusionGemma block-diffusion model.

A DiffusionGemma is one Gemma 4 MoE text backbone used twice: as a causal *encoder* (prompt prefill, block commit,
AR decoding) and as a bidirectional *decoder* over the canvas; the two share every text weight. Converting therefore
means: check that the Gemma 4 variant has the math the DiffusionGemma backbone runs (refuse it otherwise, naming the
feature), copy the text weights once into the shared backbone, carry the vision tower over, and add what Gemma 4 lacks
(the self-conditioning block, the canvas length) and keep the source's stop list (`source_eos_ids`). Parity: the
converted encoder, read as a causal LM, reproduces the Gemma 4 layer by layer with the same expert choices
(`conversion_parity`, dg_pipeline.model.parity: a whole-forward max |Δ logit| does not hold at the released depth).

Known difference outside text parity: with use_bidirectional_attention="vision", Gemma 4 lets image tokens attend
to each other bidirectionally when given mm_token_type_ids; the transformers 5.14 DiffusionGemma encoder builds that
mask but does not use it, so image tokens attend causally there. Text-only prompts are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaTextConfig,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
)

from dg_pipeline.core.errors import InputError
from dg_pipeline.model.configs import TINY_VISION
from dg_pipeline.model.inspect import GEMMA4_TEXT, CheckpointInfo, from_pretrained_complete
from dg_pipeline.model.logits import encoder_causal_lm_logits
from dg_pipeline.model.parity import Parity, logits_parity
from dg_pipeline.model.structure import untied_backbone_weights
from dg_pipeline.model.vllm_contract import ARCHITECTURE, complete_engine_attributes


# --- which Gemma 4 variants convert -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureRule:
    """A Gemma 4 setting the DiffusionGemma backbone cannot reproduce; `applies(text_cfg, cfg)` is True when present."""

    key: str
    feature: str
    why: str
    applies: Callable


def _kv_shared(t) -> bool:
    return (t.num_kv_shared_layers or 0) > 0


# Text-config settings that change the math (every key Gemma4TextConfig has and DiffusionGemmaTextConfig lacks is
# either here or in HARMLESS_TEXT_KEYS; a test keeps the two lists complete against the installed transformers).
TEXT_RULES: tuple[FeatureRule, ...] = (
    FeatureRule(
        "hidden_size_per_layer_input", "per-layer input embeddings (PLE)",
        "DiffusionGemma layers have no per-layer-input path; a PLE model (e.g. gemma-4-E2B/E4B) cannot be converted",
        lambda t, c: bool(t.hidden_size_per_layer_input),
    ),
    FeatureRule(
        "num_kv_shared_layers", "KV-shared layers",
        "DiffusionGemma attention computes its own keys/values in every layer",
        lambda t, c: _kv_shared(t),
    ),
    FeatureRule(
        "use_double_wide_mlp", "double-wide MLP",
        "KV-shared layers of this model have a 2x intermediate MLP that DiffusionGemma layers do not have",
        lambda t, c: bool(t.use_double_wide_mlp) and _kv_shared(t),
    ),
    FeatureRule(
        "enable_moe_block", "no MoE block",
        "DiffusionGemma layers always run the dense MLP + routed-experts path; a dense Gemma 4 has no experts to load",
        lambda t, c: not t.enable_moe_block,
    ),
    FeatureRule(
        "attention_k_eq_v", "separate value projection in full-attention layers",
        "DiffusionGemma full-attention layers reuse the keys as values (attention_k_eq_v=true, with "
        "num_global_key_value_heads); this model has a v_proj there",
        lambda t, c: not t.attention_k_eq_v,
    ),
    FeatureRule(
        "final_logit_softcapping", "no final-logit soft-capping",
        "DiffusionGemma always soft-caps its logits (cap * tanh(logits / cap)); this model does not",
        lambda t, c: t.final_logit_softcapping is None,
    ),
    FeatureRule(
        "tie_word_embeddings", "untied lm_head",
        "DiffusionGemma ties lm_head to the embeddings (and encoder to decoder through the same flag)",
        lambda t, c: not t.tie_word_embeddings or not getattr(c, "tie_word_embeddings", True),
    ),
    FeatureRule(
        "use_bidirectional_attention", "bidirectional text attention",
        "use_bidirectional_attention='all' is not a causal LM; the DiffusionGemma encoder must be causal",
        lambda t, c: t.use_bidirectional_attention == "all",
    ),
)
TOP_RULES: tuple[FeatureRule, ...] = (
    FeatureRule(
        "audio_config", "audio tower",
        "DiffusionGemma has a vision tower only; remove audio_config (and the audio weights) to convert",
        lambda t, c: getattr(c, "audio_config", None) is not None,
    ),
)
# Gemma 4-only keys that do not change the text math.
HARMLESS_TEXT_KEYS = {
    "use_cache": "generation default only",
    "vocab_size_per_layer_input": "sizes the PLE table, which is refused on its own",
}
HARMLESS_TOP_KEYS = {
    # Gemma 4 maps these placeholder ids to <pad> before embedding; DiffusionGemma embeds them as ordinary tokens.
    # They only appear in video/audio prompts, which DiffusionGemma does not take.
    "video_token_id": "video placeholder id",
    "audio_token_id": "audio placeholder id",
    "boa_token_id": "begin-of-audio id",
    "eoa_token_index": "end-of-audio id",
}


def unsupported_features(config) -> list[str]:
    """One line per Gemma 4 feature the DiffusionGemma backbone lacks, naming the config key and its value."""
    text = config.get_text_config()
    found = []
    for rule in TEXT_RULES:
        if rule.applies(text, config):
            found.append(f"{rule.feature} ({rule.key}={getattr(text, rule.key)!r}): {rule.why}")
    for rule in TOP_RULES:
        if rule.applies(text, config):
            found.append(f"{rule.feature} ({rule.key} is set): {rule.why}")
    return found


def check_convertible(config, source: str) -> None:
    """Raise one InputError listing every unsupported feature of this Gemma 4 config."""
    found = unsupported_features(config)
    if found:
        lines = "\n  - ".join(found)
        raise InputError(
            f"{source}: this Gemma 4 variant cannot be converted to DiffusionGemma:\n  - {lines}\n"
            f"Convert a Gemma 4 MoE causal LM without these features (e.g. the 26B-A4B family)."
        )


# --- config and weights ------------------------------------------------------------------------------------------

# DiffusionGemmaTextConfig's own keys (its base-class keys are bookkeeping) plus the soft-cap, a plain class
# attribute there that a config value overrides.
_TEXT_KEYS = tuple(DiffusionGemmaTextConfig.__annotations__) + ("final_logit_softcapping",)


def source_eos_ids(config, generation_config=None) -> int | list[int] | None:
    """The ids a Gemma 4 checkpoint stops at: its generation_config.json's eos_token_id (what generate() and vLLM
    stop at, e.g. [1, 106] = <eos>, <turn|>), else its config's (top level, then text config)."""
    for source in (generation_config, config, config.get_text_config()):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return eos
    return None


def diffusion_config_from_gemma4(config, canvas_length: int, eos_token_id=None) -> DiffusionGemmaConfig:
    """The DiffusionGemmaConfig with this Gemma 4's text (and vision) shapes and the requested canvas length.

    A text-only Gemma 4 gets the tiny vision tower of dg_pipeline.model.configs (the DiffusionGemma class cannot be
    built without one); it is never fed images, and its image token id is put outside the vocabulary so that no text
    token is ever taken for an image placeholder.
    """
    text = config.get_text_config()
    text_dict = {k: v for k, v in text.to_dict().items() if k in _TEXT_KEYS}
    text_dict["eos_token_id"] = eos_token_id if eos_token_id is not None else source_eos_ids(config)
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        vision_dict = vision.to_dict()
        image_ids = dict(boi_token_id=config.boi_token_id, eoi_token_id=config.eoi_token_id,
                         image_token_id=config.image_token_id)
    else:
        vision_dict = dict(TINY_VISION)
        image_ids = dict(boi_token_id=text.pad_token_id, eoi_token_id=text.pad_token_id,
                         image_token_id=text.vocab_size + 1)
    dg_config = DiffusionGemmaConfig(
        text_config=text_dict,
        vision_config=vision_dict,
        canvas_length=canvas_length,
        initializer_range=text.initializer_range,
        tie_word_embeddings=True,
        **image_ids,
    )
    dg_config.architectures = [ARCHITECTURE]
    complete_engine_attributes(dg_config)  # only what the source lacks: a Gemma 4's own vision values are kept
    return dg_config


def load_gemma4(info: CheckpointInfo, dtype: torch.dtype, device: str = "cpu", key: str = "model.base"):
    """The Gemma 4 model of a checkpoint dir (Gemma4ForCausalLM or Gemma4ForConditionalGeneration), in eval mode.

    Refuses unsupported variants from config.json alone, before any weights are read.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(info.path)
    check_convertible(config, f"{key}={info.path}")
    model_class = Gemma4ForCausalLM if info.model_type == GEMMA4_TEXT else Gemma4ForConditionalGeneration
    model = from_pretrained_complete(model_class, info, dtype, key, model_class.__name__)
    return model.to(device).eval()


def _gemma4_parts(source):
    """(text model, vision tower or None, vision embedder or None) of either Gemma 4 class."""
    if isinstance(source, Gemma4ForConditionalGeneration):
        return source.model.language_model, source.model.vision_tower, source.model.embed_vision
    return source.model, None, None


def make_self_conditioning_noop(model: DiffusionGemmaForBlockDiffusion) -> None:
    """Zero the self-conditioning down_proj, so the previous step's logits add nothing to the decoder input.

    What still differs from a plain Gemma 4 forward: the block's post_norm (an RMSNorm without scale) still
    RMS-normalises the decoder's input embeddings (embeddings + 0), so the *decoder* does not reproduce Gemma 4 even
    on a clean canvas; only the encoder does. Fine-tuning learns the self-conditioning projection from here.
    """
    with torch.no_grad():
        model.model.decoder.self_conditioning.down_proj.weight.zero_()


@torch.no_grad()
def convert_gemma4(source, canvas_length: int, seed: int = 0) -> DiffusionGemmaForBlockDiffusion:
    """A DiffusionGemmaForBlockDiffusion holding `source`'s weights (same dtype/device), in eval mode.

    Text weights are loaded once into the encoder's backbone, which IS the decoder's (tied tensors), then the
    layer_scalar buffers (copied, not tied) are mirrored into the decoder. New weights (self-conditioning, a vision
    placeholder for text-only sources) are initialised from `seed`.
    """
    eos = source_eos_ids(source.config, getattr(source, "generation_config", None))
    config = diffusion_config_from_gemma4(source.config, canvas_length, eos_token_id=eos)
    dtype = next(source.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype)
    model.to(next(source.parameters()).device)
    model.generation_config.eos_token_id = eos  # the source's stop list, not the tokenizer's single eos_token

    text, vision_tower, embed_vision = _gemma4_parts(source)
    encoder = model.model.encoder
    encoder.language_model.load_state_dict(text.state_dict(), strict=True)
    for enc_layer, dec_layer in zip(encoder.language_model.layers, model.model.decoder.layers):
        dec_layer.layer_scalar.copy_(enc_layer.layer_scalar)
    if vision_tower is not None:
        encoder.vision_tower.load_state_dict(vision_tower.state_dict(), strict=True)
        encoder.embed_vision.load_state_dict(embed_vision.state_dict(), strict=True)
    make_self_conditioning_noop(model)

    untied = untied_backbone_weights(model)
    if untied:  # a transformers change in how ties are made would land here, not in silent divergence
        raise RuntimeError(f"conversion left encoder/decoder weights untied: {untied[:5]}")
    return model.eval()


# --- parity --------------------------------------------------------------------------------------------------------

# Largest max |Δ logit| accepted per dtype (of the teacher-forced, routing-pinned logits, dg_pipeline.model.parity). Both models run the same kernels on the same weights, so fp32 agrees to
# rounding; in 16-bit, Gemma 4 soft-caps its logits in the working dtype while DiffusionGemma soft-caps in float32,
# so they may differ by one ulp of the dtype at the cap's magnitude (|logit| <= 30: bf16 0.125, fp16 0.0156).
PARITY_THRESHOLDS = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 0.125}


def parity_probe(config, length: int = 64, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """(batch, length) random token ids for parity checks, without multimodal placeholder ids."""
    text = config.get_text_config()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, text.vocab_size, (batch, length), generator=generator)
    placeholders = [getattr(config, k, None) for k in ("image_token_id", "video_token_id", "audio_token_id")]
    placeholders = torch.tensor([p for p in placeholders if p is not None and p < text.vocab_size], dtype=ids.dtype)
    return torch.where(torch.isin(ids, placeholders), text.bos_token_id, ids)


def vision_probe(vision_config, side_in_kernels: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One random image as the Gemma 4 image processor lays it out: (pixel_values (1, N, 3*p*p), positions (1, N, 2)),
    a square grid of `side_in_kernels` pooling kernels per side (so side_in_kernels**2 soft tokens)."""
    side = side_in_kernels * vision_config.pooling_kernel_size
    patch_dim = 3 * vision_config.patch_size**2
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(1, side * side, patch_dim, generator=generator)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1)[None]
    return pixels, positions


@torch.no_grad()
def conversion_parity(model, source, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Parity:
    """The converted encoder read as a causal LM vs the Gemma 4 model on `input_ids`: per layer with the Gemma 4's
    expert choices, and whole-forward (dg_pipeline.model.parity)."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    return logits_parity(
        source, _gemma4_parts(source)[0].layers,
        lambda: source(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits,
        model, model.model.encoder.language_model.layers,
        lambda: encoder_causal_lm_logits(model, input_ids, attention_mask),
    )


@torch.no_grad()
def vision_parity(model, source, pixel_values: torch.Tensor, image_position_ids: torch.Tensor) -> float:
    """max |Δ| between the converted and the Gemma 4 image soft tokens (vision tower + embed_vision)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pixel_values, image_position_ids = pixel_values.to(device, dtype), image_position_ids.to(device)
    expected = source.model.get_image_features(pixel_values, image_position_ids).pooler_output
    got = model.model.encoder.get_image_features(pixel_values, image_position_ids).pooler_output
    return (expected.float() - got.float()).abs().max().item()


@torch.no_grad()
def self_conditioning_effect(model, input_ids: torch.Tensor, seed: int = 0) -> float:
    """max |Δ logit| of the decoder with vs without random self-conditioning logits (0.0 = the block is a no-op)."""
    device = next(model.parameters()).device
    vocab = model.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    canvas = torch.randint(0, vocab, (input_ids.shape[0], model.config.canvas_length), generator=generator)
    previous_logits = torch.randn(*canvas.shape, vocab, generator=generator)
    inputs = dict(input_ids=input_ids.to(device), decoder_input_ids=canvas.to(device))
    plain = model(**inputs).logits
    conditioned = model(**inputs, self_conditioning_logits=previous_logits.to(device)).logits
    return (plain - conditioned).abs().max().item()


# --- one call: checkpoint dir -> converted model + report ---------------------------------------------------------


@dataclass
class ConversionReport:
    source_architecture: str
    source_params: int
    has_vision: bool
    # Filled when parity was checked (conversion_parity / vision_parity / self_conditioning_effect).
    parity_max_abs_logit_diff: float | None = None  # whole forward, free routing (informative at depth)
    parity: dict | None = None  # Parity.as_record(): the teacher-forced figures the base gate checks
    vision_max_abs_diff: float | None = None
    self_conditioning_max_abs_diff: float | None = None
    probe: dict = field(default_factory=dict)


def convert_checkpoint(
    info: CheckpointInfo,
    canvas_length: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    check_parity: bool = True,
    probe_tokens: int = 64,
    seed: int = 0,
    key: str = "model.base",
) -> tuple[DiffusionGemmaForBlockDiffusion, ConversionReport]:
    """Load a Gemma 4 dir, convert it, and (optionally) measure parity before the source model is dropped."""
    source = load_gemma4(info, dtype, device, key=key)
    model = convert_gemma4(source, canvas_length, seed=seed)
    has_vision = _gemma4_parts(source)[1] is not None
    report = ConversionReport(
        source_architecture=type(source).__name__,
        source_params=sum(p.numel() for p in source.parameters()),
        has_vision=has_vision,
    )
    if check_parity:
        probe_ids = parity_probe(source.config, length=probe_tokens, seed=seed)
        report.probe = {"batch": probe_ids.shape[0], "tokens": probe_ids.shape[1], "seed": seed}
        parity = conversion_parity(model, source, probe_ids)
        report.parity = parity.as_record()
        report.parity_max_abs_logit_diff = parity.free_max_abs_logit_diff
        if has_vision:
            report.vision_max_abs_diff = vision_parity(model, source, *vision_probe(source.config.vision_config))
        report.self_conditioning_max_abs_diff = self_conditioning_effect(model, probe_ids[:, :16], seed=seed)
    del source
    return model, report


__all__ = [
    "PARITY_THRESHOLDS",
    "TEXT_RULES",
    "TOP_RULES",
    "HARMLESS_TEXT_KEYS",
    "HARMLESS_TOP_KEYS",
    "ConversionReport",
    "unsupported_features",
    "check_convertible",
    "diffusion_config_from_gemma4",
    "source_eos_ids",
    "load_gemma4",
    "convert_gemma4",
    "make_self_conditioning_noop",
    "parity_probe",
    "vision_probe",
    "conversion_parity",
    "vision_parity",
    "self_conditioning_effect",
    "convert_checkpoint",
]
