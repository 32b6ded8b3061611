"""BlockDiffusionSampler against the reference `DiffusionGemmaForBlockDiffusion.generate` on tiny models.

Same seed and settings -> the same tokens, token for token (the sampler draws its random numbers in the reference's
order and shapes and keeps its float arithmetic), for batch 1 and left-padded batches, over several blocks, with EOS,
with rows stopping early at different steps; and the same forward and token counts.
"""

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
)

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_config
from dg_pipeline.sampling import BlockDiffusionSampler, SamplerConfig
from dg_pipeline.sampling.cache import DynamicBlockCache, StaticBlockCache
from dg_pipeline.sampling.denoiser import DecoderPass

CANVAS = 8
STEPS = 12
EOS, PAD, MASK = 1, 0, 4


def tiny_model(final_norm_scale: float = 1.0):
    tokenizer = build_board_tokenizer()
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(build_config("tiny", len(tokenizer), CANVAS)).eval()
    with torch.no_grad():
        # A larger final norm sharpens the logits: a near-deterministic, confident model that stops early.
        model.model.decoder.norm.weight.mul_(final_norm_scale)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def confident_model():
    return tiny_model(final_norm_scale=15.0)


def generation_config(entropy_bound=2.0, confidence_threshold=0.005, stability_threshold=1, eos=EOS):
    return DiffusionGemmaGenerationConfig(
        max_denoising_steps=STEPS,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=entropy_bound),
        t_min=0.4,
        t_max=0.8,
        stability_threshold=stability_threshold,
        confidence_threshold=confidence_threshold,
        eos_token_id=eos,
        pad_token_id=PAD,
    )


def prompts(batch: int, length: int, left_pad: dict[int, int] | None = None, seed: int = 0):
    ids = torch.randint(6, 16, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.bool)
    for row, n in (left_pad or {}).items():
        ids[row, :n] = PAD
        mask[row, :n] = False
    return ids, mask


def reference_and_ours(model, gen_cfg, ids, mask, max_new_tokens, seed=7, **overrides):
    torch.manual_seed(seed)
    reference = model.generate(
        ids, attention_mask=mask.long(), generation_config=gen_cfg, max_new_tokens=max_new_tokens
    )
    sampler = BlockDiffusionSampler(model, SamplerConfig.from_generation_config(gen_cfg, **overrides))
    ours = sampler.generate(ids, mask, max_new_tokens=max_new_tokens, seed=seed)
    return reference, ours


def assert_same_as_reference(reference, ours, prompt_length):
    expected = reference.sequences[:, prompt_length:]
    assert torch.equal(ours.sequences, expected)
    committed = (expected != PAD).sum(-1)
    assert torch.equal(ours.committed_tokens, committed)
    # The reference reports committed / forwards; ours reports both counts.
    assert torch.allclose(ours.tokens_per_forward.float(), reference.tokens_per_forward, rtol=1e-6)
    forwards = torch.round(committed / reference.tokens_per_forward).long()
    assert torch.equal(ours.decoder_forwards[committed > 0], forwards[committed > 0])


def test_batch_one_matches_reference_token_for_token(model):
    ids, mask = prompts(1, 5)
    reference, ours = reference_and_ours(model, generation_config(eos=None), ids, mask, max_new_tokens=3 * CANVAS)
    assert_same_as_reference(reference, ours, 5)
    assert ours.steps_per_block == [[STEPS]] * 3 and ours.decoder_forwards.tolist() == [3 * STEPS]


def test_left_padded_batch_over_several_blocks_with_eos_matches_reference(model):
    ids, mask = prompts(4, 6, left_pad={1: 2, 3: 4})
    reference, ours = reference_and_ours(model, generation_config(), ids, mask, max_new_tokens=4 * CANVAS)
    assert_same_as_reference(reference, ours, 6)
    blocks = len(ours.steps_per_block)
    assert blocks > 1 and 0 in ours.steps_per_block[-1]  # some rows ended (EOS) before the last block
    ended = ours.sequences == PAD
    assert ended.any() and not ended.all()


def test_rows_that_stop_early_at_different_steps_match_reference(confident_model):
    ids, mask = prompts(6, 6, left_pad={1: 2, 3: 4}, seed=1)
    gen_cfg = generation_config(entropy_bound=0.5, confidence_threshold=0.3)
    reference, ours = reference_and_ours(confident_model, gen_cfg, ids, mask, max_new_tokens=4 * CANVAS)
    assert_same_as_reference(reference, ours, 6)
    steps = [s for block in ours.steps_per_block for s in block if s > 0]
    assert max(steps) < STEPS and len(set(steps)) > 1  # early stopping, at different steps per row
    assert torch.equal(ours.decoder_forwards, torch.tensor(ours.steps_per_block).sum(0))


def test_drawing_noise_ahead_in_a_worker_thread_keeps_the_random_stream(confident_model):
    """Prefetching the next step's noise (on for big vocabularies) keeps the stream when a block stops early."""
    ids, mask = prompts(4, 6, left_pad={2: 3}, seed=4)
    gen_cfg = generation_config(entropy_bound=0.5, confidence_threshold=0.3)
    torch.manual_seed(5)
    reference = confident_model.generate(ids, attention_mask=mask.long(), generation_config=gen_cfg, max_new_tokens=32)
    for seed in (5, None):  # a private generator, and torch's global one as generate() uses
        sampler = BlockDiffusionSampler(confident_model, SamplerConfig.from_generation_config(gen_cfg))
        sampler.prefetch_min_elements = 0
        if seed is None:
            torch.manual_seed(5)
        ours = sampler.generate(ids, mask, max_new_tokens=32, seed=seed)
        assert_same_as_reference(reference, ours, 6)
    assert max(s for block in ours.steps_per_block for s in block) < STEPS  # blocks did stop early


def test_stability_over_two_steps_matches_reference(confident_model):
    ids, mask = prompts(3, 6, seed=2)
    gen_cfg = generation_config(entropy_bound=0.5, confidence_threshold=0.3, stability_threshold=2)
    reference, ours = reference_and_ours(confident_model, gen_cfg, ids, mask, max_new_tokens=2 * CANVAS)
    assert_same_as_reference(reference, ours, 6)


def test_max_new_tokens_not_a_multiple_of_the_canvas_cuts_the_last_block(model):
    ids, mask = prompts(2, 5)
    reference, ours = reference_and_ours(model, generation_config(eos=None), ids, mask, max_new_tokens=CANVAS + 3)
    assert ours.sequences.shape == (2, CANVAS + 3)
    assert torch.equal(ours.sequences, reference.sequences[:, 5 : 5 + CANVAS + 3])


def test_the_same_seed_gives_the_same_tokens_and_a_generator_works_like_an_int(model):
    sampler = BlockDiffusionSampler(model, SamplerConfig.from_generation_config(generation_config()))
    ids, mask = prompts(2, 5)
    first = sampler.generate(ids, mask, max_new_tokens=CANVAS, seed=3)
    again = sampler.generate(ids, mask, max_new_tokens=CANVAS, seed=torch.Generator().manual_seed(3))
    other = sampler.generate(ids, mask, max_new_tokens=CANVAS, seed=4)
    assert torch.equal(first.sequences, again.sequences) and not torch.equal(first.sequences, other.sequences)


def test_static_cache_sees_what_the_reference_cache_sees(model):
    """The preallocated cache (for compiled steps) gives the decoder the same logits up to float summation order."""
    ids, mask = prompts(3, 6, left_pad={1: 3})
    block = torch.randint(0, 16, (3, CANVAS), generator=torch.Generator().manual_seed(5))
    canvas = torch.randint(0, 16, (3, CANVAS), generator=torch.Generator().manual_seed(6))
    decoder = DecoderPass(model)
    logits = []
    with torch.inference_mode():
        for cache in (DynamicBlockCache(model, mask), StaticBlockCache(model, mask, max_length=64)):
            cache.append(ids)
            cache.append(block)  # a committed block, then the decoder over the next canvas
            view = cache.decoder_view(CANVAS)
            first = decoder(canvas, None, view, decoder.rotary_tables(view.positions))
            logits.append(decoder(canvas, first, view, decoder.rotary_tables(view.positions)))
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


def test_static_cache_generation_agrees_with_the_reference_on_a_confident_model(confident_model):
    ids, mask = prompts(4, 6, left_pad={2: 3}, seed=3)
    gen_cfg = generation_config(entropy_bound=0.5, confidence_threshold=0.3)
    reference, ours = reference_and_ours(confident_model, gen_cfg, ids, mask, 3 * CANVAS, kv_cache="static")
    agreement = (ours.sequences == reference.sequences[:, 6:]).float().mean().item()
    assert agreement >= 0.9


def test_static_cache_buffers_are_reused_across_calls_without_leaking_state(model):
    sampler = BlockDiffusionSampler(model, SamplerConfig.from_generation_config(generation_config(), kv_cache="static"))
    ids, mask = prompts(2, 5)
    first = sampler.generate(ids, mask, max_new_tokens=2 * CANVAS, seed=1)
    buffers = sampler._static_buffers[1]
    other_prompt = sampler.generate(prompts(2, 5, seed=9)[0], mask, max_new_tokens=2 * CANVAS, seed=2)
    again = sampler.generate(ids, mask, max_new_tokens=2 * CANVAS, seed=1)
    assert sampler._static_buffers[1] is buffers  # same batch and length: the same preallocated K/V
    assert torch.equal(first.sequences, again.sequences) and not torch.equal(first.sequences, other_prompt.sequences)


def test_trajectory_records_row_zero_at_every_step(model):
    sampler = BlockDiffusionSampler(model, SamplerConfig.from_generation_config(generation_config(eos=None)))
    ids, mask = prompts(2, 5)
    result = sampler.generate(ids, mask, max_new_tokens=2 * CANVAS, seed=0, record_trajectory=True)
    assert len(result.trajectory) == sum(block[0] for block in result.steps_per_block)
    first = result.trajectory[0]
    assert (first.block, first.step, first.temperature) == (0, STEPS, pytest.approx(0.8))
    assert all(t.accepted.any() for t in result.trajectory)
    last_of_block0 = [t for t in result.trajectory if t.block == 0][-1]
    assert torch.equal(last_of_block0.argmax, result.sequences[0, :CANVAS])  # the block's output is its argmax


def test_mask_canvas_starts_masked_and_remasks_what_it_rejects(model):
    config = SamplerConfig.from_generation_config(
        generation_config(entropy_bound=0.5, eos=None), canvas_init="mask", mask_token_id=MASK
    )
    ids, mask = prompts(1, 5)
    result = BlockDiffusionSampler(model, config).generate(ids, mask, CANVAS, seed=0, record_trajectory=True)
    for step in result.trajectory:
        assert (step.canvas[~step.accepted] == MASK).all()
    assert not result.trajectory[0].accepted.all()  # a bound of 0.5 leaves part of the canvas masked


def test_confidence_rule_commits_at_least_one_token_per_step(model):
    config = SamplerConfig.from_generation_config(generation_config(eos=None), acceptance="confidence")
    ids, mask = prompts(1, 5)
    result = BlockDiffusionSampler(model, config).generate(ids, mask, CANVAS, seed=0, record_trajectory=True)
    assert all(int(step.accepted.sum()) >= 1 for step in result.trajectory)


def test_a_right_padded_prompt_names_the_row(model):
    sampler = BlockDiffusionSampler(model)
    ids, mask = prompts(2, 5)
    mask[1, -1] = False
    with pytest.raises(InputError, match="row 1: padding at column 4 follows a real token; .* LEFT-padded"):
        sampler.generate(ids, mask, CANVAS)


def test_a_token_outside_the_vocabulary_names_row_and_column(model):
    ids, mask = prompts(2, 5)
    ids[0, 2] = 99
    with pytest.raises(InputError, match=r"row 0, column 2: token id 99 is outside the vocabulary \[0, 16\)"):
        BlockDiffusionSampler(model).generate(ids, mask, CANVAS)
