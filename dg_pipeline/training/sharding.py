"""FSDP2 sharding of a DiffusionGemma for training: one unit per transformer layer shared by encoder and decoder.

Encoder layer i and decoder layer i of transformers' DiffusionGemma are different module objects holding the same
Parameter objects. A step runs every encoder layer (causal, with gradients), then every decoder layer (pass 1
without gradients for self-conditioning, pass 2 with). FSDP2 gathers a unit's parameters in a forward pre-hook of
its module(s) and frees them after; in backward, a hook on the unit's output gathers them again.

Why not `fully_shard([encoder_layer_i, decoder_layer_i])`: FSDP2 treats such a list as ONE pass that ends when
every module of the list has run, and registers the backward re-gather only on the output of the call that ends
the pass. The step's calls are enc_i (grad), dec_i (no grad: ends pass 1, nothing to hook), dec_i (grad: opens a
pass that never ends; the root completes it without hooks). No call that backward goes through carries the
re-gather hook, so backward reads the freed (resized-to-zero) parameter storage: the SIGSEGV seen on CPU/gloo.
Even without the no-grad pass the list form would keep layer i gathered from the decoder's backward until the
encoder's backward of that layer, i.e. every layer gathered at once.

What is done instead (`tie_layer_modules`): decoder layer i calls the encoder layer i's submodules (the same
module objects; they already held the same parameters, so weights, names and outputs are unchanged), and the unit
of layer i is the list of those shared submodules (`layer_units`). Every layer call, encoder or decoder, runs each
member exactly once, so every call is one complete FSDP pass with its own gather, re-gather hook and
reduce-scatter. The routed experts are a unit of their own (gathered only around the expert computation; or not
gathered at all under expert parallelism, dg_pipeline.training.expert_parallel). The vision tower (frozen, never
called in text training) is a unit that is never gathered. The root unit is the ObjectiveForward module:
embeddings = lm_head, final norm and self-conditioning, gathered once per step.

`sharding_units` is the plan; `shard_network` applies it and `dg_pipeline.training.memory_plan` costs it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from dg_pipeline.settings import ParallelSettings

# ------------------------------------------------------------------------------------------------ the layer units


def text_layers(model) -> tuple[nn.ModuleList, nn.ModuleList]:
    return model.model.encoder.language_model.layers, model.model.decoder.layers


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def layer_members(layer: nn.Module, include_experts: bool = True) -> list[tuple[str, nn.Module]]:
    """(path, module) of every direct parameter holder of a text layer that one layer call runs exactly once:
    the attention projections and q/k norms, the norms, the dense MLP, the router and (optionally) the experts."""
    members = []
    for name, child in layer.named_children():
        if name == "self_attn":
            members += [(f"self_attn.{n}", m) for n, m in child.named_children() if _holds_parameters(m)]
        elif _holds_parameters(child) and (include_experts or name != "experts"):
            members.append((name, child))
    return members


def tie_layer_modules(model) -> None:
    """Make decoder layer i call encoder layer i's submodules (idempotent).

    They already share every Parameter (transformers' `_tied_weights_keys`), so weights, state-dict names and outputs
    are unchanged; only the module objects become shared, which FSDP's per-call hooks need.
    """
    encoder_layers, decoder_layers = text_layers(model)
    for enc, dec in zip(encoder_layers, decoder_layers):
        for path, module in layer_members(enc):
            parent_path, _, name = path.rpartition(".")
            dec_parent = dec.get_submodule(parent_path) if parent_path else dec
            current = getattr(dec_parent, name)
            if current is module:
                continue
            for (n, p), (_, q) in zip(current.named_parameters(), module.named_parameters()):
                if p is not q:
                    raise ValueError(f"decoder layer {dec.layer_idx} {path}.{n} is not the encoder's parameter: the "
                                     f"model's encoder/decoder ties are broken")
            setattr(dec_parent, name, module)


@dataclass
class ShardUnit:
    """One FSDP unit of the plan: its name, the modules whose calls gather it, and what it is."""

    name: str
    modules: list[nn.Module]
    kind: str  # "layer" | "experts" | "vision" | "root"
    layer: int | None = None
    params: list[nn.Parameter] = field(default_factory=list)


def sharding_units(model, expert_parallel: bool = False) -> list[ShardUnit]:
    """The FSDP plan below the root, bottom-up: per text layer the experts unit (omitted under expert parallelism:
    the experts are split across ranks instead) and the layer unit; then the vision tower. Parameters are listed
    once, in the unit that owns them (the root owns whatever no unit lists)."""
    units: list[ShardUnit] = []
    seen: set[int] = set()

    def add(name, modules, kind, layer=None):
        params = []
        for m in modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        units.append(ShardUnit(name, modules, kind, layer, params))

    encoder_layers, _ = text_layers(model)
    for i, layer in enumerate(encoder_layers):
        if not expert_parallel:
            add(f"layers.{i}.experts", [layer.experts], "experts", i)
        else:
            for p in layer.experts.parameters():
                seen.add(id(p))  # split across ranks by expert parallelism, not by FSDP
        add(f"layers.{i}", [m for _, m in layer_members(layer, include_experts=False)], "layer", i)
    encoder = model.model.encoder
    vision = [m for m in (getattr(encoder, "vision_tower", None), getattr(encoder, "embed_vision", None))
              if m is not None and _holds_parameters(m)]
    if vision:
        add("vision", vision, "vision")
    root_params = [p for p in {id(p): p for p in model.parameters()}.values() if id(p) not in seen]
    units.append(ShardUnit("root", [], "root", None, root_params))
    return units


# ------------------------------------------------------------------------------------------------ applying it


def mixed_precision_policy(settings: ParallelSettings):
    """bf16 (or fp16) gathered parameters and compute, fp32 gradient reduction; None in full precision."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if settings.compute_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=settings.compute_dtype, reduce_dtype=torch.float32)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_network(network: nn.Module, model, mesh, settings: ParallelSettings, expert_mesh=None) -> None:
    """Apply the plan to `network` (an ObjectiveForward holding `model`) on the data-parallel `mesh`: tie the layer
    modules, shard the experts across `expert_mesh` when expert parallelism is on, one FSDP unit per plan entry,
    `network` the root. A second call is a no-op (Lightning calls configure_model on every fit/validate)."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(network):
        return
    tie_layer_modules(model)
    if settings.activation_checkpointing:
        enable_activation_checkpointing(model)
    policy = mixed_precision_policy(settings)
    split_experts: set[nn.Parameter] = set()
    if settings.expert_parallel > 1:
        from dg_pipeline.training.expert_parallel import shard_experts

        split_experts = shard_experts(model, expert_mesh, policy)
    for unit in sharding_units(model, expert_parallel=settings.expert_parallel > 1)[:-1]:
        fully_shard(unit.modules if len(unit.modules) > 1 else unit.modules[0], mesh=mesh, mp_policy=policy)
    # The split experts are left to expert parallelism: no FSDP sharding, gathering or gradient reduction.
    fully_shard(network, mesh=mesh, mp_policy=policy, ignored_params=split_experts or None)


# ------------------------------------------------------------------------------------------------ activation checkpointing


def enable_activation_checkpointing(model) -> None:
    """Recompute each text layer's activations in backward instead of keeping them (idempotent).

    transformers' own switch (GradientCheckpointingLayer) drops `past_key_values`, which the encoder layers write
    and the decoder layers read, so the layers' `forward` is wrapped here instead. An encoder layer writes its K/V
    into a fresh cache inside the checkpointed region and the real cache is filled outside it, so recomputing
    never appends to the real cache twice (the training encoder pass starts from an empty cache).
    """
    encoder_layers, decoder_layers = text_layers(model)
    for layer in encoder_layers:
        if not getattr(layer, "_dg_checkpointed", False):
            layer.forward = functools.partial(_checkpointed_encoder_layer, layer)
            layer._dg_checkpointed = True
    for layer in decoder_layers:
        if not getattr(layer, "_dg_checkpointed", False):
            layer.forward = functools.partial(_checkpointed_layer, layer)
            layer._dg_checkpointed = True


def _checkpointed_layer(layer, hidden_states, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    forward = type(layer).forward
    if not torch.is_grad_enabled():
        return forward(layer, hidden_states, *args, **kwargs)
    return checkpoint(forward, layer, hidden_states, *args, use_reentrant=False, **kwargs)


def _checkpointed_encoder_layer(layer, hidden_states, *args, past_key_values=None, **kwargs):
    from torch.utils.checkpoint import checkpoint
    from transformers.cache_utils import DynamicCache

    forward = type(layer).forward
    if not torch.is_grad_enabled() or past_key_values is None:
        return forward(layer, hidden_states, *args, past_key_values=past_key_values, **kwargs)

    def run(hidden):
        scratch = DynamicCache()
        out = forward(layer, hidden, *args, past_key_values=scratch, **kwargs)
        cached = scratch.layers[layer.layer_idx]
        return out, cached.keys, cached.values

    out, keys, values = checkpoint(run, hidden_states, use_reentrant=False)
    past_key_values.update(keys, values, layer.layer_idx)
    return out
