"""Choosing the checkpoint's denoising-step budget from a measured curve (stage=sft, verify.choose_steps).

On held-out examples that are not the gate's (the val split): decode with the sampler's current settings (the
reference, e.g. the DiffusionGemma defaults: 48 steps, adaptive stop), then with max_denoising_steps = k for each k of
verify.sweep_steps in increasing order (the adaptive stop stays on: this is the setting that would be written), and
choose the first k whose accuracy is at least the reference's minus verify.choose_steps_max_loss. The chosen k goes
into generation_config.json (so vLLM, `generate` and every later gate run it); the whole curve goes into the stage's
record. Deterministic for a given model, examples and sampler seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from rich.console import Console

from dg_pipeline.sampling import SamplerConfig
from dg_pipeline.verify.gate import diffusion_decoder, pass_point, resolve_max_new_tokens, run_pass
from dg_pipeline.verify.record import GateSettings
from dg_pipeline.verify.scorers import scorer_for


@dataclass
class StepChoice:
    """The chosen budget and the curve it was read from (all on `split`)."""

    max_denoising_steps: int
    reference: dict  # the current settings' point (accuracy, mean_denoising_steps, tokens_per_forward, ...)
    curve: list[dict] = field(default_factory=list)  # one point per budget tried, in order
    max_accuracy_loss: float = 0.0
    split: str = "val"
    n: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def choose_denoising_steps(model, tokenizer, examples: Sequence, settings: GateSettings, split: str = "val",
                           console: Console | None = None) -> StepChoice | None:
    """The fewest steps of verify.sweep_steps within verify.choose_steps_max_loss of the current settings'
    accuracy on `examples`; None when there is nothing to choose (no examples, no sweep steps)."""
    counts = sorted(set(settings.verify.sweep_steps))
    if not examples or not counts:
        return None
    loss = settings.verify.choose_steps_max_loss
    console = console or Console()
    eos = SamplerConfig.for_model(model, settings.sampler, tokenizer).eos_token_ids
    scorer = scorer_for(settings.task, tokenizer, eos)  # stops where the sampler stops
    max_new = resolve_max_new_tokens(settings.sampler.max_new_tokens, settings.task, examples)
    seed = settings.sampler.seed
    batch_size = settings.verify.batch_size
    was_training = model.training
    model.eval()
    try:
        def point(**changes) -> dict:
            config = SamplerConfig.for_model(model, settings.sampler, tokenizer, **changes)
            run = run_pass(diffusion_decoder(model, config, tokenizer, max_new, seed), examples, batch_size, tokenizer,
                           eos_token_ids=eos)
            scores = [scorer.score(s, e) for s, e in zip(run.sequences, examples)]
            return {"max_denoising_steps": config.max_denoising_steps, **pass_point(run, examples, scores)}

        with console.status(f"choosing the denoising-step budget on {len(examples)} {split} examples"):
            reference = point()
            curve, chosen = [], reference["max_denoising_steps"]
            for k in (k for k in counts if k < reference["max_denoising_steps"]):
                curve.append(point(max_denoising_steps=k))
                if curve[-1]["accuracy"] >= reference["accuracy"] - float(loss) - 1e-9:
                    chosen = k
                    break
    finally:
        model.train(was_training)
    choice = StepChoice(chosen, reference, curve, float(loss), split, len(examples))
    console.print(
        f"[bold]step budget[/]: max_denoising_steps={chosen} ({split}: accuracy "
        f"{next((p['accuracy'] for p in curve if p['max_denoising_steps'] == chosen), reference['accuracy']):.3f} "
        f"vs {reference['accuracy']:.3f} at {reference['max_denoising_steps']} steps, allowed loss {loss})"
    )
    return choice
