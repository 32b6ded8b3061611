"""W&B tracking: every stage output becomes an artifact whose metadata links it to its input (offline too)."""

import time

from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.tracking import artifact_name, flat_metrics, track_stage


def test_verify_records_flatten_to_scalar_metrics():
    record = {"stage": "sft", "accuracy": 0.9, "passed": True, "checks": [{"name": "min_accuracy", "value": 0.9}]}
    assert flat_metrics(record, "sft") == {"sft/accuracy": 0.9, "sft/passed": 1.0, "sft/check/min_accuracy": 0.9}


def test_an_offline_stage_run_logs_metrics_and_an_artifact_derived_from_its_input(compose_cfg, tmp_path):
    cfg = compose_cfg(f"run_dir={tmp_path / 'run1'}")
    out = tmp_path / "run1" / "sft" / "model"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    atomic_write_json(out.parent / "verify.json", {"stage": "sft", "accuracy": 0.75, "passed": True, "checks": []})

    name = track_stage(cfg, "sft", out, upstream=artifact_name(tmp_path / "run1", "base"))

    assert name == "run1-sft"
    runs = list((tmp_path / "run1" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The offline run's record (synced later by `wandb sync`) holds the metric and the artifact's lineage metadata.
    record = _offline_record(runs[0], must_contain=b"run1-sft")
    assert b"sft/accuracy" in record
    assert b"run1-sft" in record and b"derived_from" in record and b"run1-base" in record


def _offline_record(run_dir, must_contain: bytes, timeout_s: float = 20.0) -> bytes:
    # wandb-core appends to the offline record asynchronously, shortly after finish() returns.
    deadline = time.monotonic() + timeout_s
    path = run_dir / f"run-{run_dir.name.rsplit('-', 1)[1]}.wandb"
    while True:
        record = path.read_bytes()
        if must_contain in record or time.monotonic() > deadline:
            return record
        time.sleep(0.2)
