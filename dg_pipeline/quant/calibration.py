"""Calibration: the forward loops ModelOpt runs to collect activation ranges, the run itself, and its audit.

Two loops (`calib.mode`):
- diffusion (default): real sampler trajectories (dg_pipeline.sampling.BlockDiffusionSampler) on calibration prompts,
  so every code path inference takes is calibrated on the activations it sees: the encoder's causal prefill and
  block commits, and the decoder's bidirectional canvas passes at the noise levels the sampler visits, with the
  self-conditioning signal of the previous step as at inference;
- text: the standard PTQ loop, `model(input_ids, attention_mask)` on clean prompt+response text (the encoder on
  clean text, the decoder once on a random canvas without self-conditioning). Kept for comparison.

`calibrate` wraps `mtq.quantize` with the routed-token counter (experts.py), a pass counter, the tied-stream sync
(tied.py), one scale per fused q/k/v and gate/up group (fused.py), the rule for unrouted experts, and an audit
that fails on any enabled quantizer left without a range.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from rich.console import Console
from torch import nn

from dg_pipeline.core.errors import InputError, PipelineError
from dg_pipeline.core.progress import progress_bar
from dg_pipeline.quant.experts import ExpertTokenCounter, apply_uncovered_expert_rule, coverage_report
from dg_pipeline.quant.fused import share_fused_scales
from dg_pipeline.quant.recipes import QuantRecipe
from dg_pipeline.quant.tied import sync_tied_quantizers
from dg_pipeline.settings.quant import CalibSettings

ForwardLoop = Callable[[nn.Module], None]


# ------------------------------------------------------------------------------------------- calibration data


def calibration_examples(examples: Sequence, n_samples: int, max_length: int) -> list:
    """The first `n_samples` train examples whose prompt fits in `max_length` tokens (the rest of the length is
    left for generated / response tokens)."""
    if n_samples <= 0:
        raise InputError(f"calib.n_samples={n_samples}: must be a positive number of prompts")
    if max_length <= 0:
        raise InputError(f"calib.max_length={max_length}: must be a positive number of tokens")
    fitting = [e for e in examples if len(e.prompt_ids) < max_length]
    if not fitting:
        raise InputError(
            f"calib.max_length={max_length}: no calibration prompt is shorter than that "
            f"(the shortest has {min((len(e.prompt_ids) for e in examples), default=0)} tokens); raise calib.max_length"
        )
    return fitting[:n_samples]


def batches(items: Sequence, batch_size: int) -> list[list]:
    if batch_size <= 0:
        raise InputError(f"calib.batch_size={batch_size}: must be a positive number of prompts")
    return [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


# ------------------------------------------------------------------------------------------- forward loops


def diffusion_forward_loop(
    examples: Sequence,
    pad_id: int,
    sampler_config,
    batch_size: int,
    max_new_tokens: int,
    seed: int,
    console: Console | None = None,
) -> ForwardLoop:
    """Sampler trajectories on the calibration prompts: prefill, denoising steps with self-conditioning, commits."""
    from dg_pipeline.data import left_padded_prompts
    from dg_pipeline.sampling import BlockDiffusionSampler

    # Eager and with the reference's dynamic cache: compiled graphs would bypass the calibrators' Python hooks.
    sampler_config = sampler_config.replace(compile="false", kv_cache="dynamic")
    groups = batches(examples, batch_size)

    def loop(model: nn.Module) -> None:
        sampler = BlockDiffusionSampler(model, sampler_config)
        with torch.no_grad(), progress_bar(console) as progress:
            task = progress.add_task("calibrating (sampler trajectories)", total=len(groups))
            for i, group in enumerate(groups):
                ids, mask = left_padded_prompts(group, pad_id)
                sampler.generate(ids.to(model.device), mask.to(model.device), max_new_tokens=max_new_tokens, seed=seed + i)
                progress.advance(task)

    return loop


def text_forward_loop(
    examples: Sequence,
    pad_id: int,
    canvas_length: int,
    batch_size: int,
    max_length: int,
    console: Console | None = None,
) -> ForwardLoop:
    """The standard loop: model(input_ids, attention_mask) on clean prompt+response text cut to `max_length`."""
    from dg_pipeline.data import collate

    groups = batches(examples, batch_size)

    def loop(model: nn.Module) -> None:
        with torch.no_grad(), progress_bar(console) as progress:
            task = progress.add_task("calibrating (clean text)", total=len(groups))
            for group in groups:
                batch = collate(group, canvas_length, pad_id)
                ids = batch["input_ids"][:, :max_length].to(model.device)
                mask = batch["attention_mask"][:, :max_length].to(model.device)
                model(input_ids=ids, attention_mask=mask)
                progress.advance(task)

    return loop


def calibration_forward_loop(calib: CalibSettings, model, tokenizer, examples: Sequence, sampler_config,
                             max_new_tokens: int, seed: int, console: Console | None = None
                             ) -> tuple[ForwardLoop, dict]:
    """The forward loop of `calib.mode` over `examples`, and the settings it runs with (quant.json records them).

    The diffusion loop samples with `sampler_config`: the sampler the run's gate uses (same settings, same canvas),
    generating up to `max_new_tokens` per prompt, capped by calib.max_length."""
    settings = {"mode": calib.mode, "n_samples": len(examples), "requested_n_samples": calib.n_samples,
                "batch_size": calib.batch_size, "max_length": calib.max_length, "split": "train"}
    if calib.mode == "text":
        loop = text_forward_loop(examples, tokenizer.pad_token_id, model.config.canvas_length, calib.batch_size,
                                 calib.max_length, console)
        return loop, settings
    longest_prompt = max(len(e.prompt_ids) for e in examples)
    max_new = max(1, min(int(max_new_tokens), calib.max_length - longest_prompt))
    settings.update(max_new_tokens=max_new, seed=seed, max_denoising_steps=sampler_config.max_denoising_steps,
                    acceptance=sampler_config.acceptance, canvas_init=sampler_config.canvas_init)
    loop = diffusion_forward_loop(examples, tokenizer.pad_token_id, sampler_config, calib.batch_size, max_new, seed,
                                  console)
    return loop, settings


# ------------------------------------------------------------------------------------------- what calibration ran


@dataclass
class PassCounter:
    """Counts the forward passes calibration ran, per kind, with hooks on the first layer of each stream and on the
    self-conditioning block (one call per decoder pass, whichever code drives the layers)."""

    model: nn.Module
    counts: dict[str, int] = field(default_factory=dict)

    def __enter__(self) -> "PassCounter":
        inner = self.model.model
        self.counts = dict.fromkeys(
            ("encoder_passes", "encoder_tokens", "decoder_passes", "decoder_tokens", "self_conditioned_passes"), 0
        )

        def encoder(_m, args):
            self.counts["encoder_passes"] += 1
            self.counts["encoder_tokens"] += math.prod(args[0].shape[:2])

        def decoder(_m, args):
            self.counts["decoder_passes"] += 1
            self.counts["decoder_tokens"] += math.prod(args[0].shape[:2])

        def self_conditioning(_m, args):
            self.counts["self_conditioned_passes"] += int(bool(torch.any(args[1] != 0)))

        self._handles = [
            inner.encoder.language_model.layers[0].register_forward_pre_hook(encoder),
            inner.decoder.layers[0].register_forward_pre_hook(decoder),
            inner.decoder.self_conditioning.register_forward_pre_hook(self_conditioning),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


# ------------------------------------------------------------------------------------------- the run and its audit


def _quantizers(model: nn.Module):
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [(n, q) for n, q in model.named_modules() if isinstance(q, TensorQuantizer)]


def audit_quantizers(model: nn.Module) -> dict:
    """Counts of quantizers by state; raises PipelineError naming every enabled static quantizer whose range is
    missing, zero or not finite (it would clamp or produce NaN at inference)."""
    counts = dict.fromkeys(("total", "enabled", "calibrated", "constant_amax", "dynamic", "disabled"), 0)
    bad = []
    for name, q in _quantizers(model):
        counts["total"] += 1
        if not q.is_enabled:
            counts["disabled"] += 1
            continue
        counts["enabled"] += 1
        if q._use_constant_amax:
            counts["constant_amax"] += 1
            continue
        if q._dynamic or q.is_mx_format:
            counts["dynamic"] += 1
            continue
        amax = getattr(q, "_amax", None)
        if amax is None:
            bad.append(f"{name} (no amax: it saw no calibration data)")
        elif not bool(torch.all(torch.isfinite(amax) & (amax > 0))):
            bad.append(f"{name} (amax {amax.flatten()[:4].tolist()}: it saw only zeros or non-finite values)")
        else:
            counts["calibrated"] += 1
    if bad:
        raise PipelineError(
            f"{len(bad)} enabled quantizer(s) were not calibrated:\n  " + "\n  ".join(bad[:20])
            + "\nfix: calibrate with calib.mode=diffusion (the only loop that runs every inference path), raise "
            "calib.n_samples, or exclude those modules (quant.exclude=[...])"
        )
    return counts


def excluded_modules(model: nn.Module) -> list[str]:
    """Linears and expert containers that carry quantizers but have all of them disabled (kept in high precision),
    with layer indices collapsed to `*`."""
    names = set()
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or hasattr(module, "down_proj_weight_quantizers")):
            continue
        quantizers = [q for n, q in _quantizers(module) if n.count(".") <= 1 and n]  # its own, not a child linear's
        if quantizers and not any(q.is_enabled for q in quantizers):
            names.add(re.sub(r"\.\d+(?=\.|$)", ".*", name))
    return sorted(names)


@dataclass
class CalibrationResult:
    seconds: float
    passes: dict
    experts: dict
    tied: dict
    quantizers: dict
    excluded_modules: list[str]
    fused: dict = field(default_factory=dict)


def calibrate(
    model: nn.Module, recipe: QuantRecipe, forward_loop: ForwardLoop, share_fused: bool = True
) -> CalibrationResult:
    """mtq.quantize with `forward_loop`, then the tied-stream sync, one scale per fused group, the unrouted-expert
    rule and the audit. share_fused=False keeps per-shard scales (only to measure what sharing changes)."""
    import modelopt.torch.quantization as mtq

    with ExpertTokenCounter(model) as routing, PassCounter(model) as passes:
        t0 = time.perf_counter()
        mtq.quantize(model, recipe.config, forward_loop)
        seconds = time.perf_counter() - t0
    tied = sync_tied_quantizers(model)
    fused = share_fused_scales(model) if share_fused else {"skipped": "per-shard scales kept (share_fused=False)"}
    experts = coverage_report(routing)
    apply_uncovered_expert_rule(model, experts)
    return CalibrationResult(
        seconds, passes.counts, experts, tied, audit_quantizers(model), excluded_modules(model), fused
    )
