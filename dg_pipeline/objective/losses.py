"""The training objectives: DiffusionGemma's uniform-state block diffusion, the MDLM/LLaDA masked alternative, and
the encoder-only causal-LM objective of the `pretrain` stage. Each is `loss(model, batch, noise) -> LossOutput`, its randomness keyed per example (`NoiseKey`, corruption.py).

One step, as inference sees it (docs/ARCHITECTURE.md, objective):
  1. the encoder runs once, causally, over the clean sequence (prompt + all response blocks) into a cache that
     keeps every layer's full K/V; its last hidden state also gives the encoder AR loss;
  2. one block per example is picked and noised; the decoder denoises it against that cache through the 4-D
     masks of `masks.py` (clean context strictly before the block; sliding layers only the last W-1 of it);
  3. self-conditioning: pass 1 without gradients and without a signal; for a random half of the examples its
     logits feed pass 2 (`self_conditioning_mask`), the others see a zero signal as at the first inference step.
     Pass 1 runs whenever self-conditioning is on, whatever the coins: every rank of a sharded run then makes the
     same forward calls (the same collectives), and a row with its coin off gets exactly the signal-free forward.

The encoder AR loss is next-token cross-entropy over `objective.ar_loss_scope`: `response` = the response tokens
through EOS (each predicted from the clean prefix before it; prompt tokens and the fill after EOS are not targets),
the same single-turn supervision the diffusion loss uses; `sequence` = every next token of the clean row (prompt,
response and the fill up to the block end), as NeMo AutoModel's DiffusionGemma recipe does. The fill after EOS is
`objective.fill_token` (<pad>, or EOS as NeMo does; `fill_token_id`, applied by the collator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from dg_pipeline.core.errors import InputError
from dg_pipeline.model.logits import softcap_logits
from dg_pipeline.settings.training import AR_LOSS_SCOPES, ObjectiveSettings
from dg_pipeline.objective.corruption import (
    ExampleDraws,
    NoiseKey,
    choose_blocks,
    corrupted_positions,
    corruption_levels,
    draw_example_noise,
    mask_corrupt,
    self_conditioning_rows,
    uniform_corrupt,
)
from dg_pipeline.objective.masks import block_starts, canvas_position_ids, decoder_attention_masks, gather_blocks


@dataclass
class LossOutput:
    """What one objective evaluation produced. Losses are scalars; token counts say what they averaged over."""

    loss: torch.Tensor
    diffusion_loss: torch.Tensor
    ar_loss: torch.Tensor
    diffusion_tokens: int
    ar_tokens: int
    # The denoised block (None for the encoder-only objective): logits (B, C, V), targets/supervised (B, C).
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    supervised: torch.Tensor | None = None


@dataclass
class DenoisingAccuracy:
    """Argmax hits of one denoising step: over the supervised tokens (pad fill included when supervised) and over
    the answer tokens alone (the real response through EOS)."""

    correct: int
    total: int
    answer_correct: int
    answer_total: int


@dataclass
class EncodedSequence:
    """The encoder's pass over the clean sequence: its full-length cache (the decoder's context) and last hidden
    state (for the AR loss)."""

    cache: DynamicCache
    hidden: torch.Tensor


@dataclass
class NoisedBlock:
    """One block per example: where it starts, its clean and noised tokens, and which positions are supervised."""

    starts: torch.Tensor  # (B,)
    clean: torch.Tensor  # (B, C)
    noised: torch.Tensor  # (B, C)
    corrupted: torch.Tensor  # (B, C) bool
    supervised: torch.Tensor  # (B, C) bool
    t: torch.Tensor  # (B,)
    self_conditioned: torch.Tensor | None = None  # (B,) bool: pass-1 logits feed pass 2 for these rows


# ---------------------------------------------------------------------------------------------------- model pieces


def soft_capped_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head + the model's final-logit soft-capping, as DiffusionGemmaForBlockDiffusion.forward applies them."""
    return softcap_logits(model.lm_head(hidden), model.config.text_config.final_logit_softcapping)


def encode_clean_sequence(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncodedSequence:
    """Causal encoder pass over the clean, right-padded sequence.

    The cache is built WITHOUT a config, so every layer (sliding ones included) keeps the full K/V; the decoder
    masks cut it back to what each block may see.
    """
    cache = DynamicCache()
    out = model.model.encoder(input_ids=input_ids, attention_mask=attention_mask.bool(), past_key_values=cache)
    return EncodedSequence(cache=out.past_key_values, hidden=out.last_hidden_state)


def denoise_block(
    model,
    cache: DynamicCache,
    canvas: torch.Tensor,
    starts: torch.Tensor,
    self_conditioning_logits: torch.Tensor | None = None,
    self_conditioning_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoder forward over a (B, C) canvas whose rows begin at `starts`; returns soft-capped logits."""
    text_config = model.config.text_config
    canvas_length = canvas.shape[1]
    decoder = model.model.decoder
    masks = decoder_attention_masks(
        text_config, starts, cache.get_seq_length(), canvas_length, dtype=decoder.embed_tokens.weight.dtype
    )
    out = decoder(
        decoder_input_ids=canvas,
        past_key_values=cache,
        decoder_attention_mask=masks,
        decoder_position_ids=canvas_position_ids(starts, canvas_length),
        self_conditioning_logits=self_conditioning_logits,
        self_conditioning_mask=self_conditioning_mask,
    )
    return soft_capped_logits(model, out.last_hidden_state)


def self_conditioned_denoise(
    model, cache: DynamicCache, canvas: torch.Tensor, starts: torch.Tensor, use_self_conditioning: torch.Tensor
) -> torch.Tensor:
    """Pass 1 (no gradients, no signal) then pass 2 fed pass 1's logits where `use_self_conditioning` is True.

    Pass 1 runs even when no row uses it (pass 2 is then exactly the signal-free forward): the forward calls, and
    so the collectives of a sharded run, must not depend on a rank's coins.
    """
    with torch.no_grad():
        first_logits = denoise_block(model, cache, canvas, starts)
    return denoise_block(model, cache, canvas, starts, first_logits, use_self_conditioning)


# ---------------------------------------------------------------------------------------------------- supervision


def supervised_block_positions(
    starts: torch.Tensor,
    prompt_lengths: torch.Tensor,
    response_lengths: torch.Tensor,
    canvas_length: int,
    supervise_padding: bool,
) -> torch.Tensor:
    """(B, C) bool: the block's real response tokens (through EOS), plus its pad fill when `supervise_padding`."""
    offset_in_response = canvas_position_ids(starts, canvas_length) - prompt_lengths[:, None]
    real = offset_in_response < response_lengths[:, None]
    return torch.ones_like(real) if supervise_padding else real


def fill_token_id(objective: ObjectiveSettings, tokenizer) -> int:
    """The token that fills the last block after EOS (objective.fill_token: pad | eos)."""
    name = objective.fill_token
    token_id = tokenizer.pad_token_id if name == "pad" else tokenizer.eos_token_id
    if token_id is None:
        raise InputError(f"objective.fill_token={name}: the tokenizer has no {name} token")
    return int(token_id)


def ar_prediction_positions(batch: dict, scope: str = "response") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool of the positions that carry an AR-loss target under `scope`, and the targets (B, L)."""
    if _checked_scope(scope) == "response":
        return response_prediction_positions(batch)
    input_ids = batch["input_ids"]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    row_lengths = batch["attention_mask"].sum(dim=1, keepdim=True)  # prompt + whole response blocks
    return positions < row_lengths - 1, torch.roll(input_ids, shifts=-1, dims=1)


def response_prediction_positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool of the positions whose next token is a response token (through EOS), and those targets (B, L)."""
    input_ids = batch["input_ids"]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    first = batch["prompt_lengths"][:, None] - 1
    last = batch["prompt_lengths"][:, None] + batch["response_lengths"][:, None] - 1
    predicts = (positions >= first) & (positions < last)
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    return predicts, targets


def encoder_ar_loss(model, hidden: torch.Tensor, batch: dict, scope: str = "response") -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy of the encoder over `scope` (response: the response tokens through EOS;
    sequence: the whole clean row)."""
    predicts, targets = ar_prediction_positions(batch, scope)
    # lm_head only where a target exists: the full (B, L, V) logits would dominate memory for large vocabularies.
    logits = soft_capped_logits(model, hidden[predicts])
    return F.cross_entropy(logits, targets[predicts]), int(predicts.sum())


def _checked_scope(scope: str) -> str:
    if scope not in AR_LOSS_SCOPES:
        raise InputError(f"objective.ar_loss_scope={scope}: choose one of {', '.join(AR_LOSS_SCOPES)}")
    return scope


# ---------------------------------------------------------------------------------------------------- objectives


class EncoderARObjective:
    """`pretrain`: the shared weights trained as a causal LM only (the encoder AR loss, no decoder pass)."""

    name = "ar"
    has_diffusion = False

    def __init__(self, ar_loss_scope: str = "response"):
        self.ar_loss_scope = _checked_scope(ar_loss_scope)

    def loss(self, model, batch: dict, noise: NoiseKey | None = None) -> LossOutput:
        encoded = encode_clean_sequence(model, batch["input_ids"], batch["attention_mask"])
        ar_loss, ar_tokens = encoder_ar_loss(model, encoded.hidden, batch, self.ar_loss_scope)
        zero = ar_loss.new_zeros(())
        return LossOutput(loss=ar_loss, diffusion_loss=zero, ar_loss=ar_loss, diffusion_tokens=0, ar_tokens=ar_tokens)


class BlockDiffusionObjective:
    """Shared structure of the block-diffusion objectives; subclasses define the noise and the block loss."""

    name = "block_diffusion"
    has_diffusion = True

    def __init__(
        self,
        t_eps: float = 1e-3,
        ar_loss_weight: float = 1.0,
        self_conditioning_prob: float = 0.5,
        supervise_padding: bool = True,
        ar_loss_scope: str = "response",
    ):
        if not 0.0 <= t_eps < 1.0:
            raise InputError(f"objective.t_eps={t_eps}: must be in [0, 1)")
        if not 0.0 <= self_conditioning_prob <= 1.0:
            raise InputError(f"objective.self_conditioning_prob={self_conditioning_prob}: must be in [0, 1]")
        self.t_eps = t_eps
        self.ar_loss_weight = ar_loss_weight
        self.self_conditioning_prob = self_conditioning_prob
        self.supervise_padding = supervise_padding
        self.ar_loss_scope = _checked_scope(ar_loss_scope)

    # -- what a subclass defines
    def corrupt(self, clean: torch.Tensor, corrupted: torch.Tensor, draws: ExampleDraws) -> torch.Tensor:
        raise NotImplementedError

    def block_loss(self, logits: torch.Tensor, block: NoisedBlock) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    # -- the shared step
    def noised_block(self, model, batch: dict, noise: NoiseKey, t: float | None = None) -> NoisedBlock:
        """Pick one block per example and noise it, at level `t` for every row or t ~ U(t_eps, 1) per row; every
        choice from the example's own draws (`noise`)."""
        canvas_length = model.config.canvas_length
        input_ids = batch["input_ids"]
        draws = draw_example_noise(noise, batch, canvas_length, model.config.text_config.vocab_size,
                                   input_ids.device)
        starts = block_starts(batch["prompt_lengths"], choose_blocks(batch["num_blocks"], draws.block), canvas_length)
        clean = gather_blocks(input_ids, starts, canvas_length)
        if t is None:
            levels = corruption_levels(draws.level, self.t_eps)
        else:
            levels = torch.full((input_ids.shape[0],), float(t), device=input_ids.device)
        corrupted = corrupted_positions(draws.positions, levels)
        supervised = supervised_block_positions(
            starts, batch["prompt_lengths"], batch["response_lengths"], canvas_length, self.supervise_padding
        )
        return NoisedBlock(starts, clean, self.corrupt(clean, corrupted, draws), corrupted, supervised, levels,
                           self_conditioning_rows(draws.self_conditioning, self.self_conditioning_prob))

    def loss(self, model, batch: dict, noise: NoiseKey) -> LossOutput:
        encoded = encode_clean_sequence(model, batch["input_ids"], batch["attention_mask"])
        ar_loss, ar_tokens = encoder_ar_loss(model, encoded.hidden, batch, self.ar_loss_scope)
        block = self.noised_block(model, batch, noise)
        if self.self_conditioning_prob > 0:
            logits = self_conditioned_denoise(model, encoded.cache, block.noised, block.starts, block.self_conditioned)
        else:
            logits = denoise_block(model, encoded.cache, block.noised, block.starts)
        diffusion_loss, diffusion_tokens = self.block_loss(logits, block)
        return LossOutput(
            loss=diffusion_loss + self.ar_loss_weight * ar_loss,
            diffusion_loss=diffusion_loss,
            ar_loss=ar_loss,
            diffusion_tokens=diffusion_tokens,
            ar_tokens=ar_tokens,
            logits=logits,
            targets=block.clean,
            supervised=block.supervised,
        )

    @torch.no_grad()
    def denoising_accuracy(self, model, batch: dict, t: float, noise: NoiseKey) -> "DenoisingAccuracy":
        """Single denoising step from level `t` (no self-conditioning, as inference's first step): argmax hits
        over the supervised tokens of one random block per example, and over its answer tokens alone."""
        encoded = encode_clean_sequence(model, batch["input_ids"], batch["attention_mask"])
        block = self.noised_block(model, batch, noise, t=t)
        logits = denoise_block(model, encoded.cache, block.noised, block.starts)
        hits = logits.argmax(-1) == block.clean
        answer = supervised_block_positions(
            block.starts, batch["prompt_lengths"], batch["response_lengths"], block.clean.shape[1], False
        )
        return DenoisingAccuracy(
            correct=int((hits & block.supervised).sum()),
            total=int(block.supervised.sum()),
            answer_correct=int((hits & answer).sum()),
            answer_total=int(answer.sum()),
        )


class UniformObjective(BlockDiffusionObjective):
    """DiffusionGemma SFT: uniform-state noise; flat CE over every supervised token of the block (corrupted and
    clean alike), no 1/t weighting."""

    name = "uniform"

    def corrupt(self, clean, corrupted, draws):
        return uniform_corrupt(clean, corrupted, draws.tokens)

    def block_loss(self, logits, block):
        supervised = block.supervised
        return F.cross_entropy(logits[supervised], block.clean[supervised]), int(supervised.sum())


class MaskedObjective(BlockDiffusionObjective):
    """MDLM/LLaDA: [MASK] noise; CE on masked supervised tokens weighted by 1/t (the ELBO), each example
    normalised by its answer length (its supervised tokens in the block), averaged over the batch."""

    name = "masked"

    def __init__(self, mask_token_id: int, **kwargs):
        super().__init__(**kwargs)
        self.mask_token_id = mask_token_id

    def corrupt(self, clean, corrupted, draws):
        return mask_corrupt(clean, corrupted, self.mask_token_id)

    def block_loss(self, logits, block):
        token_ce = F.cross_entropy(logits.transpose(1, 2), block.clean, reduction="none")  # (B, C)
        counted = block.corrupted & block.supervised
        per_example = (token_ce * counted).sum(1) / block.t / block.supervised.sum(1).clamp(min=1)
        return per_example.mean(), int(counted.sum())


def build_objective(objective_cfg: ObjectiveSettings, tokenizer=None, ar_only: bool = False):
    """The objective named by `objective.name` (uniform | masked), or the encoder-only one for `pretrain`."""
    scope = objective_cfg.ar_loss_scope
    if ar_only:
        return EncoderARObjective(ar_loss_scope=scope)
    kwargs = dict(
        t_eps=float(objective_cfg.t_eps),
        ar_loss_weight=float(objective_cfg.ar_loss_weight),
        self_conditioning_prob=float(objective_cfg.self_conditioning_prob),
        supervise_padding=bool(objective_cfg.supervise_padding),
        ar_loss_scope=scope,
    )
    name = str(objective_cfg.name)
    if name == "uniform":
        return UniformObjective(**kwargs)
    if name == "masked":
        mask_id = getattr(tokenizer, "mask_token_id", None)
        if mask_id is None:
            raise InputError("objective=masked needs a tokenizer with a mask token (tokenizer.mask_token is unset)")
        return MaskedObjective(mask_token_id=int(mask_id), **kwargs)
    raise InputError(f"objective.name={name}: unknown objective; choose uniform or masked")
