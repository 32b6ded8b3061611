"""Logits parity of two MoE models that should compute the same function (a conversion, a save/reload), at any depth.

A max |Δ logit| of the whole forward does not hold at depth: two correct implementations differ by float rounding
(e.g. the experts' grouped_mm vs eager kernels, ~1e-9 relative), and a deep random network amplifies that layer
after layer (measured on the released 26B-A4B layout at reduced width, fp32: x1.7 per layer, 7e-6 after 6 layers,
1.0 after 30), while near-ties between two experts' router scores flip, take other experts and add their own jump.
Neither is a conversion error. So the comparison is made per layer, where rounding cannot compound:
- teacher-forced: every candidate layer gets the reference's input to that layer, and routes each token to the
  experts the reference chose there (its own router still weighs them: its probabilities at those experts,
  renormalised and scaled as the router does). Recorded: the largest relative error of a layer's output, the
  logits computed from the last layer that way, and the fraction of routing decisions the candidate's own router
  would have made differently on the same input (rounding flips only near-ties; a router with a wrong or missing
  weight disagrees on most tokens). A wrong or missing weight anywhere moves its layer's output.
- free: the plain whole-forward figures (max |Δ logit|, relative error, routing disagreement), for the record.
The gate checks the teacher-forced figures.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextRouter
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

ROUTER_CLASSES = (Gemma4TextRouter, DiffusionGemmaTextRouter)  # forward -> (probabilities, top-k weights, top-k ids)
# Largest fraction of one layer's tokens whose experts a candidate's router picks differently from the reference's on
# the same layer input, per dtype. Rounding flips only near-ties (fp32: none measured; bf16: up to ~0.1 of a layer's
# tokens with 128 experts top-8); a router with a wrong or missing weight disagrees on most tokens.
MAX_ROUTING_DISAGREEMENT = {torch.float32: 0.02, torch.float16: 0.25, torch.bfloat16: 0.25}
# Largest relative error of one layer's output, teacher-forced, per dtype: fp32 rounding is ~1e-7 (measured up to
# 3e-7); 16-bit layers round their output to the dtype (bf16 has 8 mantissa bits: ~4e-3 per element).
LAYER_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass
class Parity:
    """One comparison of a candidate with a reference on the same input (module doc)."""

    layer_relative_error: float  # teacher-forced, pinned: max over layers of ||out_c - out_r|| / ||out_r||
    worst_layer: int
    pinned_max_abs_logit_diff: float  # teacher-forced, pinned: logits from the last layer
    routing_disagreement: float | None  # teacher-forced: worst layer's fraction of tokens whose own experts differ
    free_max_abs_logit_diff: float  # whole forward, each model routing itself (the old figure)
    free_logits_relative_error: float
    free_routing_disagreement: float | None
    layers: int

    def as_record(self) -> dict:
        return asdict(self)


def routers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, ROUTER_CLASSES)]


@contextlib.contextmanager
def recorded_routing(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects each router call's top-k expert ids (in call order: layer order for one forward)."""
    choices: list[torch.Tensor] = []

    def record(_module, _inputs, output):
        choices.append(output[2].detach().clone())

    handles = [r.register_forward_hook(record) for r in routers(model)]
    try:
        yield choices
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def pinned_routing(model: nn.Module, choices: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Every router call of `model` picks the experts of `choices` (consumed in call order), weighing them with its
    own probabilities as the router does (renormalised over the chosen k, times per_expert_scale). Yields the
    choices the model's own router made (for routing_disagreement)."""
    calls = iter(range(len(choices)))
    own: list[torch.Tensor] = []

    def pin(module, _inputs, output):
        probabilities = output[0]
        own.append(output[2].detach().clone())
        try:
            index = choices[next(calls)].to(probabilities.device)
        except StopIteration:
            raise RuntimeError(f"pinned routing: the model called its routers more than the {len(choices)} times "
                               "the reference did (different depth or more forwards)") from None
        weights = probabilities.gather(-1, index)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return probabilities, weights * module.per_expert_scale[index], index

    handles = [r.register_forward_hook(pin) for r in routers(model)]
    try:
        yield own
    finally:
        for h in handles:
            h.remove()


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def recorded_layers(layers: Sequence[nn.Module]) -> Iterator[tuple[list, list]]:
    """(inputs, outputs): each layer's hidden-state input and output of one forward, in layer order."""
    inputs: list = [None] * len(layers)
    outputs: list = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):
        def before(_m, args, kwargs, i=i):
            inputs[i] = _hidden(args, kwargs).detach().clone()

        def after(_m, _args, output, i=i):
            outputs[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        handles += [layer.register_forward_pre_hook(before, with_kwargs=True), layer.register_forward_hook(after)]
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def teacher_forced(layers: Sequence[nn.Module], inputs: Sequence[torch.Tensor]) -> Iterator[None]:
    """Each layer runs on the given input instead of its predecessor's output."""
    handles = []
    for layer, given in zip(layers, inputs):
        def replace(_m, args, kwargs, given=given):
            if args:
                return (given.to(args[0].device, args[0].dtype), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": given.to(kwargs["hidden_states"].device,
                                                                 kwargs["hidden_states"].dtype)}

        handles.append(layer.register_forward_pre_hook(replace, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def routing_disagreement(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float | None:
    """The largest fraction, over router calls (MoE layers), of tokens whose expert sets differ (order within the
    top-k ignored): one broken router shows as its layer's fraction, not diluted by the healthy ones."""
    if not reference:
        return None
    if len(reference) != len(candidate):
        return 1.0
    worst = 0.0
    for r, c in zip(reference, candidate):
        same = (r.sort(dim=-1).values == c.sort(dim=-1).values).all(dim=-1)
        worst = max(worst, float((~same).float().mean()))
    return worst


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float().to(a.device)
    return ((a - b).norm() / b.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


@torch.no_grad()
def logits_parity(
    reference_model: nn.Module,
    reference_layers: Sequence[nn.Module],
    reference_logits: Callable[[], torch.Tensor],
    candidate_model: nn.Module,
    candidate_layers: Sequence[nn.Module],
    candidate_logits: Callable[[], torch.Tensor],
) -> Parity:
    """Compare `candidate_logits()` with `reference_logits()` (each one forward of its model on the same input,
    through the given decoder layers), teacher-forced and free (module doc)."""
    if len(reference_layers) != len(candidate_layers):
        raise ValueError(f"parity: {len(candidate_layers)} candidate layers vs {len(reference_layers)} reference layers")
    with recorded_routing(reference_model) as reference_choices, recorded_layers(reference_layers) as (ins, outs):
        expected = reference_logits().float()
    with recorded_routing(candidate_model) as free_choices:
        free = candidate_logits().float().to(expected.device)
    with teacher_forced(candidate_layers, ins), pinned_routing(candidate_model, reference_choices) as own, \
            recorded_layers(candidate_layers) as (_, forced_outs):
        pinned = candidate_logits().float().to(expected.device)
    errors = [_relative(c, r) for c, r in zip(forced_outs, outs)]
    worst = max(range(len(errors)), key=errors.__getitem__) if errors else -1
    return Parity(
        layer_relative_error=errors[worst] if errors else 0.0,
        worst_layer=worst,
        pinned_max_abs_logit_diff=(pinned - expected).abs().max().item(),
        routing_disagreement=routing_disagreement(reference_choices, own),
        free_max_abs_logit_diff=(free - expected).abs().max().item(),
        free_logits_relative_error=_relative(free, expected),
        free_routing_disagreement=routing_disagreement(reference_choices, free_choices),
        layers=len(reference_layers),
    )


__all__ = [
    "LAYER_TOLERANCE",
    "MAX_ROUTING_DISAGREEMENT",
    "Parity",
    "ROUTER_CLASSES",
    "logits_parity",
    "pinned_routing",
    "recorded_layers",
    "recorded_routing",
    "routers",
    "routing_disagreement",
    "teacher_forced",
]
