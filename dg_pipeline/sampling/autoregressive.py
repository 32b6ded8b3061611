"""Autoregressive decoding on the same weights: the DiffusionGemma encoder is a causal LM.

Next-token logits are lm_head + the final-logit soft-cap on the encoder's last hidden state (the head the encoder AR
loss trains); decoding keeps the encoder's KV cache, one forward per token. Positions and masks follow the block
sampler's conventions (slot positions, left padding masked), so both decoders see a prompt the same way.

The baseline gets the care the block sampler gets, so a speedup over it is honest: `CausalStep` runs the encoder's own
layers in the order `DiffusionGemmaEncoderTextModel.forward` does (the same arithmetic, the same tokens), with the
rotary tables built once per call, attention masks built only when padding needs them (a single unpadded query
attends to every cached key), lm_head on the last position only, and no output-capturing wrappers.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from dg_pipeline.core.errors import InputError
from dg_pipeline.model.logits import softcap_logits
from dg_pipeline.sampling.config import SamplerConfig
from dg_pipeline.sampling.inputs import checked_max_new_tokens, checked_prompt, generator_for
from dg_pipeline.sampling.sampler import GenerationResult


class CausalStep:
    """One AR forward of the encoder over new tokens, keeping their keys/values in `cache`."""

    def __init__(self, model, cache: DynamicCache, total_length: int, padded: bool, device: torch.device):
        """`padded`: the prompt batch has padding (then every forward needs masks; without it only the prefill)."""
        self.model = model
        self.padded = padded
        self.encoder = model.model.encoder.language_model  # the text model under the multimodal encoder
        self.image_token_id = model.config.image_token_id
        self.cache = cache
        text_config = model.config.get_text_config()
        self.text_config = text_config
        self.softcap = text_config.final_logit_softcapping
        self.layer_types = list(text_config.layer_types[: text_config.num_hidden_layers])
        # cos/sin of every slot this call can reach, once (the encoder computes the new slots' tables every forward).
        positions = torch.arange(total_length, dtype=torch.int32, device=device).unsqueeze(0)
        like = self.encoder.embed_tokens.weight[:1]  # only its dtype and device are used
        self.rotary = {kind: self.encoder.rotary_emb(like, positions, kind) for kind in self.encoder.unique_layer_types}

    def __call__(self, tokens: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
        """Run the encoder over `tokens` (slots start.. of the sequence; `attention_mask` (bool) covers every slot so
        far) and return the float32 logits of the next token, (B, V)."""
        n = tokens.shape[1]
        positions = torch.arange(start, start + n, dtype=torch.int32, device=tokens.device).unsqueeze(0)
        # As the multimodal encoder does: image placeholders embed as padding (a text-only decode has none).
        hidden = self.encoder.embed_tokens(tokens.masked_fill(tokens == self.image_token_id, self.text_config.pad_token_id))
        if n == 1 and not self.padded:
            masks = dict.fromkeys(self.layer_types)  # one query, no padding: it attends to every cached key
        else:
            mask_kwargs = {"config": self.text_config, "inputs_embeds": hidden, "attention_mask": attention_mask.long(),
                           "past_key_values": self.cache, "position_ids": positions}
            masks = {"full_attention": create_causal_mask(**mask_kwargs),
                     "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
        rotary = {kind: (cos[:, start : start + n], sin[:, start : start + n]) for kind, (cos, sin) in self.rotary.items()}
        for layer, kind in zip(self.encoder.layers, self.layer_types):
            hidden = layer(hidden, position_embeddings=rotary[kind], attention_mask=masks[kind],
                           position_ids=positions, past_key_values=self.cache)
        last = self.encoder.norm(hidden[:, -1:])
        return softcap_logits(self.model.lm_head(last), self.softcap)[:, -1]


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
    step = CausalStep(model, cache, length + max_new_tokens, not bool(attention_mask.all()), device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    forwards = torch.zeros(batch, dtype=torch.long, device=device)
    generated: list[torch.Tensor] = []
    tokens, start = prompt_ids, 0
    first_token_s = None
    for _ in range(max_new_tokens):
        logits = step(tokens, attention_mask, start)
        if do_sample:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_token = logits.argmax(dim=-1)
        forwards += ~ended
        if pad_id is not None:
            next_token = next_token.masked_fill(ended, pad_id)
        generated.append(next_token)
        if first_token_s is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_token_s = time.perf_counter() - start_time
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
        first_token_s=first_token_s,
        positions_evaluated=batch * len(generated),
    )
