"""Named DiffusionGemma configs: the recipes' models, the test model and the throughput-benchmark model.

All are real `DiffusionGemmaConfig`s with MoE experts (so the expert code paths are always exercised) and a
tiny vision tower (the model class requires one; it is never fed images in these recipes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, Gemma4VisionConfig

from dg_pipeline.core.errors import InputError
from dg_pipeline.model.vllm_contract import ARCHITECTURE, complete_engine_attributes


@dataclass(frozen=True, kw_only=True)
class TextShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    sliding_window: int
    # None = the model's own default pattern (5 sliding : 1 full, last layer full)
    layer_types: tuple[str, ...] | None = None
    max_position_embeddings: int = 4096
    extra: dict = field(default_factory=dict)
    # None = the tiny vision tower (never fed images in these recipes); "released" = Gemma 4's default tower
    vision: str | None = None


S, F = "sliding_attention", "full_attention"

NAMED_SHAPES: dict[str, TextShape] = {
    # Unit tests: instantiates and generates on a CPU in about a second.
    "tiny": TextShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                      sliding_window=8, layer_types=(S, F)),
    # The default recipe's model: CPU-sized (~1.5M params), trains on 4x4 Sudoku in a few CPU minutes.
    "sudoku4": TextShape(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, num_experts=4, top_k_experts=2, moe_intermediate_size=128,
                         sliding_window=64, layer_types=(S, S, S, F)),
    # 9x9 Sudoku on 2 CPU cores (bench.sudoku9_cpu): the sudoku4 width, every layer seeing the whole 83-token prompt.
    "sudoku9_cpu": TextShape(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32, num_experts=4, top_k_experts=2,
                             moe_intermediate_size=128, sliding_window=256, layer_types=(S, S, S, F)),
    # A GPU-host model for 9x9 Sudoku (~20M params).
    "sudoku9": TextShape(hidden_size=320, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, num_experts=8, top_k_experts=2, moe_intermediate_size=256,
                         sliding_window=256, layer_types=(S, S, S, F) * 2),
    # Throughput benchmarks (~110M params with a 32k vocabulary).
    "bench100m": TextShape(hidden_size=512, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=64, num_experts=8, top_k_experts=2,
                           moe_intermediate_size=512, sliding_window=512),
    # The released DiffusionGemma 26B-A4B (google/diffusiongemma-26B-A4B-it: ~25.4B params with this vision tower;
    # 30 layers, 128 routed experts top-8 plus a dense MLP, vocabulary 262,144). transformers'
    # DiffusionGemmaTextConfig defaults leave the MoE fields unset, so they come from the released config.json.
    # For `stage=plan` (built on the meta device); instantiating it needs ~100 GB.
    "diffusiongemma_26b_a4b": TextShape(hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, num_experts=128,
                                        top_k_experts=8, moe_intermediate_size=704, sliding_window=1024,
                                        max_position_embeddings=262_144,
                                        extra={"num_global_key_value_heads": 2, "global_head_dim": 512},
                                        vision="released"),
}

TINY_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    patch_size=4,
    position_embedding_size=64,
    pooling_kernel_size=2,
)


def build_config(
    name: str,
    vocab_size: int,
    canvas_length: int,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    bos_token_id: int = 2,
) -> DiffusionGemmaConfig:
    """A DiffusionGemmaConfig for one of NAMED_SHAPES, sized to a tokenizer's vocabulary."""
    if name not in NAMED_SHAPES:
        raise InputError(f"model.init={name}: unknown model config; choose one of {sorted(NAMED_SHAPES)}")
    s = NAMED_SHAPES[name]
    global_kv_heads = s.extra.get("num_global_key_value_heads", s.num_key_value_heads)
    global_head_dim = s.extra.get("global_head_dim", s.head_dim)
    text = dict(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        num_global_key_value_heads=global_kv_heads,
        head_dim=s.head_dim,
        global_head_dim=global_head_dim,
        num_experts=s.num_experts,
        top_k_experts=s.top_k_experts,
        moe_intermediate_size=s.moe_intermediate_size,
        sliding_window=s.sliding_window,
        max_position_embeddings=s.max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        **{k: v for k, v in s.extra.items() if k not in ("num_global_key_value_heads", "global_head_dim")},
    )
    if s.layer_types is not None:
        text["layer_types"] = list(s.layer_types)
    cfg = DiffusionGemmaConfig(
        text_config=text,
        vision_config=Gemma4VisionConfig().to_dict() if s.vision == "released" else dict(TINY_VISION),
        canvas_length=canvas_length,
        # Small vocabularies: keep the (unused) image special ids inside the vocabulary range.
        boi_token_id=pad_token_id,
        eoi_token_id=pad_token_id,
        image_token_id=vocab_size + 1,
    )
    cfg.architectures = [ARCHITECTURE]
    complete_engine_attributes(cfg)
    return cfg


def build_model(
    name: str,
    tokenizer,
    canvas_length: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
) -> DiffusionGemmaForBlockDiffusion:
    """A randomly initialised DiffusionGemma of a named shape for `tokenizer`, the same for the same seed.

    vocab_size: embedding rows; None = len(tokenizer) (more rows pad the table, e.g. for throughput benchmarks).
    """
    rows = vocab_size or len(tokenizer)
    if rows < len(tokenizer):
        raise InputError(f"model.vocab_size={vocab_size}: smaller than the tokenizer ({len(tokenizer)} tokens)")
    config = build_config(
        name, rows, canvas_length,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    # Seed a private copy of the CPU generator: the same weights for the same seed, no effect on the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype)
    return model.eval()
