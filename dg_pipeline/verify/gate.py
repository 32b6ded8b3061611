"""The verification gate every stage ends with: decode the eval set, score, time, check, write verify.json.

Measured (all on the same weights, same prompts, same scorer):
- accuracy: block-diffusion sampler over all eval examples at batch `verify.batch_size`;
- throughput: generated tokens per second of generate() wall time (prefill included; passes.TOKENS_PER_SECOND_
  DEFINITION), at the configured batch (the accuracy pass) and at batch 1: `verify.speed_rounds` interleaved rounds
  over the first `verify.speed_examples` examples (speed.py), each decoder warmed up first. A *generated token* is
  a response token up to and including the first EOS, so diffusion and AR are charged for the same useful output;
- tokens_per_forward (= tokens committed per denoising step), mean_denoising_steps (= steps per canvas), canvas
  positions evaluated per token (accuracy pass), time to first token (batch 1, median over rounds);
- the AR baseline (`ar_generate`, greedy, KV cache): accuracy at batch B and tokens/s at batch 1 and B;
- speedup_vs_ar = median over rounds of diffusion tokens/s / AR tokens/s at batch 1 (single-user decode, where block
  diffusion is meant to win), with its spread and lower confidence bound; the batch-B ratio is
  `speedup_vs_ar_batch`;
- the fixed-step benchmark (`verify.fixed_steps_benchmark` steps per block, no adaptive stop, as vLLM's published
  DiffusionGemma measurement runs): timed in the same rounds.
Then the checks (verify.min_accuracy, verify.max_accuracy_drop vs a reference verify.json, verify.min_speedup on the
speedup's lower confidence bound when verify.speed_confidence > 0),
verify.json (atomic; written before a failure is raised), the console table and the plots. The gate reads its
settings from a GateSettings (the verify and sampler groups, the task), never from the whole config.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from rich.console import Console

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.io import atomic_write_text, dumps_json
from dg_pipeline.core.progress import progress_bar
from dg_pipeline.data import left_padded_prompts
from dg_pipeline.sampling import BlockDiffusionSampler, GenerationResult, SamplerConfig, ar_generate
from dg_pipeline.verify.passes import DecodePass, Generate, run_pass
from dg_pipeline.verify.speed import SPEEDUP_DEFINITION, interleaved_rounds, speed_summary
from dg_pipeline.verify.breakdown import accuracy_breakdown, first_per_source, source_accuracies, source_of
from dg_pipeline.verify.plots import plot_step_sweep, plot_trajectory, trajectory_grid
from dg_pipeline.verify.record import (
    Check,
    GateSettings,
    PairedDrop,
    at_most,
    finalize_record,
    gate_checks,
    load_reference,
    raise_if_failed,
    reference_verdicts,
    write_record,
)
from dg_pipeline.verify.report import print_gate
from dg_pipeline.verify.scorers import Score, aggregate, scorer_class, scorer_for

# Default max_new_tokens for free-form completions when sampler.max_new_tokens is null.
DEFAULT_COMPLETION_TOKENS = 256


# ------------------------------------------------------------------------------------------- decoders


def resolve_max_new_tokens(max_new_tokens: int | None, task: str, examples: Sequence) -> int:
    """sampler.max_new_tokens, else the longest reference answer (Sudoku) or DEFAULT_COMPLETION_TOKENS (chat)."""
    if max_new_tokens is not None:
        return int(max_new_tokens)
    if task == "sudoku":
        return max(len(e.response_ids) for e in examples)
    return DEFAULT_COMPLETION_TOKENS


class DiffusionDecoder:
    """The block sampler on batches of examples: a distinct, reproducible seed per call (so batches do not share their
    random canvases); `restart` replays the same seeds (timing rounds then repeat the same work)."""

    def __init__(self, model, sampler_config: SamplerConfig, tokenizer, max_new_tokens: int, seed: int):
        self.sampler = BlockDiffusionSampler(model, sampler_config)
        self.tokenizer, self.max_new_tokens, self.seed = tokenizer, max_new_tokens, seed
        self.restart()

    def restart(self) -> None:
        self.calls = itertools.count()

    def __call__(self, batch, record_trajectory: bool = False) -> GenerationResult:
        ids, mask = left_padded_prompts(batch, self.tokenizer.pad_token_id)
        return self.sampler.generate(ids, mask, max_new_tokens=self.max_new_tokens, seed=self.seed + next(self.calls),
                                     record_trajectory=record_trajectory)


def diffusion_decoder(model, sampler_config: SamplerConfig, tokenizer, max_new_tokens: int, seed: int) -> Generate:
    return DiffusionDecoder(model, sampler_config, tokenizer, max_new_tokens, seed)


def ar_decoder(model, tokenizer, max_new_tokens: int) -> Generate:
    def generate(batch):
        ids, mask = left_padded_prompts(batch, tokenizer.pad_token_id)
        return ar_generate(model, ids, mask, max_new_tokens=max_new_tokens, do_sample=False)

    return generate


def measure(generate: Generate, examples: Sequence, batch_size: int, tokenizer, progress, name: str,
            eos_token_ids: Sequence[int] = ()) -> DecodePass:
    """The pass over all examples at `batch_size`, after an untimed warm-up call of its shape (so it pays no one-time
    costs: lazy init, compilation, CUDA graphs)."""
    generate(examples[:batch_size])
    return run_pass(generate, examples, batch_size, tokenizer, progress, f"{name:<9} batch {batch_size}", eos_token_ids)


def measure_speed(decoders: Mapping[str, Generate], examples: Sequence, rounds: int, tokenizer, progress,
                  eos_token_ids: Sequence[int] = ()) -> dict[str, list[DecodePass]]:
    """Batch-1 passes over `examples`, `rounds` interleaved rounds (speed.py), after one untimed batch-1 call each."""
    for generate in decoders.values():
        generate(examples[:1])
    return interleaved_rounds(decoders, examples, rounds, tokenizer, progress, eos_token_ids)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    return f"cpu ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------- the gate


@dataclass
class GateDecodes:
    """Every decoding pass of one gate."""

    diffusion: DecodePass  # all examples at batch B: accuracy, tokens/forward, steps, tokens/s @ B
    ar: DecodePass | None  # None when verify.ar_baseline=false
    speed: dict[str, list[DecodePass]]  # batch-1 rounds on the speed subset: diffusion, ar, fixed_steps
    sweep: list[dict]  # fixed step counts (verify.sweep_steps)
    sweep_adaptive: dict | None  # the main pass (the adaptive stop) on the sweep's examples
    plots: dict
    device: str


def run_gate(
    model,
    tokenizer,
    examples: Sequence,
    settings: GateSettings,
    stage: str,
    input_dir: str | Path,
    out_dir: str | Path,
    reference: str | Path | Mapping | None = None,
    *,
    simulated: bool = False,
    timed: bool = True,
    extra: Mapping[str, Any] | None = None,
    checks: Sequence[Check] = (),
    console: Console | None = None,
) -> dict:
    """Run the gate and write <out_dir>/verify.json; raise GateFailed (after writing) when a check fails.

    `reference`: the verify.json (path, its dir, or the record) the accuracy drop is measured against;
    verify.reference overrides it. `simulated`: throughput was measured on fake-quantized weights (quantize
    stage). `timed`: False = score accuracy only (no AR baseline, no batch-1 rounds, no fixed-step benchmark: the
    quantize stage on fake-quantized weights, verify.time_simulated=false; the stage refuses a speed floor first).
    `extra`: more keys for the record (e.g. the quant format); `checks`: the stage's own checks (e.g. the quantize
    stage's logits-error bound), added to the task checks.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    console = console or Console()
    # Everything that can be wrong with the inputs fails here, before any decoding.
    sampler_config = SamplerConfig.for_model(model, settings.sampler, tokenizer)
    scorer = scorer_for(settings.task, tokenizer, sampler_config.eos_token_ids)  # stops where the sampler stops
    thresholds = settings.thresholds
    ref = gate_reference(settings, stage, input_dir, reference, scorer.metric)
    examples = first_examples(examples, settings.n_eval)

    decodes = decode_for_gate(model, tokenizer, examples, settings, sampler_config, scorer, out_dir, console, timed)
    scores = [scorer.score(s, e) for s, e in zip(decodes.diffusion.sequences, examples)]
    ar_scores = [scorer.score(s, e) for s, e in zip(decodes.ar.sequences, examples)] if decodes.ar else None
    record = measurements(stage, input_dir, scorer.metric, examples, scores, ar_scores, decodes, settings,
                          sampler_config, ref)
    record["fixed_step_benchmark"] = fixed_step_point(decodes.speed, examples, scorer, settings)
    record.update(accuracy_breakdown(examples, [sc.correct for sc in scores],
                                     [sc.correct for sc in ar_scores] if ar_scores else None, scorer.strata))
    record["simulated"] = bool(simulated)
    record["timed"] = bool(timed)
    record.update(extra or {})
    paired = None
    if ref is not None:
        paired = PairedDrop.from_verdicts(reference_verdicts(ref) or [], [bool(sc.correct) for sc in scores])
    if paired is not None:
        record["paired_drop"] = {"lost": paired.lost, "gained": paired.gained, "n": paired.n,
                                 "confidence": thresholds.drop_confidence,
                                 "drop_lower_bound": paired.drop_lower_bound(thresholds.drop_confidence)
                                 if thresholds.drop_confidence else paired.drop}
    non_finite = non_finite_tensors(model)
    record["non_finite_tensors"] = non_finite[:20]
    speedup_checked = record["speedup_vs_ar"]
    if thresholds.speed_confidence and record["speedup_vs_ar_lower_bound"] is not None:
        # Rounds timed under load: only a speedup that holds at this confidence passes.
        speedup_checked = record["speedup_vs_ar_lower_bound"]
    task_checks = gate_checks(record["accuracy"], speedup_checked, thresholds, ref, paired)
    finalize_record(record, [*task_checks, *checks, at_most("non_finite_weights", len(non_finite), 0)])
    _write_predictions(out_dir, examples, scores, ar_scores)
    record["seconds"]["gate_total"] = time.perf_counter() - t_start
    path = write_record(out_dir, record)
    print_gate(record, console)
    raise_if_failed(record, path)
    return record



@torch.no_grad()
def non_finite_tensors(model) -> list[str]:
    """The names of the model's weights holding a NaN or an infinity (a model that has any never passes a gate,
    whatever it happens to decode)."""
    return [name for name, t in model.named_parameters() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def gate_reference(settings: GateSettings, stage: str, input_dir: str | Path, reference: str | Path | Mapping | None,
                   metric: str | None = None) -> dict | None:
    """The record the accuracy drop is measured against (verify.reference wins over `reference`), or None when
    the gate has no drop allowance. Stages call it before their expensive work, so a missing record fails fast."""
    metric = metric or scorer_class(settings.task).metric
    ref = load_reference(settings.verify.reference, reference, metric)
    if ref is None and settings.max_accuracy_drop is not None:
        # A drop allowance with nothing to compare against would pass on min_accuracy alone: say so instead.
        allowance_key = f"{settings.drop_allowance_from}.max_accuracy_drop"
        raise InputError(
            f"stage={stage}: the gate allows an accuracy drop of {settings.max_accuracy_drop} vs its input's gate, "
            f"but {input_dir} has no gate record (no verify.json beside it). Run the input's stage again, or pass "
            f"verify.reference=<a verify.json of that model>; or gate on an absolute floor with "
            f"{allowance_key}=null verify.min_accuracy=<floor>"
        )
    return ref


def decode_for_gate(model, tokenizer, examples, settings: GateSettings, sampler_config, scorer, out_dir: Path,
                    console, timed: bool = True) -> GateDecodes:
    """All the gate's decoding (diffusion, AR baseline, speed rounds, sweep, the trajectory plot) in eval mode, with
    progress; `timed` False leaves out the AR baseline and the speed rounds."""
    v = settings.verify
    batch_size = v.batch_size
    speed_examples = speed_subset(examples, v.speed_examples)
    max_new = resolve_max_new_tokens(settings.sampler.max_new_tokens, settings.task, examples)
    seed = settings.sampler.seed
    was_training = model.training
    model.eval()
    try:
        diffusion = diffusion_decoder(model, sampler_config, tokenizer, max_new, seed)
        speed_decoders: dict[str, Generate] = {"diffusion": diffusion}
        with progress_bar(console, prefix="[bold]verify[/bold] ") as progress:
            eos = sampler_config.eos_token_ids
            main = measure(diffusion, examples, batch_size, tokenizer, progress, "diffusion", eos)
            ar_main = None
            if v.ar_baseline and timed:
                speed_decoders["ar"] = ar = ar_decoder(model, tokenizer, max_new)
                ar_main = measure(ar, examples, batch_size, tokenizer, progress, "AR", eos)
            if v.fixed_steps_benchmark and timed:
                fixed = sampler_config.replace(**fixed_steps(v.fixed_steps_benchmark))
                speed_decoders["fixed_steps"] = diffusion_decoder(model, fixed, tokenizer, max_new, seed)
            speed = (measure_speed(speed_decoders, speed_examples, v.speed_rounds, tokenizer, progress, eos)
                     if timed else {})
            sweep = sweep_steps(model, settings, tokenizer, examples, scorer, max_new, seed, batch_size, progress)
        adaptive = adaptive_point(main, examples, scorer, settings, sampler_config) if sweep else None
        plots = (write_plots(diffusion, tokenizer, examples[0], sweep, scorer.metric, out_dir, adaptive)
                 if v.plots else {})
    finally:
        model.train(was_training)
    return GateDecodes(main, ar_main, speed, sweep, adaptive, plots, device_name(model_device(model)))


def measurements(stage, input_dir, metric, examples, scores, ar_scores, d: GateDecodes, settings: GateSettings,
                 sampler_config, ref) -> dict:
    """verify.json's measurements (checks and `passed` are added by finalize_record)."""
    summary = aggregate(scores)
    ar_summary = aggregate(ar_scores) if ar_scores else {}
    ar = d.ar
    speed = speed_summary(d.speed, settings.verify.speed_confidence)
    diffusion_speed, ar_speed = speed["decoders"].get("diffusion", {}), speed["decoders"].get("ar", {})
    return {
        "stage": stage,
        "input": str(input_dir),
        "metric": metric,
        "accuracy": summary["accuracy"],
        "n_eval": len(examples),
        "tokens_per_second": diffusion_speed.get("tokens_per_second_median"),
        "tokens_per_forward": d.diffusion.tokens_per_forward,
        "mean_denoising_steps": d.diffusion.mean_denoising_steps,
        "ar_accuracy": ar_summary.get("accuracy"),
        "ar_tokens_per_second": ar_speed.get("tokens_per_second_median"),
        "speedup_vs_ar": speed.get("speedup_vs_ar_median"),
        "speedup_vs_ar_lower_bound": speed.get("speedup_vs_ar_lower_bound"),
        "speedup_vs_ar_spread": speed.get("speedup_vs_ar_spread"),
        # The figures vLLM's DiffusionGemma measurement reports (accuracy pass; time to first token at batch 1).
        "tokens_per_step": d.diffusion.tokens_per_forward,
        "steps_per_canvas": d.diffusion.mean_denoising_steps,
        "positions_per_token": d.diffusion.positions_per_token,
        "canvas_positions_evaluated": d.diffusion.positions_evaluated,
        "ttft_s": diffusion_speed.get("ttft_s_median"),
        "ar_ttft_s": ar_speed.get("ttft_s_median"),
        "device": d.device,
        "batch_size": settings.verify.batch_size,
        **{k: val for k, val in summary.items() if k != "accuracy"},
        **{f"ar_{k}": val for k, val in ar_summary.items() if k != "accuracy"},
        "tokens_per_second_batch": d.diffusion.tokens_per_second,
        "ar_tokens_per_second_batch": ar.tokens_per_second if ar else None,
        "speedup_vs_ar_batch": _ratio(d.diffusion.tokens_per_second, ar.tokens_per_second if ar else None),
        "tokens_per_forward_batch1": diffusion_speed.get("tokens_per_step"),
        "ar_tokens_per_forward": ar.tokens_per_forward if ar else None,
        "speedup_definition": SPEEDUP_DEFINITION,
        "speed_examples": diffusion_speed.get("examples"),
        "speed": speed,
        "max_new_tokens": resolve_max_new_tokens(settings.sampler.max_new_tokens, settings.task, examples),
        "generated_tokens": {
            "diffusion_batch": d.diffusion.generated_tokens,
            "diffusion_batch1": d.speed["diffusion"][0].generated_tokens if "diffusion" in d.speed else None,
            "ar_batch": ar.generated_tokens if ar else None,
            "ar_batch1": d.speed["ar"][0].generated_tokens if "ar" in d.speed else None,
        },
        "sampler": _jsonable(dataclasses.asdict(sampler_config)),
        "seed": settings.sampler.seed,
        "reference": None if ref is None else {"path": ref["path"], "stage": ref.get("stage"), "accuracy": ref["accuracy"]},
        "accuracy_drop": None if ref is None else float(ref["accuracy"]) - summary["accuracy"],
        "sweep": d.sweep,
        "sweep_adaptive": d.sweep_adaptive,
        "plots": d.plots,
        "seconds": {
            "diffusion_batch": d.diffusion.seconds,
            "diffusion_batch1": sum(p.seconds for p in d.speed.get("diffusion", [])),
            "ar_batch": ar.seconds if ar else None,
            "ar_batch1": sum(p.seconds for p in d.speed["ar"]) if "ar" in d.speed else None,
        },
    }


def fixed_step_point(speed: Mapping[str, list[DecodePass]], examples: Sequence, scorer,
                     settings: GateSettings) -> dict | None:
    """The fixed-step benchmark (verify.fixed_steps_benchmark steps per block, no adaptive stop; vLLM's published
    DiffusionGemma measurement runs 16): batch-1 figures from the speed rounds, accuracy on the speed examples (each
    round's sequences are those of `speed_subset(examples)`, in its order)."""
    runs = speed.get("fixed_steps")
    if not runs:
        return None
    first = runs[0]
    summary = speed_summary({"fixed_steps": runs}, settings.verify.speed_confidence)["decoders"]["fixed_steps"]
    decoded = speed_subset(examples, settings.verify.speed_examples)
    scored = [scorer.score(seq, e) for seq, e in zip(first.sequences, decoded, strict=True)]
    return {"max_denoising_steps": settings.verify.fixed_steps_benchmark, "confidence_threshold": "off (no adaptive stop)",
            "accuracy": aggregate(scored)["accuracy"], "n": len(scored), **summary}


def first_examples(examples: Sequence, n: int | None) -> list:
    """The examples scored: the first `n` of each eval source (None = all, as the data settings sized them); none
    at all is an error naming where they come from."""
    examples = list(examples) if n is None else first_per_source(examples, n)
    if not examples:
        raise InputError("the gate got no eval examples: check data.eval_path (empty file?) or data.n_eval")
    return examples


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _write_predictions(out_dir: Path, examples, scores: list[Score], ar_scores: list[Score] | None) -> Path:
    """predictions.jsonl: one line per eval example (prediction, verdict, why), for reading failures."""
    lines = []
    for i, (ex, s) in enumerate(zip(examples, scores)):
        row = {"index": i, "correct": s.correct, "prediction": s.text, "reason": s.reason, **s.extras}
        row["reference"] = ex.meta.get("solution", ex.meta.get("completion")) if getattr(ex, "meta", None) else None
        if ar_scores is not None:
            row.update(ar_correct=ar_scores[i].correct, ar_prediction=ar_scores[i].text)
        lines.append(dumps_json(row))
    return atomic_write_text(out_dir / "predictions.jsonl", "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------- sweep and plots


def fixed_steps(steps: int) -> dict[str, int]:
    """Sampler changes that run exactly `steps` denoising steps per block: the stop rule needs the argmax canvas to
    repeat `stability_threshold` times, which cannot happen within `steps` steps when the threshold is `steps`."""
    return {"max_denoising_steps": steps, "stability_threshold": steps}


def speed_subset(examples: Sequence, n: int) -> list:
    """The `n` examples the batch-1 rounds decode, taken evenly from each eval source (the first ones of each), so the
    speed figure is not one source's step counts."""
    sources = {source_of(e) for e in examples}
    return first_per_source(examples, math.ceil(n / max(len(sources), 1)))[:n]


def sweep_subset(examples: Sequence, settings: GateSettings) -> list:
    """The examples the sweep decodes: the first verify.sweep_examples of each source (null = all)."""
    n = settings.verify.sweep_examples
    return list(examples) if n is None else first_per_source(examples, n)


def sweep_steps(model, settings: GateSettings, tokenizer, examples, scorer, max_new, seed, batch_size, progress=None,
                counts: Sequence[int] | None = None) -> list[dict]:
    """Accuracy (overall and per source), tokens/forward and steps for each FIXED step count in
    verify.sweep_steps (or `counts`; empty = no sweep): exactly that many steps per block, no adaptive stop, over
    `sweep_subset(examples)`."""
    points = []
    examples = sweep_subset(examples, settings)
    for steps in settings.verify.sweep_steps if counts is None else counts:
        sampler_config = SamplerConfig.for_model(model, settings.sampler, tokenizer, **fixed_steps(steps))
        decode = diffusion_decoder(model, sampler_config, tokenizer, max_new, seed)
        run = run_pass(decode, examples, batch_size, tokenizer, progress, f"sweep     steps={steps}",
                       sampler_config.eos_token_ids)
        points.append({"max_denoising_steps": steps, "mode": "fixed",
                       **pass_point(run, examples, [scorer.score(s, e) for s, e in zip(run.sequences, examples)])})
    return points


def pass_point(run: DecodePass, examples: Sequence, scores: Sequence[Score]) -> dict:
    """One point of a step curve: accuracy overall and per source, n, tokens/forward, steps/block, tokens/s."""
    summary = aggregate(scores)
    return {
        "accuracy": summary["accuracy"],
        "by_source": source_accuracies(examples, [sc.correct for sc in scores]),
        "n": len(examples),
        "tokens_per_forward": run.tokens_per_forward,
        "mean_denoising_steps": run.mean_denoising_steps,
        "tokens_per_second": run.tokens_per_second,
    }


def adaptive_point(main: DecodePass, examples: Sequence, scorer, settings: GateSettings,
                   sampler_config: SamplerConfig) -> dict:
    """The main pass (the sampler's own settings, adaptive stop on) as a point of the sweep, scored on the sweep's
    examples; tokens/forward and steps are the main pass's (all examples)."""
    wanted = {id(e) for e in sweep_subset(examples, settings)}
    kept = [(seq, e) for seq, e in zip(main.sequences, examples) if id(e) in wanted]
    point = pass_point(main, [e for _, e in kept], [scorer.score(seq, e) for seq, e in kept])
    return {"max_denoising_steps": sampler_config.max_denoising_steps, "mode": "adaptive", **point}


def write_plots(diffusion: Generate, tokenizer, example, sweep: list[dict], metric: str, out_dir: Path,
                adaptive: dict | None = None) -> dict:
    """sweep_steps.png (when there is a sweep) and trajectory.png (one example's denoising); returns file names."""
    paths = {}
    if sweep:
        paths["sweep"] = plot_step_sweep(sweep, metric, out_dir / "sweep_steps.png", adaptive=adaptive).name
    result = diffusion([example], record_trajectory=True)
    if result.trajectory:
        cells, kinds, labels = trajectory_grid(result.trajectory, example.response_ids, tokenizer.pad_token_id)
        paths["trajectory"] = plot_trajectory(
            cells, kinds, tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))), out_dir / "trajectory.png",
            title="denoising trajectory of eval example 0 (the canvas after each step)", row_labels=labels,
        ).name
    return paths
