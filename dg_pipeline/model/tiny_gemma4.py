"""Tiny real Gemma 4 checkpoints (text-only causal LM, or with a tiny vision tower) for tests and benchmarks of the
conversion path: hidden 64, 2 layers (sliding + full), MoE with 4 experts, the board tokenizer's 16-token vocabulary.
`RELEASED_LAYOUT_TEXT` is the released 26B-A4B's layout at reduced width (30 layers in its 5 sliding : 1 full
pattern, 128 experts top-8, full-attention heads twice the sliding head size), for checks that only hold at depth;
`chat=True` gives a checkpoint the Gemma-4-like chat tokenizer and Gemma 4's stop list [1, 106].

The weights are made non-trivial on purpose (norm scales away from 1, layer_scalar 0.7, larger init) so that a
conversion that dropped or mis-mapped any tensor shows up as a parity difference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

from dg_pipeline.data.tokenizer import CHAT_EOS_IDS, build_board_tokenizer, build_char_tokenizer
from dg_pipeline.model.configs import TINY_VISION

S, F = "sliding_attention", "full_attention"

# The features DiffusionGemma's backbone has: MoE on, keys reused as values in full layers, soft-capped logits,
# no per-layer input embeddings, no KV sharing.
TINY_GEMMA4_TEXT = dict(
    vocab_size=16,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    num_global_key_value_heads=1,
    head_dim=32,
    global_head_dim=32,
    sliding_window=8,
    layer_types=[S, F],
    hidden_size_per_layer_input=0,
    attention_k_eq_v=True,
    enable_moe_block=True,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=32,
    final_logit_softcapping=30.0,
    initializer_range=0.1,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
# google/diffusiongemma-26B-A4B's text layout with every width divided (hidden 2816 -> 64, heads 16 -> 4, head dims
# 256/512 -> 16/32, expert width 704 -> 16, sliding window 1024 -> 16); depth, layer pattern, expert count and
# top-k are the released ones; the vocabulary is the tokenizer's. About 6M parameters: a CPU forward of 2 x 64 tokens takes well under a second.
RELEASED_LAYOUT_TEXT = dict(
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=30,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_global_key_value_heads=1,
    head_dim=16,
    global_head_dim=32,
    sliding_window=16,
    layer_types=([S] * 5 + [F]) * 5,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=16,
)

# Image placeholder ids inside the 16-token vocabulary (<unk>, <mask>, <sep>) so multimodal prompts can be built.
TINY_IMAGE_IDS = dict(image_token_id=3, boi_token_id=4, eoi_token_id=5)


def tiny_gemma4_config(vision: bool = False, audio: dict | None = None, **text_overrides):
    """Gemma4TextConfig (text-only) or Gemma4Config (vision and/or audio towers) of the tiny shape."""
    text = {**TINY_GEMMA4_TEXT, **text_overrides}
    if not vision and audio is None:
        return Gemma4TextConfig(**text)
    vision_config = {k: v for k, v in TINY_VISION.items() if k != "model_type"} if vision else None
    return Gemma4Config(text_config=text, vision_config=vision_config, audio_config=audio, **TINY_IMAGE_IDS)


@torch.no_grad()
def build_tiny_gemma4(config, seed: int = 0):
    """A randomly initialised Gemma4ForCausalLM / Gemma4ForConditionalGeneration with non-trivial scales."""
    model_class = Gemma4ForCausalLM if isinstance(config, Gemma4TextConfig) else Gemma4ForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                param.mul_(1 + 0.2 * torch.randn_like(param))
    for name, buffer in model.named_buffers():
        if name.endswith("layer_scalar"):
            buffer.fill_(0.7)
    return model.eval()


def save_tiny_gemma4(
    out_dir: str | Path, vision: bool = False, audio: dict | None = None, seed: int = 0, chat: bool = False,
    **text_overrides
) -> Path:
    """Write a tiny Gemma 4 checkpoint dir (save_pretrained + the board tokenizer, or with chat=True the Gemma-4-like
    chat tokenizer, its vocabulary and the stop list [1, 106] in config.json and generation_config.json)."""
    out_dir = Path(out_dir)
    tokenizer = build_char_tokenizer() if chat else build_board_tokenizer()
    if chat:
        text_overrides = {"vocab_size": len(tokenizer), "eos_token_id": list(CHAT_EOS_IDS), **text_overrides}
    config = tiny_gemma4_config(vision=vision, audio=audio, **text_overrides)
    build_tiny_gemma4(config, seed=seed).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
