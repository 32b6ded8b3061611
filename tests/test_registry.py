"""The stage registry is the one table of stages: the CLI, the run-dir layout, the fingerprints, the gate tables and
stage=all derive from it; one rule decides when a stage reuses its output."""

from pathlib import Path

import pytest

from dg_pipeline.core.registry import NEVER, REUSE, STAGE_ORDER, STAGES, decide_reuse
from dg_pipeline.core.rundir import RunDir

PIPELINE_DIR = Path(__file__).resolve().parents[1] / "dg_pipeline"


def test_every_stage_the_cli_offers_has_a_registry_row_and_a_module():
    from dg_pipeline.stages import RUNNERS
    from dg_pipeline.stages import STAGES as CLI_STAGES

    assert set(CLI_STAGES) == set(STAGES) | {"all"}
    assert set(RUNNERS) == set(STAGES)
    for name in STAGES:
        assert (PIPELINE_DIR / "stages" / f"{name}.py").is_file()
        assert RUNNERS[name].__module__ == f"dg_pipeline.stages.{name}"


def test_the_conf_comment_lists_the_cli_stages():
    config = (PIPELINE_DIR.parent / "conf" / "config.yaml").read_text()
    assert "# Which stage to run: " + " | ".join([*STAGES, "all"]) in config


def test_every_provider_is_an_earlier_stage_and_the_chain_reaches_base():
    for spec in STAGES.values():
        if spec.provider is not None:
            assert STAGE_ORDER.index(spec.provider) < STAGE_ORDER.index(spec.name)
    chain, stage = [], "check"
    while stage is not None:
        chain.append(stage)
        stage = STAGES[stage].provider
    assert chain == ["check", "export", "quantize", "sft", "pretrain", "base"]


def test_sft_starts_from_pretrain_when_it_ran_and_from_base_otherwise(tmp_path):
    rd = RunDir(tmp_path)
    (tmp_path / "base" / "model").mkdir(parents=True)
    assert rd.provider("sft") == "base" and rd.resolve_input("sft", None) == tmp_path / "base" / "model"
    (tmp_path / "pretrain" / "model").mkdir(parents=True)
    assert rd.provider("sft") == "pretrain" and rd.resolve_input("sft", None) == tmp_path / "pretrain" / "model"


def test_a_missing_input_names_the_stage_that_provides_it(tmp_path):
    from dg_pipeline.core.errors import InputError

    with pytest.raises(InputError, match=r"stage=quantize needs .*sft/model.*run `stage=sft run_dir="):
        RunDir(tmp_path).resolve_input("quantize", None)


def test_fingerprint_keys_are_config_groups(compose_cfg):
    cfg = compose_cfg()
    for spec in STAGES.values():
        assert all(key in cfg for key in spec.fingerprint_keys), spec.name


def test_the_gate_tables_list_stages_in_registry_order():
    from dg_pipeline.verify.report import load_stage_records

    records = {f"{name}": {"stage": name} for name in reversed(STAGE_ORDER)}
    assert [label for label, _ in load_stage_records(records)] == list(STAGE_ORDER)


def test_every_stage_with_an_output_reuses_it_by_the_one_rule_or_says_why_not():
    for spec in STAGES.values():
        if spec.output is None:
            continue
        assert (spec.reuse == REUSE and spec.gate_record is not None) or (spec.reuse == NEVER and spec.why_never), \
            spec.name
    assert {s.name for s in STAGES.values() if s.reuse == REUSE} == {"base", "pretrain", "sft", "quantize"}


def test_an_output_is_reused_only_when_it_its_passed_gate_record_and_its_fingerprint_all_match(tmp_path):
    out = tmp_path / "out"
    evidence = dict(gate_record={"passed": True}, fingerprint={"trainer": "a", "input": "b"},
                    recorded_fingerprint={"trainer": "a", "input": "b"})
    assert "does not exist" in decide_reuse(REUSE, out, **evidence).reason
    out.mkdir()
    assert decide_reuse(REUSE, out, **evidence).skip
    forced = decide_reuse(REUSE, out, force=True, **evidence)
    assert not forced.skip and forced.reason == "force=true"
    no_record = decide_reuse(REUSE, out, **{**evidence, "gate_record": None})
    assert not no_record.skip and "no gate record" in no_record.reason
    failed = decide_reuse(REUSE, out, **{**evidence, "gate_record": {"passed": False}})
    assert not failed.skip and "failed gate" in failed.reason
    settings = decide_reuse(REUSE, out, **{**evidence, "recorded_fingerprint": {"trainer": "x", "input": "b"}})
    assert not settings.skip and settings.reason.endswith("was made with other trainer settings")
    moved = decide_reuse(REUSE, out, **{**evidence, "recorded_fingerprint": {"trainer": "a", "input": "c"}})
    assert not moved.skip and moved.reason.endswith("was made with another input")
    assert not decide_reuse(NEVER, out, **evidence).skip


def test_the_architecture_doc_opens_with_the_registry_as_it_is():
    from dg_pipeline.core.registry import registry_markdown

    assert registry_markdown() in (PIPELINE_DIR.parent / "docs" / "ARCHITECTURE.md").read_text()
