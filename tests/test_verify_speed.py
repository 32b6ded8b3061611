"""Speed figures that hold: interleaved timing rounds, their median and spread, and a distribution-free lower
confidence bound of the median speedup that the min_speedup check uses."""

import json

import pytest
import torch

from dg_pipeline.core.errors import InputError
from dg_pipeline.data import build_board_tokenizer, generate_boards, sudoku_examples
from dg_pipeline.model.configs import build_model
from dg_pipeline.sampling import GenerationResult
from dg_pipeline.verify import run_gate
from dg_pipeline.verify.speed import interleaved_rounds, median_lower_bound, median_lower_bound_rank, spread


@pytest.mark.parametrize(("n", "confidence", "rank"), [(5, 0.95, 1), (4, 0.95, None), (10, 0.95, 2), (20, 0.95, 6),
                                                       (3, 0.8, 1), (7, 0.99, 1)])
def test_the_bound_is_the_largest_order_statistic_below_the_median_at_the_confidence(n, confidence, rank):
    assert median_lower_bound_rank(n, confidence) == rank


def test_five_rounds_bound_the_median_speedup_by_their_slowest_round():
    rounds = [3.1, 2.9, 1.2, 3.0, 3.2]  # one round hit by a load spike
    assert median_lower_bound(rounds, 0.95) == 1.2
    assert median_lower_bound(rounds[:4], 0.95) is None  # 4 rounds bound the median at 0.9375 only
    s = spread(rounds)
    assert (s["min"], s["median"], s["max"]) == (1.2, 3.0, 3.2) and s["relative_range"] == pytest.approx(2.0 / 3.0)


def test_each_round_decodes_the_same_examples_with_every_decoder_in_a_rotating_order():
    tokenizer = build_board_tokenizer()
    order = []

    def decoder(name):
        def generate(batch):
            order.append(name)
            ids = torch.tensor([[tokenizer.eos_token_id]])
            return GenerationResult(ids, torch.ones(1, dtype=torch.long), torch.ones(1, dtype=torch.long), [], 0.5,
                                    first_token_s=0.1, positions_evaluated=1)
        return generate

    passes = interleaved_rounds({"a": decoder("a"), "b": decoder("b"), "c": decoder("c")}, ["x", "y"], 3, tokenizer)
    assert order == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]
    assert {name: len(p) for name, p in passes.items()} == {"a": 3, "b": 3, "c": 3}
    assert passes["a"][0].tokens_per_second == 2 / 1.0 and passes["a"][0].first_token_seconds == [0.1, 0.1]


def test_every_round_replays_the_block_samplers_seeds_so_rounds_differ_only_by_the_clock():
    from dg_pipeline.sampling import SamplerConfig
    from dg_pipeline.verify.gate import diffusion_decoder

    tokenizer = build_board_tokenizer()
    model = build_model("tiny", tokenizer, 17, seed=0)
    examples = sudoku_examples(generate_boards(4, 2, 4, 10, seed=0), tokenizer)
    decoder = diffusion_decoder(model, SamplerConfig.for_model(model, max_denoising_steps=2), tokenizer, 17, seed=0)
    first, second = interleaved_rounds({"diffusion": decoder}, examples, 2, tokenizer)["diffusion"]
    assert first.sequences == second.sequences and first.block_steps == second.block_steps
    assert decoder(examples[:1]).sequences.tolist() != [first.sequences[0]]  # without a restart the seed moves on


def test_too_few_rounds_for_the_speed_confidence_is_one_clear_error(gate_settings):
    with pytest.raises(InputError, match=r"verify\.speed_rounds=4 is too few for verify\.speed_confidence=0\.95"):
        gate_settings("verify.speed_rounds=4")
    gate_settings("verify.speed_rounds=4", "verify.speed_confidence=0")  # the median alone needs no bound


def test_the_gate_records_rounds_spread_bound_vllm_figures_and_checks_the_bound(gate_settings, tmp_path):
    tokenizer = build_board_tokenizer()
    model = build_model("tiny", tokenizer, 17, seed=0)
    examples = sudoku_examples(generate_boards(4, 3, 4, 10, seed=0), tokenizer)
    cfg = gate_settings("verify.n_eval=3", "verify.batch_size=3", "verify.speed_examples=2", "verify.plots=false",
                        "verify.sweep_steps=[]", "sampler.max_denoising_steps=3", "verify.fixed_steps_benchmark=4",
                        "verify.min_speedup=0.001")
    record = json.loads(json.dumps(run_gate(model, tokenizer, examples, cfg, "eval", "/m", tmp_path)))
    speed = record["speed"]
    assert speed["rounds"] == 5 and speed["confidence"] == 0.95 and len(speed["speedup_vs_ar"]) == 5
    assert record["speedup_vs_ar"] == pytest.approx(sorted(speed["speedup_vs_ar"])[2])  # the median of 5
    assert record["speedup_vs_ar_lower_bound"] == min(speed["speedup_vs_ar"])
    assert record["speedup_vs_ar_spread"]["min"] <= record["speedup_vs_ar"] <= record["speedup_vs_ar_spread"]["max"]
    check = next(c for c in record["checks"] if c["name"] == "min_speedup")
    assert check["value"] == record["speedup_vs_ar_lower_bound"]
    # vLLM's figures: a random model is never confident, so each 17-token canvas takes all 3 steps (3 rows x 3 forwards
    # x 17 positions), and at most 17 of those positions are output tokens
    assert record["steps_per_canvas"] == 3.0 and record["tokens_per_step"] == record["tokens_per_forward"] <= 17 / 3
    assert record["canvas_positions_evaluated"] == 3 * 3 * 17 and record["positions_per_token"] >= 3.0
    assert 0 < record["ttft_s"] and 0 < record["ar_ttft_s"]
    fixed = record["fixed_step_benchmark"]
    assert fixed["max_denoising_steps"] == 4 and fixed["steps_per_canvas"] == 4.0 and fixed["n"] == 2
    assert len(fixed["tokens_per_second"]) == 5 and 0.0 <= fixed["accuracy"] <= 1.0


def test_the_quiet_vs_loaded_benchmark_runs_the_gates_measurement_under_both_conditions(tmp_path):
    from bench.speedup_spread import main
    from dg_pipeline.model import save_model

    tokenizer = build_board_tokenizer()
    save_model(build_model("tiny", tokenizer, 17, seed=0), tokenizer, tmp_path / "model")
    record = main(["--model", str(tmp_path / "model"), "--examples", "1", "--rounds", "2", "--confidence", "0",
                   "--out", str(tmp_path / "spread.json")])
    assert json.loads((tmp_path / "spread.json").read_text()) == json.loads(json.dumps(record))
    for condition in ("quiet", "loaded"):
        result = record["conditions"][condition]
        assert len(result["speedup_vs_ar"]) == 2 and len(result["load_average_1m"]) == 2
        assert result["speedup_vs_ar_spread"]["min"] <= result["speedup_vs_ar_median"]


def test_the_speed_rounds_take_their_examples_evenly_from_every_eval_source():
    from dg_pipeline.data.independent import independent_boards
    from dg_pipeline.verify.gate import speed_subset

    tokenizer = build_board_tokenizer()
    examples = (sudoku_examples(generate_boards(4, 5, 4, 10, seed=0), tokenizer, eval_source="pipeline")
                + sudoku_examples(independent_boards(4, 5, 4, 10, seed=0), tokenizer, eval_source="independent"))
    picked = speed_subset(examples, 4)
    assert [e.meta["eval_source"] for e in picked] == ["pipeline", "pipeline", "independent", "independent"]
    assert speed_subset(examples, 3) == examples[:2] + examples[5:6]


def test_the_fixed_step_benchmark_scores_each_speed_example_against_its_own_board(gate_settings):
    """The speed rounds decode speed_subset(examples) (the first of each source), not the first examples: a
    benchmark that answers every board it decoded correctly scores 1.0."""
    from dg_pipeline.data.independent import independent_boards
    from dg_pipeline.verify.gate import fixed_step_point, speed_subset
    from dg_pipeline.verify.passes import DecodePass
    from dg_pipeline.verify.scorers import scorer_for

    tokenizer = build_board_tokenizer()
    examples = (sudoku_examples(generate_boards(4, 5, 4, 10, seed=0), tokenizer, eval_source="pipeline")
                + sudoku_examples(independent_boards(4, 5, 4, 10, seed=0), tokenizer, eval_source="independent"))
    settings = gate_settings("verify.speed_examples=4")
    solved = [list(e.response_ids) for e in speed_subset(examples, 4)]
    run = DecodePass(sequences=solved, seconds=1.0, generated_tokens=68, decoder_forwards=4, committed_tokens=68,
                     block_steps=[1, 1, 1, 1])
    point = fixed_step_point({"fixed_steps": [run] * 5}, examples, scorer_for("sudoku", tokenizer, [1]), settings)
    assert point["accuracy"] == 1.0 and point["n"] == 4
