"""run_gate end to end on a tiny random DiffusionGemma and a few generated 4x4 boards (accuracy ~0 is expected)."""

import json

import pytest

from dg_pipeline.core.errors import GateFailed, InputError
from dg_pipeline.data import build_board_tokenizer, generate_boards, sudoku_examples
from dg_pipeline.model.configs import build_model
from dg_pipeline.verify import run_gate
from dg_pipeline.verify.record import REQUIRED_KEYS

# canvas 8 < the 17-token answer: every example takes 3 blocks, so block commits and stopping are exercised.
CANVAS = 8
FAST = ("verify.n_eval=4", "verify.batch_size=2", "verify.speed_examples=2", "sampler.max_denoising_steps=3")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_board_tokenizer()
    model = build_model("tiny", tokenizer, CANVAS, seed=0)
    examples = sudoku_examples(generate_boards(4, 5, 4, 10, seed=0), tokenizer)
    return model, tokenizer, examples


def test_the_gate_writes_a_complete_record_predictions_and_plots(tiny, gate_settings, tmp_path):
    model, tokenizer, examples = tiny
    cfg = gate_settings(*FAST, "verify.sweep_steps=[1,3]")
    record = run_gate(model, tokenizer, examples, cfg, "eval", "/models/tiny", tmp_path)

    on_disk = json.loads((tmp_path / "verify.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert set(REQUIRED_KEYS) <= set(on_disk)
    assert on_disk["stage"] == "eval" and on_disk["input"] == "/models/tiny" and on_disk["metric"] == "solved"
    assert on_disk["n_eval"] == 4 and on_disk["batch_size"] == 2 and on_disk["passed"] is True
    assert 0.0 <= on_disk["accuracy"] <= 1.0 and 0.0 <= on_disk["ar_accuracy"] <= 1.0
    assert 0.0 <= on_disk["cell_accuracy"] <= 1.0
    for key in ("tokens_per_second", "tokens_per_second_batch", "ar_tokens_per_second", "speedup_vs_ar"):
        assert isinstance(on_disk[key], float) and on_disk[key] > 0, key
    # a random model never becomes confident: every block runs all 3 steps and commits its 8 positions
    assert on_disk["mean_denoising_steps"] == 3.0
    assert 0 < on_disk["tokens_per_forward"] <= CANVAS
    assert on_disk["device"].startswith("cpu")
    assert on_disk["sampler"]["max_denoising_steps"] == 3
    assert [c["name"] for c in on_disk["checks"]] == ["min_accuracy", "min_speedup", "non_finite_weights"]
    assert all(set(c) >= {"name", "value", "threshold", "passed"} for c in on_disk["checks"])
    assert [p["max_denoising_steps"] for p in on_disk["sweep"]] == [1, 3]
    assert on_disk["sweep"][0]["mean_denoising_steps"] == 1.0

    predictions = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4 and {"prediction", "correct", "reason", "ar_prediction"} <= set(json.loads(predictions[0]))
    for name in ("trajectory.png", "sweep_steps.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert on_disk["plots"] == {"sweep": "sweep_steps.png", "trajectory": "trajectory.png"}


def test_a_failed_gate_writes_passed_false_then_raises_naming_each_failed_check(tiny, gate_settings, tmp_path):
    model, tokenizer, examples = tiny
    reference = tmp_path / "sft" / "verify.json"
    reference.parent.mkdir()
    reference.write_text(json.dumps({"stage": "sft", "metric": "solved", "accuracy": 1.0}))
    cfg = gate_settings(
        *FAST, "verify.plots=false", "verify.min_accuracy=0.9", "verify.max_accuracy_drop=0.1", "verify.min_speedup=1000"
    )
    with pytest.raises(GateFailed) as failed:
        run_gate(model, tokenizer, examples, cfg, "quantize", "/q", tmp_path / "out", reference=reference.parent)

    message = str(failed.value)
    for name in ("min_accuracy", "max_accuracy_drop", "min_speedup"):
        assert name in message
    assert "needs >= 0.9" in message and "needs <= 0.1" in message and "needs >= 1000" in message
    record = json.loads((tmp_path / "out" / "verify.json").read_text())
    assert record["passed"] is False
    assert record["reference"] == {"path": str(reference), "stage": "sft", "accuracy": 1.0}
    assert record["accuracy_drop"] == pytest.approx(1.0 - record["accuracy"])
    assert [(c["name"], c["passed"]) for c in record["checks"]] == [
        ("min_accuracy", False), ("max_accuracy_drop", False), ("metric_can_move", True), ("min_speedup", False),
        ("non_finite_weights", True),
    ]
    assert not (tmp_path / "out" / "trajectory.png").exists()  # verify.plots=false


def test_without_the_ar_baseline_there_is_no_speedup_and_no_speedup_check(tiny, gate_settings, tmp_path):
    model, tokenizer, examples = tiny
    cfg = gate_settings(*FAST, "verify.ar_baseline=false", "verify.plots=false", "verify.speed_examples=1")
    record = run_gate(model, tokenizer, examples, cfg, "eval", "/m", tmp_path, simulated=True, extra={"quant": "fp8"})
    assert record["ar_accuracy"] is None and record["speedup_vs_ar"] is None
    assert [c["name"] for c in record["checks"]] == ["min_accuracy", "non_finite_weights"]
    assert record["simulated"] is True and record["quant"] == "fp8"


def test_an_empty_eval_set_is_a_clear_error(tiny, gate_settings, tmp_path):
    model, tokenizer, _ = tiny
    with pytest.raises(InputError, match="no eval examples"):
        run_gate(model, tokenizer, [], gate_settings(*FAST), "eval", "/m", tmp_path)
    assert not (tmp_path / "verify.json").exists()


def test_prompt_completion_data_is_scored_by_exact_match_and_token_accuracy(tiny, gate_settings, tmp_path):
    from dg_pipeline.data import Example

    model, tokenizer, _ = tiny
    digits = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples = [
        Example([tokenizer.bos_token_id, *digits("12"), tokenizer.sep_token_id], [*digits("21"), tokenizer.eos_token_id],
                {"completion": "21"}),
        Example([tokenizer.bos_token_id, *digits("345"), tokenizer.sep_token_id], [*digits("543"), tokenizer.eos_token_id],
                {"completion": "543"}),
    ]
    cfg = gate_settings(*FAST, "data=chat", "data.train_path=unused.jsonl", "sampler.max_new_tokens=6", "verify.plots=false")
    record = run_gate(model, tokenizer, examples, cfg, "eval", "/m", tmp_path)
    assert record["metric"] == "exact_match" and record["max_new_tokens"] == 6
    assert 0.0 <= record["token_accuracy"] <= 1.0 and 0.0 <= record["ar_token_accuracy"] <= 1.0
    assert "cell_accuracy" not in record


# ---------------------------------------------------------------- per-source / per-clue report, the step curve


def two_source_examples(tokenizer):
    from dg_pipeline.data.independent import independent_boards

    pipeline = sudoku_examples(generate_boards(4, 5, 4, 10, seed=0), tokenizer, eval_source="pipeline")
    independent = sudoku_examples(independent_boards(4, 7, 4, 10, seed=0), tokenizer, eval_source="independent")
    return pipeline + independent


def test_the_record_splits_accuracy_by_source_and_clue_count_and_agrees_with_the_predictions(tiny, gate_settings, tmp_path):
    model, tokenizer, _ = tiny
    examples = two_source_examples(tokenizer)
    cfg = gate_settings(*FAST, "verify.n_eval=null", "verify.plots=false", "verify.sweep_steps=[]")
    record = run_gate(model, tokenizer, examples, cfg, "eval", "/m", tmp_path)
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]

    assert record["n_eval"] == 12 and {s: c["n"] for s, c in record["by_source"].items()} == {"pipeline": 5, "independent": 7}
    for source, rows in (("pipeline", predictions[:5]), ("independent", predictions[5:])):
        cell = record["by_source"][source]
        assert cell["accuracy"] == sum(r["correct"] for r in rows) / len(rows)
        assert cell["ar_accuracy"] == sum(r["ar_correct"] for r in rows) / len(rows)
    by_clues = record["by_stratum"]["clues"]
    assert list(by_clues["independent"]) == [str(k) for k in range(4, 11)]  # one board per clue count
    assert all(c["n"] == 1 for c in by_clues["independent"].values())
    assert sum(c["n"] for c in by_clues["pipeline"].values()) == 5
    clue_counts = [sum(ch != "0" for ch in e.meta["puzzle"]) for e in examples[:5]]
    assert sorted(int(k) for k in by_clues["pipeline"]) == sorted(set(clue_counts))


def test_verify_n_eval_takes_the_first_examples_of_each_source(tiny, gate_settings, tmp_path):
    model, tokenizer, _ = tiny
    cfg = gate_settings(*FAST, "verify.n_eval=2", "verify.plots=false", "verify.sweep_steps=[]", "verify.ar_baseline=false")
    record = run_gate(model, tokenizer, two_source_examples(tokenizer), cfg, "eval", "/m", tmp_path)
    assert {s: c["n"] for s, c in record["by_source"].items()} == {"pipeline": 2, "independent": 2}


def test_the_sweep_runs_exactly_k_steps_next_to_the_adaptive_stop_of_the_sampler_settings(tiny, gate_settings, tmp_path):
    model, tokenizer, _ = tiny
    # An always-confident stop rule with no stability wait: the sampler's own settings stop after one step.
    cfg = gate_settings(*FAST, "verify.n_eval=null", "verify.sweep_steps=[2,3]", "verify.sweep_examples=3",
                      "sampler.stability_threshold=0", "sampler.confidence_threshold=100", "verify.ar_baseline=false")
    record = run_gate(model, tokenizer, two_source_examples(tokenizer), cfg, "eval", "/m", tmp_path)
    assert record["mean_denoising_steps"] == 1.0
    assert [(p["max_denoising_steps"], p["mean_denoising_steps"], p["mode"]) for p in record["sweep"]] == [
        (2, 2.0, "fixed"), (3, 3.0, "fixed")]
    assert all(p["n"] == 6 and set(p["by_source"]) == {"pipeline", "independent"} for p in record["sweep"])
    adaptive = record["sweep_adaptive"]
    assert adaptive["mode"] == "adaptive" and adaptive["max_denoising_steps"] == 3 and adaptive["n"] == 6
    assert adaptive["mean_denoising_steps"] == 1.0
    assert (tmp_path / "sweep_steps.png").read_bytes()[:4] == b"\x89PNG"


def test_the_step_choice_takes_the_fewest_steps_within_the_allowed_loss(tiny, gate_settings):
    from dg_pipeline.verify.step_choice import choose_denoising_steps

    model, tokenizer, examples = tiny
    cfg = gate_settings(*FAST, "verify.sweep_steps=[1,2]", "verify.choose_steps_max_loss=1.0")
    choice = choose_denoising_steps(model, tokenizer, examples, cfg)
    # Any accuracy is within a loss of 1.0: the first budget tried wins, and the curve stops there.
    assert choice.max_denoising_steps == 1 and [p["max_denoising_steps"] for p in choice.curve] == [1]
    assert choice.reference["max_denoising_steps"] == 3 and choice.n == len(examples)
    with pytest.raises(InputError, match=r"verify\.choose_steps_max_loss=2"):
        gate_settings(*FAST, "verify.choose_steps_max_loss=2")
