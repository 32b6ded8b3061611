"""How much memory one device needs to train a DiffusionGemma under a sharding plan (`stage=plan`).

The model is built on the meta device (no weights, any size in seconds) and costed with the SAME unit list that
training shards it by (dg_pipeline.training.sharding.sharding_units): FSDP2 splits each parameter on dim 0 into
ceil(rows / ranks)-row shards (rank 0 holds the largest), expert parallelism gives each rank E / ranks experts
whole. Per device, for rank 0:

  parameters   master weights: local shard x 4 bytes (fp32; 2 under *-true bf16 precision)
  gradients    the trainable part of the local shard, in the master dtype
  optimizer    AdamW's two moments of the trainable local shard, in the master dtype
  gathered     FSDP's unsharded units in the compute dtype c: the root unit (embeddings = lm_head, norms,
               self-conditioning; gathered for the whole step) + the layer and its experts unit being computed and
               the next one prefetched (2 x), and in backward the unit's unsharded gradients (c) and their fp32
               reduce-scatter copy (4 bytes); experts excluded under expert parallelism
  activations  an estimate (`ACTIVATION_FORMULA`): what one step keeps for backward, counted from the saved
               tensors of transformers' DiffusionGemma layers per token, plus the logits of both losses
  transient    what the peak moment adds on top of gathered + activations (gradients, backward working memory)

The parts are not all alive at once: peak_bytes_per_device = parameters + optimizer + the largest of three
moments (ACTIVATION_FORMULA's last sentence); `fits` compares it with plan.device_memory_gb. DDP (and one device)
keeps the whole model, its gradients (twice: DDP's gradient buckets) and optimizer state on every rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from dg_pipeline.core.errors import InputError
from dg_pipeline.settings import ParallelSettings, PlanSettings
from dg_pipeline.training.sharding import sharding_units

GB = 1e9
FP32 = 4

ACTIVATION_FORMULA = (
    "saved for backward per layer call, per token: norms 16*h*4 + 8*h*(4 - c) bytes (RMSNorm computes in fp32) + "
    "c*(4*I + 2*k*h + 4*k*I_m + 4*q + (4 + 3*[sliding])*kv + E + 6*k) bytes; h hidden, I dense-MLP width, k experts "
    "per token, I_m expert width, q = heads*head_dim and kv = kv_heads*head_dim of the layer's attention type, E "
    "experts, c the compute dtype's bytes. The encoder runs every layer on B*L tokens, the decoder's pass 2 (with "
    "gradients) on B*C tokens and also keeps its concatenated cache+canvas keys and values, 2*c*kv*B*(L+C) per "
    "layer; attention masks B*L*L + B*C*(L+C) bytes per attention type. Logits (fp32 after the soft-cap): the AR loss "
    "keeps 2*4*V bytes per answer token (B*R) and needs (2*4 + c)*V more in its backward; the diffusion loss keeps "
    "3*4*V per canvas token (B*C; pass 1's softmax included) and needs as much again in backward. Expert "
    "parallelism keeps the dispatched tokens, 2*k*h*c per token per layer. Activation checkpointing keeps per layer "
    "only its input h*c and its K/V cache 2*kv*c per token, and recomputes one layer call at a time (its "
    "activations twice: recomputed + their gradients). Peak = parameters + optimizer + the largest of three moments: "
    "the start of backward (all activations + gathered units + the loss backward's working memory), the end of the "
    "decoder's backward (every gradient, since decoder and encoder share each layer, + the encoder's activations and "
    "the AR logits + gathered units + one layer's working memory), and the optimizer step (gradients + AdamW's "
    "temporaries: the trainable shard once with foreach on GPUs, one tensor at a time on CPUs)."
)


@dataclass(frozen=True)
class Workload:
    """What one device computes per step: `batch` examples of `prompt` + `response` tokens (the response padded to
    whole canvas blocks of `canvas`)."""

    batch: int
    prompt: int
    response: int
    canvas: int

    @property
    def sequence(self) -> int:
        return self.prompt + math.ceil(self.response / self.canvas) * self.canvas

    @property
    def tokens(self) -> int:
        return self.batch * self.sequence


def _bytes_of(dtype: torch.dtype | None) -> int:
    return torch.tensor([], dtype=dtype or torch.float32).element_size()


def _local_numel(param, ranks: int) -> int:
    """Elements rank 0 holds of `param` split on dim 0 over `ranks` (FSDP2's ceil split)."""
    if param.dim() == 0:
        return 1
    rows = param.shape[0]
    return math.ceil(rows / ranks) * (param.numel() // rows if rows else 0)


@dataclass
class LayerShape:
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    expert_intermediate: int
    q_width: int
    kv_width: int
    sliding: bool


def layer_shapes(text_config) -> list[LayerShape]:
    out = []
    for layer_type in text_config.layer_types:
        sliding = layer_type == "sliding_attention"
        head_dim = text_config.head_dim if sliding or not text_config.global_head_dim else text_config.global_head_dim
        kv_heads = (text_config.num_key_value_heads if sliding
                    else text_config.num_global_key_value_heads or text_config.num_key_value_heads)
        out.append(LayerShape(text_config.hidden_size, text_config.intermediate_size, text_config.num_experts or 0,
                              text_config.top_k_experts or 0, text_config.moe_intermediate_size or 0,
                              text_config.num_attention_heads * head_dim, kv_heads * head_dim, sliding))
    return out


def layer_call_bytes(shape: LayerShape, tokens: int, c: int) -> int:
    """Saved-for-backward bytes of one layer call over `tokens` tokens (ACTIVATION_FORMULA's per-token count)."""
    s = shape
    per_token = 16 * s.hidden * FP32 + 8 * s.hidden * (FP32 - c) + c * (
        4 * s.intermediate + 2 * s.top_k * s.hidden + 4 * s.top_k * s.expert_intermediate + 4 * s.q_width
        + (4 + 3 * s.sliding) * s.kv_width + s.experts + 6 * s.top_k)
    return tokens * per_token


def activation_bytes(text_config, work: Workload, c: int, checkpointing: bool, expert_parallel: bool
                     ) -> dict[str, int]:
    """The parts of ACTIVATION_FORMULA, in bytes."""
    shapes = layer_shapes(text_config)
    vocab = text_config.vocab_size
    enc_tokens, dec_tokens = work.tokens, work.batch * work.canvas
    context = work.sequence + work.canvas
    kv_cache = sum(2 * c * s.kv_width for s in shapes) * enc_tokens
    dispatch = sum(2 * s.top_k * s.hidden * c for s in shapes)
    largest_call = max(layer_call_bytes(s, enc_tokens, c) for s in shapes)
    if checkpointing:
        encoder = sum(s.hidden * c for s in shapes) * enc_tokens + kv_cache
        decoder = sum(s.hidden * c for s in shapes) * dec_tokens
        layer_working = 2 * largest_call
    else:
        encoder = sum(layer_call_bytes(s, enc_tokens, c) for s in shapes) + expert_parallel * dispatch * enc_tokens
        decoder = (sum(layer_call_bytes(s, dec_tokens, c) for s in shapes) + expert_parallel * dispatch * dec_tokens
                   + sum(2 * c * s.kv_width for s in shapes) * work.batch * context)
        layer_working = largest_call
    answer_tokens = work.batch * work.response
    return {
        "encoder_layers": encoder,
        "decoder_layers": decoder,
        "masks": len({s.sliding for s in shapes}) * work.batch * (work.sequence * work.sequence + work.canvas * context),
        "ar_logits": answer_tokens * vocab * 2 * FP32,
        "ar_logits_backward": answer_tokens * vocab * (2 * FP32 + c),
        "diffusion_logits": dec_tokens * vocab * 3 * FP32,
        "diffusion_logits_backward": dec_tokens * vocab * 3 * FP32,
        "layer_backward": layer_working,
    }


def plan_memory(model, parallel: ParallelSettings, ranks: int, work: Workload, plan: PlanSettings,
                foreach_optimizer: bool = False) -> dict:
    """The per-device memory of training `model` (built on the meta device is enough) on `ranks` ranks;
    `foreach_optimizer`: AdamW steps all tensors at once (its default on GPUs)."""
    if ranks < 1:
        raise InputError(f"trainer.devices x trainer.num_nodes = {ranks}: at least one rank")
    fsdp = parallel.strategy == "fsdp"
    expert_parallel = fsdp and parallel.expert_parallel > 1
    if expert_parallel and parallel.expert_parallel != ranks:
        raise InputError(f"trainer.expert_parallel={parallel.expert_parallel}: must be 1 or the number of ranks "
                         f"(devices x nodes = {ranks})")
    units = sharding_units(model, expert_parallel=expert_parallel)
    unique = {id(p): p for p in model.parameters()}
    experts = {id(p) for layer in model.model.encoder.language_model.layers for p in layer.experts.parameters()}
    total = sum(p.numel() for p in unique.values())
    expert_params = sum(unique[i].numel() for i in experts)

    master = 2 if parallel.precision.endswith("-true") and parallel.compute_dtype is not None else FP32
    c = _bytes_of(parallel.compute_dtype)
    split = fsdp and ranks > 1
    local = {i: (_local_numel(p, ranks) if split else p.numel()) for i, p in unique.items()}
    trainable_local = sum(n for i, n in local.items() if unique[i].requires_grad)
    figures = {
        "parameters": sum(local.values()) * master,
        "gradients": trainable_local * master * (2 if parallel.strategy == "ddp" and ranks > 1 else 1),
        "optimizer": trainable_local * 2 * master,
    }

    gathered = 0
    if fsdp:
        def full(unit):
            return sum(p.numel() for p in unit.params)

        root = next(u for u in units if u.kind == "root")
        per_layer: dict[int, int] = {}
        for u in units:
            if u.kind in ("layer", "experts"):
                per_layer[u.layer] = per_layer.get(u.layer, 0) + full(u)
        layer_max = max(per_layer.values(), default=0)
        gathered = full(root) * c + layer_max * (2 * c + c + FP32)
    figures["gathered"] = gathered
    acts = activation_bytes(model.config.text_config, work, c, parallel.activation_checkpointing, expert_parallel)
    saved = acts["encoder_layers"] + acts["decoder_layers"] + acts["masks"] + acts["ar_logits"] + acts[
        "diffusion_logits"]
    figures["activations"] = saved
    largest_tensor = max((local[i] for i, p in unique.items() if p.requires_grad), default=0) * master
    step_temporary = trainable_local * master if foreach_optimizer else largest_tensor
    moments = {
        "start_of_backward": gathered + saved + max(acts["ar_logits_backward"], acts["diffusion_logits_backward"]),
        "end_of_decoder_backward": gathered + figures["gradients"] + acts["encoder_layers"] + acts["masks"]
        + acts["ar_logits"] + max(acts["ar_logits_backward"], acts["layer_backward"]),
        "optimizer_step": figures["gradients"] + step_temporary,
    }
    figures["transient"] = max(moments.values()) - (gathered + saved)  # what the peak moment adds on top
    peak = figures["parameters"] + figures["optimizer"] + max(moments.values())
    budget = plan.device_memory_gb * GB
    return {
        "model": {"total_parameters": total, "expert_parameters": expert_params, "other_parameters": total - expert_params,
                  "trainable_parameters": sum(p.numel() for p in unique.values() if p.requires_grad)},
        "layout": {"strategy": parallel.strategy, "ranks": ranks, "expert_parallel": parallel.expert_parallel,
                   "activation_checkpointing": parallel.activation_checkpointing, "precision": parallel.precision,
                   "fsdp_units": len(units)},
        "workload": {**asdict(work), "sequence": work.sequence, "tokens_per_device": work.tokens},
        "bytes_per_device": figures,
        "activation_parts": acts,
        "moments": moments,
        "peak_moment": max(moments, key=moments.get),
        "activation_formula": ACTIVATION_FORMULA,
        "peak_bytes_per_device": peak,
        "peak_gb_per_device": round(peak / GB, 2),
        "device_memory_gb": plan.device_memory_gb,
        "fits": peak <= budget,
    }
