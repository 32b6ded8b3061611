"""The command line: `python -m dg_pipeline` composes conf/ + recipes/ and rejects bad input clearly."""

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException


def test_an_unknown_recipe_lists_the_valid_recipes(compose_cfg):
    with pytest.raises(MissingConfigException) as e:
        compose_cfg("recipe=nope")
    assert "sudoku4" in str(e.value) or "sudoku4" in str(e.value.options)


def test_an_unknown_key_is_refused(compose_cfg):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("trainer.no_such_key=1")
    assert "no_such_key" in str(e.value.__cause__ or e.value)


def test_recipes_are_whole_run_presets(compose_cfg):
    cfg = compose_cfg("recipe=sudoku9")
    assert (cfg.model.init, cfg.data.size, cfg.trainer.precision) == ("sudoku9", 9, "bf16-mixed")
    assert compose_cfg().model.init == "sudoku4"  # the embedded default


def test_the_cli_names_the_valid_stages_for_an_unknown_stage(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dg_pipeline", "stage=nope", f"run_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "stage=nope: unknown stage; choose one of base, pretrain, sft" in proc.stderr
