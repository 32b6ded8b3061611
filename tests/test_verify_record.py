"""Gate checks and the verify.json record: thresholds from config, the reference record, the failure message."""

import json

import pytest

from dg_pipeline.core.errors import GateFailed, InputError
from dg_pipeline.verify.record import (
    REQUIRED_KEYS,
    GateThresholds,
    finalize_record,
    gate_checks,
    load_reference,
    raise_if_failed,
    write_record,
)


def a_record(**overrides):
    record = {k: None for k in REQUIRED_KEYS}
    record.update(stage="sft", input="/m", metric="solved", accuracy=0.5, n_eval=10, device="cpu", batch_size=4)
    record.update(overrides)
    return record


def test_default_config_thresholds_only_require_a_non_negative_accuracy(gate_settings):
    t = gate_settings("stage=sft").thresholds
    assert t == GateThresholds(min_accuracy=0.0, max_accuracy_drop=None, min_speedup=0.0, drop_confidence=0.95)


def test_a_quantize_gate_takes_the_formats_allowed_drop_unless_verify_sets_one(gate_settings):
    assert gate_settings("quant=nvfp4", own_allowance="quant").thresholds.max_accuracy_drop == 0.02
    assert gate_settings("quant=fp8", own_allowance="quant").thresholds.max_accuracy_drop == 0.005
    explicit = gate_settings("quant=nvfp4", "verify.max_accuracy_drop=0.1", own_allowance="quant")
    assert explicit.thresholds.max_accuracy_drop == 0.1
    assert gate_settings("quant=nvfp4").thresholds.max_accuracy_drop is None  # sft has no allowance of its own


def test_a_speedup_floor_without_the_ar_baseline_is_a_config_error(gate_settings):
    with pytest.raises(InputError, match="verify.min_speedup=1.5.*verify.ar_baseline=true"):
        gate_settings("verify.min_speedup=1.5", "verify.ar_baseline=false")


def test_an_accuracy_floor_outside_0_1_is_a_config_error(gate_settings):
    with pytest.raises(InputError, match="verify.min_accuracy=80"):
        gate_settings("verify.min_accuracy=80")


def test_all_checks_pass_when_every_value_meets_its_threshold():
    checks = gate_checks(0.8, 2.0, GateThresholds(0.8, 0.05, 1.5), reference={"accuracy": 0.84, "metric": "solved"})
    assert [(c.name, c.passed) for c in checks] == [
        ("min_accuracy", True), ("max_accuracy_drop", True), ("metric_can_move", True), ("min_speedup", True)
    ]


@pytest.mark.parametrize("allow_flat", [False, True])
def test_a_drop_check_against_a_reference_that_solved_nothing_is_not_certified_silently(allow_flat):
    # 0 before and 0 after: the drop check passes whatever the model became.
    checks = {c.name: c for c in gate_checks(0.0, None, GateThresholds(max_accuracy_drop=0.02,
                                                                       allow_flat_metric=allow_flat),
                                             reference={"accuracy": 0.0, "metric": "exact_match"})}
    assert checks["max_accuracy_drop"].passed is True
    assert checks["metric_can_move"].value is False and checks["metric_can_move"].passed is allow_flat
    assert "got no example right" in checks["metric_can_move"].describe()


def test_accuracy_below_the_floor_fails_min_accuracy():
    (check, *_) = gate_checks(0.3, None, GateThresholds(min_accuracy=0.5))
    assert (check.name, check.value, check.threshold, check.passed) == ("min_accuracy", 0.3, 0.5, False)


def test_a_drop_larger_than_allowed_fails_max_accuracy_drop():
    checks = gate_checks(0.70, None, GateThresholds(max_accuracy_drop=0.02), reference={"accuracy": 0.80})
    drop = checks[1]
    assert drop.name == "max_accuracy_drop" and not drop.passed
    assert drop.value == pytest.approx(0.10) and drop.threshold == 0.02


def test_a_slower_than_required_speedup_fails_min_speedup():
    checks = gate_checks(0.9, 1.2, GateThresholds(min_speedup=2.0))
    assert checks[-1].name == "min_speedup" and not checks[-1].passed


def test_a_missing_speedup_fails_a_positive_speedup_floor():
    assert not gate_checks(0.9, None, GateThresholds(min_speedup=2.0))[-1].passed


def test_the_reference_is_read_from_a_verify_json_or_its_directory(tmp_path):
    write_record(tmp_path / "sft", finalize_record(a_record(accuracy=0.75), []))
    for source in (tmp_path / "sft", tmp_path / "sft" / "verify.json"):
        ref = load_reference(None, source, "solved")
        assert ref["accuracy"] == 0.75 and ref["path"].endswith("sft/verify.json")


def test_verify_reference_overrides_the_reference_the_stage_passes(tmp_path):
    write_record(tmp_path / "a", finalize_record(a_record(accuracy=0.1), []))
    write_record(tmp_path / "b", finalize_record(a_record(accuracy=0.9), []))
    assert load_reference(str(tmp_path / "b"), tmp_path / "a", "solved")["accuracy"] == 0.9


def test_a_missing_reference_names_the_key_and_the_fix(tmp_path):
    with pytest.raises(InputError, match=r"verify.reference=.*nope.*run the reference stage first"):
        load_reference(str(tmp_path / "nope"), None, "solved")


def test_a_reference_of_another_task_is_refused(tmp_path):
    write_record(tmp_path, finalize_record(a_record(metric="exact_match"), []))
    with pytest.raises(InputError, match="'exact_match' but this gate measures 'solved'"):
        load_reference(None, tmp_path, "solved")


def test_a_failed_record_raises_gate_failed_naming_each_failed_check_and_its_value(tmp_path):
    record = finalize_record(a_record(), gate_checks(0.5, 1.1, GateThresholds(min_accuracy=0.6, min_speedup=1.0)))
    path = write_record(tmp_path, record)
    assert json.loads(path.read_text())["passed"] is False
    with pytest.raises(GateFailed) as err:
        raise_if_failed(record, path)
    msg = str(err.value)
    assert "min_accuracy: 0.5 (needs >= 0.6)" in msg
    assert "min_speedup" not in msg  # it passed
    assert str(path) in msg


def test_write_record_is_atomic_and_leaves_no_temporary_files(tmp_path):
    write_record(tmp_path, finalize_record(a_record(), []))
    assert [p.name for p in tmp_path.iterdir()] == ["verify.json"]


def test_two_boards_lost_by_chance_pass_a_one_board_allowance_but_a_real_drop_fails():
    from dg_pipeline.verify.record import GateThresholds, PairedDrop, gate_checks

    thresholds = GateThresholds(max_accuracy_drop=0.005, drop_confidence=0.95)
    reference = {"accuracy": 0.9133, "metric": "solved"}
    ref = [True] * 274 + [False] * 26
    noise = [True] * 272 + [False] * 28  # 2 of 300 boards flipped to wrong: raw drop 0.0067
    collapse = [True] * 250 + [False] * 50  # 24 boards lost
    ok = gate_checks(272 / 300, None, thresholds, reference, PairedDrop.from_verdicts(ref, noise))
    bad = gate_checks(250 / 300, None, thresholds, reference, PairedDrop.from_verdicts(ref, collapse))
    assert [c.passed for c in ok if c.name == "max_accuracy_drop"] == [True]
    assert [c.passed for c in bad if c.name == "max_accuracy_drop"] == [False]
    # drop_confidence=0 checks the raw drop, as before
    raw = gate_checks(272 / 300, None, GateThresholds(max_accuracy_drop=0.005), reference,
                      PairedDrop.from_verdicts(ref, noise))
    assert [c.passed for c in raw if c.name == "max_accuracy_drop"] == [False]


def test_verdicts_of_different_example_sets_are_not_paired():
    from dg_pipeline.verify.record import PairedDrop

    assert PairedDrop.from_verdicts([True, False], [True]) is None
