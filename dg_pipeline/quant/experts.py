"""MoE experts during calibration: how many tokens each expert saw, and what an expert that saw none gets.

Counting: a forward hook on every router (`DiffusionGemmaTextRouter`: returns probabilities, top-k weights, top-k
indices) adds up the routed tokens per expert, per layer and per stream (encoder / decoder modules are separate
objects over tied weights).

The rule for an expert that saw no calibration tokens (never left silently uncalibrated):
- weight quantizers: amax from the expert's own weight slice. ModelOpt's max calibration already calibrates every
  per-expert weight quantizer on its weight tensor (`weight_only_quantize`), independent of routing; this module
  checks that and fills in any that lack it;
- input quantizers: ModelOpt's fused-experts wrapper (`_QuantFusedExperts`) has one input quantizer per projection
  per layer, shared by all experts (inference engines use one input scale per layer), so an unrouted expert's
  input scale is the max over the tokens of the other experts of the same layer. After the tied-stream sync
  (tied.py) it is the max over both streams. A layer whose shared input quantizer saw no token at all has no rule
  to borrow from: that is an error (more calibration data is the fix).
"""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

from dg_pipeline.core.errors import PipelineError

UNCOVERED_RULE = (
    "weight amax from the expert's own weights (ModelOpt weight calibration, checked); input amax = the layer's "
    "shared input amax, i.e. the max over the tokens routed to the other experts of that layer (both streams)"
)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def is_router(module: nn.Module) -> bool:
    """A DiffusionGemma/Gemma 4 MoE router: a `proj` linear over experts plus a `per_expert_scale`."""
    return hasattr(module, "per_expert_scale") and isinstance(getattr(module, "proj", None), nn.Linear)


def stream_of(name: str) -> str:
    return "encoder" if ".encoder." in f".{name}" else "decoder"


def layer_of(name: str) -> int:
    m = _LAYER.search(name)
    if m is None:
        raise ValueError(f"{name}: not inside a `layers.<i>` module")
    return int(m.group(1))


class ExpertTokenCounter:
    """Routed-token counts per expert for every router of a model, while active (a context manager)."""

    def __init__(self, model: nn.Module):
        self.routers = {name: m for name, m in model.named_modules() if is_router(m)}
        self.counts: dict[str, torch.Tensor] = {
            name: torch.zeros(m.proj.out_features, dtype=torch.long) for name, m in self.routers.items()
        }
        self._handles = []

    def _hook(self, name: str):
        def count(module, args, output):
            top_k_index = output[2]
            self.counts[name] += torch.bincount(top_k_index.reshape(-1).cpu(), minlength=self.counts[name].numel())

        return count

    def __enter__(self) -> "ExpertTokenCounter":
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.routers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def per_layer(self) -> dict[int, dict[str, list[int]]]:
        """{layer: {"encoder": counts, "decoder": counts, "total": counts}} (lists over expert index)."""
        out: dict[int, dict[str, list[int]]] = {}
        for name, counts in self.counts.items():
            layer = out.setdefault(layer_of(name), {})
            layer[stream_of(name)] = counts.tolist()
        for layer in out.values():
            total = torch.zeros(len(next(iter(layer.values()))), dtype=torch.long)
            for counts in list(layer.values()):
                total += torch.tensor(counts)
            layer["total"] = total.tolist()
        return dict(sorted(out.items()))


def coverage_report(counter: ExpertTokenCounter) -> dict:
    """The quant.json `experts` block: per-layer counts, what fraction of experts saw tokens, which did not."""
    per_layer = counter.per_layer()
    uncovered = [
        {"layer": layer, "expert": e, **{s: c[s][e] for s in ("encoder", "decoder") if s in c}}
        for layer, c in per_layer.items()
        for e, n in enumerate(c["total"])
        if n == 0
    ]
    uncovered_stream = [
        {"layer": layer, "stream": s, "expert": e}
        for layer, c in per_layer.items()
        for s in ("encoder", "decoder")
        for e, n in enumerate(c.get(s, []))
        if n == 0
    ]
    n_experts = sum(len(c["total"]) for c in per_layer.values())
    return {
        "tokens_per_expert": {str(layer): c for layer, c in per_layer.items()},
        "experts": n_experts,
        "covered": n_experts - len(uncovered),
        "coverage": (n_experts - len(uncovered)) / n_experts if n_experts else 1.0,
        "uncovered": uncovered,
        "uncovered_in_one_stream": uncovered_stream,
        "rule": UNCOVERED_RULE,
    }


def uncovered_summary(report: dict) -> str:
    """The coverage_report's uncovered experts as counts per layer ("layer 0: 3/128, layer 5: 1/128"): one line
    however many experts (thousands at 30 layers x 128); the names stay in quant.json `experts.uncovered`."""
    per_layer: dict[int, int] = {}
    for u in report["uncovered"]:
        per_layer[int(u["layer"])] = per_layer.get(int(u["layer"]), 0) + 1
    sizes = {int(layer): len(c["total"]) for layer, c in report["tokens_per_expert"].items()}
    return ", ".join(f"layer {layer}: {n}/{sizes.get(layer, '?')}" for layer, n in sorted(per_layer.items()))


def fused_expert_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of ModelOpt-converted fused expert containers (per-expert `*_weight_quantizers`)."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "down_proj_weight_quantizers", None), nn.ModuleList):
            yield name, module


def _weight_quantizer_pairs(module: nn.Module) -> Iterator[tuple[str, int, torch.Tensor, nn.Module]]:
    """(projection, expert, weight slice, quantizer) for every per-expert weight quantizer of a fused module."""
    for attr, quantizers in module.named_children():
        if attr.endswith("_weight_quantizers"):
            proj = attr[: -len("_weight_quantizers")]
            weight = getattr(module, proj)
            for e, q in enumerate(quantizers):
                yield proj, e, weight[e], q


def _needs_amax(q) -> bool:
    return q.is_enabled and not q._dynamic and not getattr(q, "_use_constant_amax", False)


@torch.no_grad()
def apply_uncovered_expert_rule(model: nn.Module, report: dict) -> list[dict]:
    """Make sure every expert ends calibrated (see the module docstring); returns what was filled in.

    Raises PipelineError naming the quantizer when a layer's shared input quantizer never saw a token.
    """
    filled = []
    for name, module in fused_expert_modules(model):
        for proj, e, weight, q in _weight_quantizer_pairs(module):
            if _needs_amax(q) and getattr(q, "_amax", None) is None:
                q.amax = weight.detach().abs().amax().float()
                filled.append({"quantizer": f"{name}.{proj}_weight_quantizers.{e}", "rule": "amax of its own weight"})
        for attr, q in module.named_children():
            if attr.endswith("_input_quantizer") and _needs_amax(q):
                amax = getattr(q, "_amax", None)
                if amax is None or not bool(torch.all(amax > 0)):
                    raise PipelineError(
                        f"{name}.{attr}: no calibration token reached any expert of this layer, so its input scale "
                        f"cannot be calibrated; raise calib.n_samples or calib.max_length"
                    )
    report["filled"] = filled
    return filled
