"""stage=eval: a model dir + eval data -> <run_dir>/eval/verify.json, plots; bad inputs are one clear error."""

import json

import pytest

from dg_pipeline.core.errors import GateFailed, InputError
from dg_pipeline.data import build_board_tokenizer, generate_boards, write_boards_jsonl
from dg_pipeline.model.configs import build_model
from dg_pipeline.model.io import save_model
from dg_pipeline.stages import eval as eval_stage

FAST = ("verify.batch_size=3", "verify.speed_examples=1", "sampler.max_denoising_steps=2", "logger=none")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = build_board_tokenizer()
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(build_model("tiny", tokenizer, 32, seed=0), tokenizer, path)
    return path


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    return write_boards_jsonl(tmp_path_factory.mktemp("data") / "eval.jsonl", generate_boards(4, 3, 4, 10, seed=1))


def test_eval_scores_the_given_model_on_data_eval_path(compose_cfg, tmp_path, model_dir, eval_file):
    cfg = compose_cfg("stage=eval", f"run_dir={tmp_path}", f"input={model_dir}", f"data.eval_path={eval_file}", *FAST)
    record = eval_stage.run(cfg)
    on_disk = json.loads((tmp_path / "eval" / "verify.json").read_text())
    assert on_disk["passed"] is True and record["passed"] is True
    assert on_disk["stage"] == "eval" and on_disk["input"] == str(model_dir)
    assert on_disk["metric"] == "solved"
    # The file's boards, then as many of the independent held-out boards, each source reported apart.
    assert on_disk["n_eval"] == 6 and {s: c["n"] for s, c in on_disk["by_source"].items()} == {"file": 3, "independent": 3}
    assert on_disk["reference"] is None  # the model dir has no gate record next to it
    assert (tmp_path / "eval" / "trajectory.png").exists()
    assert not (tmp_path / "data").exists()  # an eval file needs no generated training data


def test_eval_defaults_to_the_runs_sft_model_and_holds_it_to_the_sft_record(compose_cfg, tmp_path, model_dir):
    import shutil

    shutil.copytree(model_dir, tmp_path / "sft" / "model")
    (tmp_path / "sft" / "verify.json").write_text(json.dumps({"stage": "sft", "metric": "solved", "accuracy": 0.9}))
    cfg = compose_cfg(
        "stage=eval", f"run_dir={tmp_path}", "data.n_train=4", "data.n_val=0", "data.n_eval=3",
        "verify.max_accuracy_drop=0.05", *FAST,
    )
    with pytest.raises(GateFailed, match=r"max_accuracy_drop: 0\.9 \(needs <= 0\.05\)"):
        eval_stage.run(cfg)
    record = json.loads((tmp_path / "eval" / "verify.json").read_text())
    assert record["passed"] is False and record["input"] == str(tmp_path / "sft" / "model")
    assert record["reference"]["path"] == str(tmp_path / "sft" / "verify.json")
    assert (tmp_path / "data" / "eval.jsonl").exists()  # the run's generated eval split


def test_a_missing_eval_file_is_one_error_naming_the_path(compose_cfg, tmp_path, model_dir):
    cfg = compose_cfg("stage=eval", f"run_dir={tmp_path}", f"input={model_dir}", "data.eval_path=/no/such.jsonl", *FAST)
    with pytest.raises(InputError, match=r"/no/such.jsonl: file not found .*data.eval_path"):
        eval_stage.run(cfg)
    assert not (tmp_path / "eval").exists()


def test_a_bad_board_in_the_eval_file_names_its_line(compose_cfg, tmp_path, model_dir):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"puzzle": "1030040020000301", "solution": "1234341221434321"}\n{"puzzle": "12", "solution": "x"}\n')
    cfg = compose_cfg("stage=eval", f"run_dir={tmp_path}", f"input={model_dir}", f"data.eval_path={bad}", *FAST)
    with pytest.raises(InputError, match=rf"{bad}:2: "):
        eval_stage.run(cfg)


def test_without_an_sft_model_the_error_says_which_stage_to_run(compose_cfg, tmp_path):
    with pytest.raises(InputError, match=r"run `stage=sft .*or pass input=<dir>"):
        eval_stage.run(compose_cfg("stage=eval", f"run_dir={tmp_path}", *FAST))
