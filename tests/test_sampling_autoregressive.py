"""ar_generate: the encoder decodes as a causal LM with its KV cache, on the same weights as the diffusion sampler."""

import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_config
from dg_pipeline.sampling import ar_generate
from dg_pipeline.model.logits import encoder_causal_lm_logits

PAD = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DiffusionGemmaForBlockDiffusion(build_config("tiny", len(build_board_tokenizer()), 8)).eval()


@pytest.fixture
def left_padded_prompts():
    ids = torch.randint(6, 16, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 6, dtype=torch.bool)
    ids[1, :2], mask[1, :2] = PAD, False
    ids[2, :4], mask[2, :4] = PAD, False
    return ids, mask


def naive_greedy(model, ids, mask, steps):
    """No cache: re-run the encoder over the whole sequence for every token and take the argmax."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = encoder_causal_lm_logits(model, ids, mask.long())[:, -1].argmax(-1)
            out.append(token)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


def test_greedy_decoding_equals_a_naive_loop_without_cache(model, left_padded_prompts):
    ids, mask = left_padded_prompts
    result = ar_generate(model, ids, mask, max_new_tokens=10, eos_token_ids=())
    assert torch.equal(result.sequences, naive_greedy(model, ids, mask, 10))
    assert result.decoder_forwards.tolist() == [10, 10, 10] and result.committed_tokens.tolist() == [10, 10, 10]
    assert result.steps_per_block == [] and result.tokens_per_forward.tolist() == [1.0, 1.0, 1.0]


def test_a_row_stops_at_eos_and_is_padded_while_the_others_go_on(model, left_padded_prompts):
    ids, mask = left_padded_prompts
    free = ar_generate(model, ids, mask, max_new_tokens=8, eos_token_ids=())
    eos = int(free.sequences[0, 2])  # make row 0's third token the end-of-sequence token
    stops_at = [int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else 8 for row in free.sequences]
    result = ar_generate(model, ids, mask, max_new_tokens=8, eos_token_ids=(eos,), pad_token_id=PAD)
    assert result.decoder_forwards.tolist() == stops_at and stops_at[0] == 3
    for row, n in enumerate(stops_at):
        assert torch.equal(result.sequences[row, :n], free.sequences[row, :n])
        assert (result.sequences[row, n:] == PAD).all()
    assert result.committed_tokens.tolist() == stops_at


def test_sampling_is_reproducible_with_a_seed(model, left_padded_prompts):
    ids, mask = left_padded_prompts
    first = ar_generate(model, ids, mask, 12, do_sample=True, temperature=2.0, seed=1, eos_token_ids=())
    again = ar_generate(model, ids, mask, 12, do_sample=True, temperature=2.0, seed=1, eos_token_ids=())
    greedy = ar_generate(model, ids, mask, 12, eos_token_ids=())
    assert torch.equal(first.sequences, again.sequences) and not torch.equal(first.sequences, greedy.sequences)


def test_sampling_needs_a_positive_temperature(model, left_padded_prompts):
    with pytest.raises(InputError, match="temperature=0"):
        ar_generate(model, *left_padded_prompts, 4, do_sample=True, temperature=0)


@pytest.mark.parametrize("rows", ["left-padded batch", "one unpadded row"])
def test_the_lean_causal_step_computes_the_encoders_own_logits_bit_for_bit(model, left_padded_prompts, rows):
    """CausalStep (rotary once per call, masks only where padding needs them, lm_head on the last position) is the
    HF encoder forward's arithmetic: equal logits at every decoding step, past the sliding window (8) too. The prefill
    projects only its last position (as HF's generate does, logits_to_keep=1): a different GEMM shape, so equal to
    float rounding."""
    from transformers import DynamicCache

    from dg_pipeline.sampling.autoregressive import CausalStep

    ids, mask = left_padded_prompts if rows == "left-padded batch" else (left_padded_prompts[0][:1], left_padded_prompts[1][:1])
    ours_cache, hf_cache = DynamicCache(config=model.config.get_text_config()), DynamicCache(config=model.config.get_text_config())
    step = CausalStep(model, ours_cache, ids.shape[1] + 12, padded=not bool(mask.all()), device=ids.device)
    tokens, start = ids, 0
    with torch.inference_mode():
        for _ in range(12):
            positions = torch.arange(start, start + tokens.shape[1], dtype=torch.int32).unsqueeze(0)
            expected = encoder_causal_lm_logits(model, tokens, mask.long(), past_key_values=hf_cache,
                                                position_ids=positions)[:, -1]
            got = step(tokens, mask, start)
            assert torch.equal(got, expected) if start else torch.allclose(got, expected, rtol=0, atol=1e-6)
            start += tokens.shape[1]
            tokens = expected.argmax(-1)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
