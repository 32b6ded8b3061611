"""stage=all: the chain it plans, and when it reruns a stage (its config keys or its input changed)."""

from dg_pipeline.stages.all import is_up_to_date, plan, stage_fingerprint, state_file
from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.core.rundir import RunDir


def test_the_default_chain_is_base_sft_then_quantize_and_export_per_format(compose_cfg, tmp_path):
    steps = plan(compose_cfg(f"run_dir={tmp_path}"))
    assert [s.label for s in steps] == [
        "base", "sft", "quantize[fp8]", "export[fp8]", "quantize[nvfp4]", "export[nvfp4]",
    ]
    export_nvfp4 = steps[-1]
    assert export_nvfp4.cfg.quant.name == "nvfp4" and export_nvfp4.cfg.export.name == "nvfp4"
    assert export_nvfp4.cfg.quant.max_accuracy_drop == 0.02  # conf/quant/nvfp4.yaml, not fp8's 0.005


def test_pretrain_joins_the_chain_when_it_has_steps(compose_cfg, tmp_path):
    steps = plan(compose_cfg(f"run_dir={tmp_path}", "trainer.pretrain_steps=10"))
    assert [s.label for s in steps][:3] == ["base", "pretrain", "sft"]


def test_a_changed_training_key_reruns_sft_and_everything_downstream_but_not_base(compose_cfg, tmp_path):
    before = {s.label: s.fingerprint for s in plan(compose_cfg(f"run_dir={tmp_path}"))}
    after = {s.label: s.fingerprint for s in plan(compose_cfg(f"run_dir={tmp_path}", "trainer.lr=1e-3"))}
    assert before["base"] == after["base"]
    assert all(before[k] != after[k] for k in before if k != "base")


def test_a_changed_calibration_key_only_reruns_quantize_and_export(compose_cfg, tmp_path):
    before = {s.label: s.fingerprint for s in plan(compose_cfg(f"run_dir={tmp_path}"))}
    after = {s.label: s.fingerprint for s in plan(compose_cfg(f"run_dir={tmp_path}", "calib.n_samples=7"))}
    assert [k for k in before if before[k] != after[k]] == [
        "quantize[fp8]", "export[fp8]", "quantize[nvfp4]", "export[nvfp4]",
    ]


def test_a_stage_is_up_to_date_only_with_its_output_its_passed_gate_and_the_same_fingerprint(compose_cfg, tmp_path):
    cfg = compose_cfg(f"run_dir={tmp_path}")
    rd, base = RunDir.from_cfg(cfg), plan(cfg)[0]
    assert not is_up_to_date(rd, base)
    base.output.mkdir(parents=True)
    atomic_write_json(state_file(rd, base), {"fingerprint": base.fingerprint})
    assert not is_up_to_date(rd, base)  # no gate record: its gate never finished
    atomic_write_json(rd.verify_json("base"), {"stage": "base", "passed": False})
    assert not is_up_to_date(rd, base)
    atomic_write_json(rd.verify_json("base"), {"stage": "base", "passed": True})
    assert is_up_to_date(rd, base)
    atomic_write_json(state_file(rd, base), {"fingerprint": stage_fingerprint(cfg, "base", "other input")})
    assert not is_up_to_date(rd, base)


def test_a_quant_override_on_the_command_line_reaches_every_format(compose_cfg, tmp_path):
    steps = plan(compose_cfg(f"run_dir={tmp_path}", "quant.kv_cache=fp8", "quant.exclude=[*q_proj*]"))
    quantize = [s for s in steps if s.stage == "quantize"]
    assert [s.cfg.quant.name for s in quantize] == ["fp8", "nvfp4"]
    assert all(s.cfg.quant.kv_cache == "fp8" and list(s.cfg.quant.exclude) == ["*q_proj*"] for s in quantize)
    assert [s.cfg.quant.max_accuracy_drop for s in quantize] == [0.005, 0.02]  # untouched keys stay per format


def test_text_calibration_runs_and_exports_the_text_calibrated_outputs(compose_cfg, tmp_path):
    steps = plan(compose_cfg(f"run_dir={tmp_path}", "calib=text"))
    assert [s.label for s in steps][2:] == [
        "quantize[fp8-text]", "export[fp8-text]", "quantize[nvfp4-text]", "export[nvfp4-text]",
    ]
    export_nvfp4 = steps[-1]
    assert export_nvfp4.cfg.input == str(tmp_path / "quantize" / "nvfp4-text")
    assert export_nvfp4.output == tmp_path / "export" / "nvfp4-text"


def test_adding_a_format_does_not_rerun_the_formats_already_done(compose_cfg, tmp_path):
    one = {s.label: s.fingerprint for s in plan(compose_cfg(f"run_dir={tmp_path}", "quant.formats=[fp8]"))}
    two = {s.label: s.fingerprint for s in plan(compose_cfg(f"run_dir={tmp_path}"))}
    assert one == {k: two[k] for k in one}
