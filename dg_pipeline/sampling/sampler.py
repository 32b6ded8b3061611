"""Block-diffusion generation: prefill, then per block denoise a canvas and commit it, until EOS or max_new_tokens.

Per block: start a canvas (random tokens, or <mask>), then for steps n = N..1 run the decoder over it with the previous
step's tempered logits as self-conditioning, sample every position, keep the positions the acceptance rule accepts and
re-noise the rest; a row stops early once its argmax canvas is stable and confident. The block's output is the argmax
canvas; it is committed through the encoder into the cache and the next block starts.

Semantics, random-number use and float arithmetic follow `DiffusionGemmaForBlockDiffusion.generate`, so with the
dynamic cache the same seed gives the same tokens. Faster because: one entropy per step (no torch.distributions, no
validation syncs), the sampling softmax reused as the next step's self-conditioning input (float32), rotary tables
and masks once per block, inference mode, rows that finished denoising leave the batch (the reference keeps computing
them and discards the result), and on CPU the next step's noise drawn in a worker thread for big vocabularies. On
CUDA the step runs compiled with CUDA graphs over a static cache.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from dg_pipeline.sampling.acceptance import Prediction, build_acceptance, token_entropy
from dg_pipeline.sampling.cache import DecoderView, DynamicBlockCache, StaticBlockCache
from dg_pipeline.sampling.canvas import MaskCanvas, UniformCanvas, sample_categorical
from dg_pipeline.sampling.config import SamplerConfig
from dg_pipeline.sampling.denoiser import DecoderPass
from dg_pipeline.sampling.inputs import checked_max_new_tokens, checked_prompt, generator_for
from dg_pipeline.sampling.randomness import PREFETCH_MIN_ELEMENTS, RandomStream
from dg_pipeline.sampling.schedule import LinearTemperatureSchedule
from dg_pipeline.sampling.stopping import StableAndConfidentStop, contains_eos, pad_after_eos

# Static caches are sized up to a multiple of this, so prompts of similar length reuse one compiled graph.
STATIC_LENGTH_BUCKET = 128


@dataclass
class TrajectoryStep:
    """Row 0 at one denoising step."""

    block: int
    step: int  # n, counting down from max_denoising_steps
    temperature: float
    canvas: torch.Tensor  # (C,) the canvas after the step: accepted tokens, the rest re-noised (next step's input)
    argmax: torch.Tensor  # (C,) the denoiser's most likely tokens (the block's output if it stops here)
    accepted: torch.Tensor  # (C,) bool
    mean_entropy: float


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # (B, new) generated ids; pad after each row's first EOS
    decoder_forwards: torch.Tensor  # (B,) forwards each row needed (excludes steps after it stopped or ended)
    committed_tokens: torch.Tensor  # (B,) non-pad generated tokens
    steps_per_block: list[list[int]]  # [block][row] denoising steps (0: the row had already ended); [] for AR
    wall_time_s: float
    trajectory: list[TrajectoryStep] | None = field(default=None, repr=False)
    # Seconds from the call until the first output token was final (the first block committed; AR: the first token).
    first_token_s: float | None = None
    # Canvas positions the decoder evaluated, all rows together (rows x canvas length per forward, stopped rows kept
    # in a fixed-shape batch included); AR: one position per row per forward.
    positions_evaluated: int | None = None

    @property
    def tokens_per_forward(self) -> torch.Tensor:
        return self.committed_tokens.double() / self.decoder_forwards.clamp(min=1).double()

    @property
    def mean_denoising_steps(self) -> float | None:
        steps = [s for block in self.steps_per_block for s in block if s > 0]
        return sum(steps) / len(steps) if steps else None


class StepOutput(NamedTuple):
    next_canvas: torch.Tensor  # (B, C) accepted tokens, the rest re-noised
    argmax: torch.Tensor  # (B, C)
    self_conditioning: torch.Tensor  # (B, C, V) next step's self-conditioning probabilities (model dtype)
    entropy: torch.Tensor  # (B, C)
    accepted: torch.Tensor  # (B, C) bool


class BlockDiffusionSampler:
    """Generates with a DiffusionGemmaForBlockDiffusion model; see the module docstring."""

    def __init__(self, model, config: SamplerConfig | None = None):
        self.model = model.eval()
        self.config = config if config is not None else SamplerConfig.for_model(model)
        text_config = model.config.get_text_config()
        self.vocab_size = text_config.vocab_size
        self.canvas_length = model.config.canvas_length
        self.device = next(model.parameters()).device
        cfg = self.config
        self.schedule = LinearTemperatureSchedule(cfg.t_min, cfg.t_max, cfg.max_denoising_steps)
        self.acceptance = build_acceptance(cfg)
        self.stop_rule = StableAndConfidentStop(cfg.stability_threshold, cfg.confidence_threshold)
        self.noise = MaskCanvas(cfg.mask_token_id) if cfg.canvas_init == "mask" else UniformCanvas(self.vocab_size)
        self.decoder_pass = DecoderPass(model)
        self.static_cache = cfg.use_static_cache(self.device)
        self.compiled = cfg.use_compile(self.device)
        self._static_buffers = None  # ((batch, max_length), Cache) of the last static-cache call
        # CPU: from this many noise elements per step (B*C*V), draw the next step's noise in a worker thread.
        self.prefetch_min_elements = PREFETCH_MIN_ELEMENTS
        if self.compiled:
            # reduce-overhead = inductor kernels replayed as CUDA graphs; fixed shapes come from the static cache.
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self._compiled_step = torch.compile(self._step, mode=mode, dynamic=False)

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 256,
        seed: int | torch.Generator | None = None,
        record_trajectory: bool = False,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` after each LEFT-padded prompt row.

        seed: an int or a torch.Generator (reproducible), or None to draw from torch's global RNG (as generate() does).
        """
        start_time = time.perf_counter()
        prompt_ids, attention_mask = checked_prompt(prompt_ids, attention_mask, self.vocab_size, self.device)
        max_new_tokens = checked_max_new_tokens(max_new_tokens)
        generator = generator_for(seed, self.device)
        batch, prompt_length = prompt_ids.shape
        num_blocks = math.ceil(max_new_tokens / self.canvas_length)
        cache = self._new_cache(attention_mask, prompt_length + (num_blocks - 1) * self.canvas_length)
        eos_ids = torch.tensor(self.config.eos_token_ids, device=self.device) if self.config.eos_token_ids else None
        pad_id = self.config.pad_token_id

        ended = torch.zeros(batch, dtype=torch.bool, device=self.device)  # rows past their EOS
        forwards = torch.zeros(batch, dtype=torch.long, device=self.device)
        blocks: list[torch.Tensor] = []
        steps_per_block: list[list[int]] = []
        trajectory: list[TrajectoryStep] | None = [] if record_trajectory else None
        first_token_s: float | None = None
        positions = 0

        # Off-GPU the serial noise draw of a large vocabulary is worth overlapping with the step's compute.
        noise_elements = batch * self.canvas_length * self.vocab_size
        prefetch = self.device.type == "cpu" and noise_elements >= self.prefetch_min_elements
        stream = RandomStream(self.noise, batch, self.canvas_length, self.vocab_size, generator, self.device, prefetch)
        with stream:
            cache.append(prompt_ids)
            for block_index in range(num_blocks):
                if blocks:
                    cache.append(blocks[-1])
                block, steps, evaluated = self._denoise_block(cache, ended, stream, block_index, trajectory)
                forwards += steps
                positions += evaluated
                if first_token_s is None:
                    first_token_s = self._elapsed(start_time)
                ended_here = contains_eos(block, eos_ids) if eos_ids is not None else torch.zeros_like(ended)
                if pad_id is not None:
                    # Rows that ended in an earlier block get pad; rows ending here get pad after their EOS.
                    block = block.masked_fill(ended[:, None], pad_id)
                    if eos_ids is not None:
                        block = pad_after_eos(block, eos_ids, pad_id)
                ended |= ended_here
                blocks.append(block)
                steps_per_block.append(steps.tolist())
                if bool(ended.all()):
                    break

        sequences = torch.cat(blocks, dim=1)[:, :max_new_tokens]
        if pad_id is None:
            committed = torch.full_like(forwards, sequences.shape[1])
        else:
            committed = (sequences != pad_id).sum(-1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return GenerationResult(
            sequences=sequences.cpu(),
            decoder_forwards=forwards.cpu(),
            committed_tokens=committed.cpu(),
            steps_per_block=steps_per_block,
            wall_time_s=time.perf_counter() - start_time,
            trajectory=trajectory,
            first_token_s=first_token_s,
            positions_evaluated=positions,
        )

    def _elapsed(self, start_time: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start_time

    def _new_cache(self, attention_mask: torch.Tensor, committed_length: int):
        if not self.static_cache:
            return DynamicBlockCache(self.model, attention_mask)
        size = math.ceil(committed_length / STATIC_LENGTH_BUCKET) * STATIC_LENGTH_BUCKET
        key = (attention_mask.shape[0], size)
        # Reuse the last call's buffers when the shape matches: compiled graphs keep their static addresses.
        buffers = self._static_buffers[1] if self._static_buffers and self._static_buffers[0] == key else None
        cache = StaticBlockCache(self.model, attention_mask, max_length=size, buffers=buffers)
        self._static_buffers = (key, cache.cache)
        return cache

    def _denoise_block(
        self,
        cache,
        ended: torch.Tensor,
        stream: RandomStream,
        block_index: int,
        trajectory: list[TrajectoryStep] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Denoise one canvas -> (argmax canvas (B, C), denoising steps counted per row (B,), canvas positions the
        decoder evaluated)."""
        batch, length, device = cache.batch_size, self.canvas_length, self.device
        canvas = stream.initial_canvas()
        argmax = canvas.clone()
        self_conditioning: torch.Tensor | None = None  # none on a block's first step
        done = torch.zeros(batch, dtype=torch.bool, device=device)  # stable and confident
        counted = torch.zeros(batch, dtype=torch.long, device=device)
        self.stop_rule.reset(batch, length, device)
        view = cache.decoder_view(length)
        rotary = self.decoder_pass.rotary_tables(view.positions)
        temperatures = self.schedule.table(device)
        rows, rows_view = None, view  # rows still denoising, once some have stopped (dynamic cache only)
        evaluated = 0

        for step in self.schedule.steps():
            row0_active = trajectory is not None and not bool(done[0])
            counted += ~(done | ended)
            draws = stream.step(prefetch_next=step > 1)
            exponential = draws.exponential
            temperature = temperatures[step]
            evaluated += length * (batch if rows is None else rows.numel())
            if rows is None:
                out = self._run_step(canvas, self_conditioning, temperature, exponential, draws.fresh_tokens, view,
                                     rotary)
                if self.static_cache and self_conditioning is not None:
                    # Fixed shapes: every row was computed; rows that stopped keep their state.
                    keep = done[:, None]
                    out = out._replace(
                        next_canvas=torch.where(keep, canvas, out.next_canvas),
                        argmax=torch.where(keep, argmax, out.argmax),
                        self_conditioning=torch.where(keep[..., None], self_conditioning, out.self_conditioning),
                    )
                canvas, argmax, self_conditioning = out.next_canvas, out.argmax, out.self_conditioning
                done |= self.stop_rule(argmax, out.entropy)
            else:
                fresh = None if draws.fresh_tokens is None else draws.fresh_tokens[rows]
                out = self._run_step(canvas[rows], self_conditioning[rows], temperature, exponential[rows], fresh,
                                     rows_view, rotary)
                canvas[rows] = out.next_canvas
                argmax[rows] = out.argmax
                self_conditioning[rows] = out.self_conditioning
                done[rows] = self.stop_rule(out.argmax, out.entropy, rows)
            if row0_active:
                # Row 0 is the first computed row in every mode (rows are sorted).
                trajectory.append(self._trajectory_step(block_index, step, temperature, out, 0))
            remaining = int((~done).sum())
            if remaining == 0:
                break
            if not self.static_cache and remaining < (batch if rows is None else rows.numel()):
                # Stopped rows leave the batch: the others' results are unchanged, the stopped rows' compute saved.
                rows = (~done).nonzero().squeeze(1)
                rows_view = cache.rows_view(view, rows)
        return argmax, counted, evaluated

    def _run_step(self, canvas, self_conditioning, temperature, exponential, fresh, view: DecoderView, rotary):
        if not self.compiled:
            return self._step(canvas, self_conditioning, temperature, exponential, fresh, view, rotary)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        out = self._compiled_step(canvas, self_conditioning, temperature, exponential, fresh, view, rotary)
        # CUDA-graph outputs are overwritten by the next replay: keep our own copies.
        return StepOutput(*(t.clone() for t in out))

    def _step(
        self,
        canvas: torch.Tensor,
        self_conditioning: torch.Tensor | None,
        temperature: torch.Tensor,
        exponential: torch.Tensor,
        fresh_tokens: torch.Tensor | None,
        view: DecoderView,
        rotary: dict,
    ) -> StepOutput:
        """One denoising step for the given rows: forward, temper, sample, accept, re-noise."""
        logits = self.decoder_pass(canvas, self_conditioning, view, rotary)
        tempered = logits / temperature
        probs = torch.softmax(tempered, dim=-1, dtype=torch.float32)
        sample = sample_categorical(probs, exponential)
        prediction = Prediction(tempered, probs, token_entropy(tempered))
        accepted = self.acceptance(prediction)
        next_canvas = self.noise.renoise(torch.where(accepted, sample, canvas), accepted, fresh_tokens)
        return StepOutput(
            next_canvas,
            torch.argmax(tempered, dim=-1),
            self.decoder_pass.self_conditioning_probs(tempered, probs),
            prediction.entropy,
            accepted,
        )

    @staticmethod
    def _trajectory_step(block: int, step: int, temperature, out: StepOutput, row: int) -> TrajectoryStep:
        return TrajectoryStep(
            block=block,
            step=step,
            temperature=float(temperature),
            canvas=out.next_canvas[row].cpu(),
            argmax=out.argmax[row].cpu(),
            accepted=out.accepted[row].cpu(),
            mean_entropy=float(out.entropy[row].mean()),
        )
