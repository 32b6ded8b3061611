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
    assert [c["name"] for c in on_disk["checks"]] == ["min_accuracy", "min_speedup"]
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
    assert [c["passed"] for c in record["checks"]] == [False, False, False]
    assert not (tmp_path / "out" / "trajectory.png").exists()  # verify.plots=false


def test_without_the_ar_baseline_there_is_no_speedup_and_no_speedup_check(tiny, gate_settings, tmp_path):
    model, tokenizer, examples = tiny
    cfg = gate_settings(*FAST, "verify.ar_baseline=false", "verify.plots=false", "verify.speed_examples=1")
    record = run_gate(model, tokenizer, examples, cfg, "eval", "/m", tmp_path, simulated=True, extra={"quant": "fp8"})
    assert record["ar_accuracy"] is None and record["speedup_vs_ar"] is None
    assert [c["name"] for c in record["checks"]] == ["min_accuracy"]
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
