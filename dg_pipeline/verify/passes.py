"""Decoding passes: run a decoder over examples in batches and add up what it reports, with the one definition of a
generated token (and so of tokens/s) that every gate figure and benchmark uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from rich.progress import Progress

from dg_pipeline.sampling import GenerationResult

TOKENS_PER_SECOND_DEFINITION = (
    "generated tokens (response tokens up to and including the first EOS; padding and anything after EOS not "
    "counted) / wall time of generate() (prefill included, device synchronised)"
)


def useful_length(seq: Sequence[int], eos_ids: Sequence[int], pad_id: int | None) -> int:
    """Response tokens up to and including the first EOS (any of `eos_ids`, the model's stop ids); without EOS, the
    tokens before padding."""
    for i, t in enumerate(seq):
        if t in eos_ids:
            return i + 1
        if pad_id is not None and t == pad_id:
            return i
    return len(seq)


@dataclass
class DecodePass:
    """What one decoder produced over a list of examples, summed over its batches."""

    sequences: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0  # time inside generate() (the decoders' own wall_time_s, device synchronised)
    generated_tokens: int = 0  # response tokens up to and including the first EOS
    decoder_forwards: int = 0
    committed_tokens: int = 0
    block_steps: list[int] = field(default_factory=list)  # denoising steps of every (row, block) that ran
    first_token_seconds: list[float] = field(default_factory=list)  # per generate() call
    positions_evaluated: int = 0  # canvas positions the decoder computed (AR: one per row per forward)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float | None:
        """Tokens committed per decoder forward: for the block sampler, per denoising step (vLLM's "tokens committed
        per step"); AR: 1."""
        return self.committed_tokens / self.decoder_forwards if self.decoder_forwards else None

    @property
    def mean_denoising_steps(self) -> float | None:
        """Denoising steps per block (vLLM's steps per canvas)."""
        return sum(self.block_steps) / len(self.block_steps) if self.block_steps else None

    @property
    def positions_per_token(self) -> float | None:
        """Canvas positions evaluated per generated token (AR: 1)."""
        return self.positions_evaluated / self.generated_tokens if self.generated_tokens else None


Generate = Callable[..., GenerationResult]  # a batch of Examples -> the decoder's result


def run_pass(
    generate: Generate,
    examples: Sequence,
    batch_size: int,
    tokenizer,
    progress: Progress | None = None,
    label: str = "",
    eos_token_ids: Sequence[int] = (),
) -> DecodePass:
    """Decode `examples` in batches of `batch_size` and add up what the decoder reports (a response ends at any of
    `eos_token_ids`, the model's stop ids; () = the tokenizer's eos)."""
    eos_ids = tuple(eos_token_ids) or (tokenizer.eos_token_id,)
    out = DecodePass()
    task = progress.add_task(label, total=len(examples)) if progress is not None else None
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        result = generate(batch)
        add_result(out, result, eos_ids, tokenizer.pad_token_id)
        if progress is not None:
            progress.advance(task, len(batch))
    return out


def add_result(out: DecodePass, result: GenerationResult, eos_ids: Sequence[int], pad_id: int | None) -> None:
    """Add one generate() call's result to a pass."""
    rows = result.sequences.tolist()
    out.sequences.extend(rows)
    out.seconds += result.wall_time_s
    out.generated_tokens += sum(useful_length(r, eos_ids, pad_id) for r in rows)
    out.decoder_forwards += int(result.decoder_forwards.sum())
    out.committed_tokens += int(result.committed_tokens.sum())
    out.block_steps.extend(s for block in result.steps_per_block for s in block if s > 0)  # 0 = row had ended
    if result.first_token_s is not None:
        out.first_token_seconds.append(result.first_token_s)
    out.positions_evaluated += result.positions_evaluated or 0
