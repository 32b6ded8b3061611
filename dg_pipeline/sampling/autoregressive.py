"""Autoregressive decoding on the same weights: the DiffusionGemma encoder is a causal LM.

Next-token logits are lm_head + the final-logit soft-cap on the encoder's last hidden state (the head the encoder AR
loss trains); decoding keeps the encoder's KV cache, one forward per token. Positions and masks follow the block
sampler's conventions (slot positions, left padding masked), so both decoders see a prompt the same way.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from dg_pipeline.core.errors import InputError
from dg_pipeline.sampling.config import SamplerConfig
from dg_pipeline.model.logits import encoder_causal_lm_logits
from dg_pipeline.sampling.inputs import checked_max_new_tokens, checked_prompt, generator_for
from dg_pipeline.sampling.sampler import GenerationResult


def next_token_logits(model, cache: DynamicCache, tokens: torch.Tensor, attention_mask: torch.Tensor,
                      start: int) -> torch.Tensor:
    """Run the encoder over `tokens` (slots start.. of the sequence; `attention_mask` covers every slot so far),
    keeping their keys/values in `cache`, and return the float32 logits of the next token, (B, V)."""
    positions = torch.arange(start, start + tokens.shape[1], dtype=torch.int32, device=tokens.device).unsqueeze(0)
    logits = encoder_causal_lm_logits(
        model, tokens, attention_mask.long(), past_key_values=cache, position_ids=positions
    )
    return logits[:, -1]


@torch.inference_mode()
def ar_generate(
    model,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | torch.Generator | None = None,
    eos_token_ids: tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
) -> GenerationResult:
    """Greedy (or sampled) decoding with the encoder, stopping each row at EOS.

    eos/pad ids default to the model's (generation config, then model config). decoder_forwards counts the AR
    forwards each row needed (one per generated token, EOS included).
    """
    start_time = time.perf_counter()
    device = next(model.parameters()).device
    vocab_size = model.config.get_text_config().vocab_size
    prompt_ids, attention_mask = checked_prompt(prompt_ids, attention_mask, vocab_size, device)
    max_new_tokens = checked_max_new_tokens(max_new_tokens)
    if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise InputError(f"temperature={temperature!r}: sampling needs a temperature > 0")
    generator = generator_for(seed, device)
    defaults = SamplerConfig.for_model(model)
    eos = defaults.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
    pad_id = defaults.pad_token_id if pad_token_id is None else pad_token_id
    eos_ids = torch.tensor(eos, device=device) if eos else None

    batch, length = prompt_ids.shape
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    forwards = torch.zeros(batch, dtype=torch.long, device=device)
    generated: list[torch.Tensor] = []
    tokens, start = prompt_ids, 0
    for _ in range(max_new_tokens):
        logits = next_token_logits(model, cache, tokens, attention_mask, start)
        if do_sample:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_token = logits.argmax(dim=-1)
        forwards += ~ended
        if pad_id is not None:
            next_token = next_token.masked_fill(ended, pad_id)
        generated.append(next_token)
        if eos_ids is not None:
            ended |= torch.isin(next_token, eos_ids)
        if bool(ended.all()):
            break
        start += tokens.shape[1]
        tokens = next_token[:, None]
        attention_mask = F.pad(attention_mask, (0, 1), value=True)

    sequences = torch.stack(generated, dim=1)
    committed = (sequences != pad_id).sum(-1) if pad_id is not None else torch.full_like(forwards, sequences.shape[1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return GenerationResult(
        sequences=sequences.cpu(),
        decoder_forwards=forwards.cpu(),
        committed_tokens=committed.cpu(),
        steps_per_block=[],
        wall_time_s=time.perf_counter() - start_time,
    )
