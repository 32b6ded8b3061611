"""Expert parallelism for the routed experts (trainer.expert_parallel = number of ranks that split them).

With FSDP alone every rank all-gathers all experts of a layer for each layer call and reduce-scatters their
gradients: the experts are ~90% of DiffusionGemma 26B-A4B's weights. Under expert parallelism rank r OWNS experts
[r*E/ep, (r+1)*E/ep) whole (a dim-0 shard, a DTensor on the expert mesh) and never gathers the others; instead each
layer call sends every (token, chosen expert) pair to the rank owning that expert (all-to-all), the owner runs its
experts, and a second all-to-all returns the outputs, which are weighted and summed per token exactly as
transformers' experts forward does. Gradients flow back through both all-to-alls, so each owner receives the
gradient of its experts from every rank's tokens: the sum over ranks, scaled by 1/ranks to match the mean that
FSDP's reduce-scatter gives every other parameter.

Supported layout: the expert mesh is the whole data-parallel mesh (ep = devices x nodes), E divisible by ep.
`dg_pipeline.training.memory_plan` costs it (no gathered experts; token all-to-all buffers instead).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dg_pipeline.core.errors import InputError


def expert_mesh(data_parallel_mesh, expert_parallel: int):
    """The mesh the experts are split on: None when expert parallelism is off."""
    if expert_parallel <= 1:
        return None
    if expert_parallel != data_parallel_mesh.size():
        raise InputError(
            f"trainer.expert_parallel={expert_parallel}: expert parallelism splits the experts over every rank; set it "
            f"to the number of ranks (devices x nodes = {data_parallel_mesh.size()}) or to 1"
        )
    return data_parallel_mesh


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `scale` (the expert-gradient mean over ranks)."""

    @staticmethod
    def forward(ctx, tensor, scale):
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def shard_experts(model, mesh, policy) -> set[nn.Parameter]:
    """Split every text layer's experts across `mesh` (dim-0 DTensor shards, meta or real) and route their calls
    through the all-to-all forward; returns the split parameters (FSDP must leave them alone). Encoder and decoder
    layer i share the experts module (tie_layer_modules)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from dg_pipeline.training.sharding import text_layers

    encoder_layers, _ = text_layers(model)
    ranks = mesh.size()
    split: set[nn.Parameter] = set()
    for layer in encoder_layers:
        experts = layer.experts
        if getattr(experts, "_dg_expert_parallel", False):
            split.update(experts.parameters())
            continue
        if experts.num_experts % ranks:
            raise InputError(f"trainer.expert_parallel={ranks}: {experts.num_experts} experts do not split evenly "
                             f"over {ranks} ranks")
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(experts, name)
            sharded = distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=None)
            setattr(experts, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        experts.forward = functools.partial(expert_parallel_forward, experts, mesh, policy.param_dtype)
        experts._dg_expert_parallel = True
        split.update(experts.parameters())
    return split


def expert_parallel_forward(experts, mesh, compute_dtype, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' DiffusionGemmaTextExperts.forward with the experts split across `mesh` (see module doc)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_to_all_single

    group = mesh.get_group()
    ranks, rank = mesh.size(), mesh.get_local_rank()
    per_rank = experts.num_experts // ranks
    tokens, k = top_k_index.shape

    # Every (token, expert) pair, sorted by expert, so the pairs for rank r are one contiguous run.
    flat_expert = top_k_index.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    pair_expert = flat_expert[order]
    pair_token = torch.arange(tokens, device=hidden_states.device).repeat_interleave(k)[order]
    send_counts = torch.bincount(pair_expert // per_rank, minlength=ranks)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()

    received = hidden_states.new_empty((sum(recv_splits), hidden_states.shape[-1]))
    received = all_to_all_single(received, hidden_states[pair_token], recv_splits, send_splits, group=group)
    received_expert = torch.empty(sum(recv_splits), dtype=pair_expert.dtype, device=pair_expert.device)
    dist.all_to_all_single(received_expert, pair_expert, recv_splits, send_splits, group=group)

    gate_up = _ScaleGrad.apply(experts.gate_up_proj.to_local(), 1.0 / ranks)
    down = _ScaleGrad.apply(experts.down_proj.to_local(), 1.0 / ranks)
    if compute_dtype is not None:
        gate_up, down = gate_up.to(compute_dtype), down.to(compute_dtype)
        received = received.to(compute_dtype)
    # A zero term on the whole local shard: its gradient exists (zero) even when no token reached this rank's
    # experts, so every rank's optimizer steps every parameter, as in the unsplit model.
    outputs = received.new_zeros(received.shape) + 0.0 * (gate_up.flatten()[0] + down.flatten()[0])
    for local in range(per_rank):
        rows = torch.nonzero(received_expert == rank * per_rank + local).flatten()
        if rows.numel() == 0:
            continue
        gate, up = nn.functional.linear(received[rows], gate_up[local]).chunk(2, dim=-1)
        outputs = outputs.index_add(0, rows, nn.functional.linear(experts.act_fn(gate) * up, down[local]))

    returned = outputs.new_empty((sum(send_splits), outputs.shape[-1]))
    returned = all_to_all_single(returned, outputs, send_splits, recv_splits, group=group)
    weights = top_k_weights.reshape(-1)[order]
    combined = returned * weights[:, None].to(returned.dtype)
    final = torch.zeros_like(hidden_states)
    return final.index_add(0, pair_token, combined.to(final.dtype))
