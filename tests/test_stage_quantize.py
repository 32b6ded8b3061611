"""stage=quantize end to end on a tiny DiffusionGemma: artifacts, quant.json, the gate, mto.restore, bad input."""

import json
import shutil

import pytest

from dg_pipeline.core import RunDir
from dg_pipeline.core.errors import GateFailed, InputError
from dg_pipeline.data import load_splits
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.model import build_model, load_model, save_model
from dg_pipeline.quant import LogitsErrorProbe, restore_quantized
from helpers import write_sft_gate

FAST = [
    "model=tiny", "device=cpu", "logger=none",
    "data.n_train=16", "data.n_val=0", "data.n_eval=4",
    "calib.n_samples=4", "calib.batch_size=4", "quant.probe_prompts=2",
    "sampler.max_denoising_steps=4",
    "verify.ar_baseline=false", "verify.speed_examples=1", "verify.plots=false",
    "verify.allow_flat_metric=true",  # a random tiny model solves nothing: the drop check cannot fail
    "quant.max_logits_error=0.5",  # its logits error (fp8 0.15) is far above a trained model's (0.012)
]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    tokenizer = build_board_tokenizer()
    out = tmp_path_factory.mktemp("sft") / "model"
    save_model(build_model("tiny", tokenizer, canvas_length=32, seed=0), tokenizer, out)
    write_sft_gate(out, *FAST)  # the record the quantize gate's drop is measured against
    return out


def run_quantize(compose_cfg, run_dir, *overrides):
    from dg_pipeline.stages import quantize

    return quantize.run(compose_cfg("stage=quantize", f"run_dir={run_dir}", *FAST, *overrides))


def test_fp8_writes_the_modelopt_state_quant_json_and_a_simulated_gate_and_restores_onto_the_sft_model(
    compose_cfg, sft_dir, tmp_path
):
    run_quantize(compose_cfg, tmp_path, "quant=fp8", f"input={sft_dir}")
    out = tmp_path / "quantize" / "fp8"
    assert {"modelopt_state.pth", "quant.json", "verify.json", ".quant_summary.txt"} <= {p.name for p in out.iterdir()}

    record = json.loads((out / "quant.json").read_text())
    assert record["format"] == "fp8" and record["kv_cache"] == "none" and record["base_model_dir"] == str(sft_dir)
    assert record["calibration"]["mode"] == "diffusion" and record["calibration"]["n_samples"] == 4
    assert record["calibration"]["passes"]["self_conditioned_passes"] > 0 and record["calibration_seconds"] > 0
    assert record["experts"]["covered"] == record["experts"]["experts"] == 8
    assert "*lm_head*" in record["exclusions"] and "*self_conditioning*" in record["exclusions"]
    assert "model.decoder.self_conditioning.gate_proj" in record["excluded_modules"]
    assert 0 < record["logits_relative_error"] < 1

    verify = json.loads((out / "verify.json").read_text())
    assert verify["stage"] == "quantize" and verify["simulated"] is True and verify["quant"] == "fp8"
    # Fake-quantized speed is no deployment figure: by default the gate scores accuracy and times nothing.
    assert verify["timed"] is False and verify["tokens_per_second"] is None and verify["speedup_vs_ar"] is None
    assert verify["ar_accuracy"] is None and verify["fixed_step_benchmark"] is None and verify["speed"]["rounds"] == 0
    assert verify["accuracy"] is not None and verify["tokens_per_forward"] > 0

    # mto.restore onto the SFT model reproduces the calibrated model: the same probe gives the recorded error.
    model, tokenizer, _ = restore_quantized(out)
    base, _ = load_model(sft_dir)
    cfg = compose_cfg(*FAST, f"run_dir={tmp_path}")
    prompts = [e.prompt_ids for e in load_splits(cfg.data, tokenizer, RunDir(tmp_path), int(cfg.seed)).eval[:2]]
    probe = LogitsErrorProbe(base, prompts, int(cfg.seed))
    assert probe.error(model)["logits_relative_error"] == pytest.approx(record["logits_relative_error"], rel=1e-6)


def test_time_simulated_adds_the_ar_baseline_and_timing_to_the_quantize_gate(compose_cfg, sft_dir, tmp_path):
    run_quantize(compose_cfg, tmp_path, "quant=fp8", f"input={sft_dir}", "verify.time_simulated=true",
                 "verify.ar_baseline=true", "verify.speed_confidence=0", "verify.speed_rounds=1")
    verify = json.loads((tmp_path / "quantize" / "fp8" / "verify.json").read_text())
    assert verify["timed"] is True and verify["simulated"] is True
    assert verify["tokens_per_second"] > 0 and verify["speedup_vs_ar"] > 0 and verify["ar_accuracy"] is not None


def test_a_speedup_floor_on_an_untimed_quantize_gate_is_refused_naming_the_key(compose_cfg, sft_dir, tmp_path):
    with pytest.raises(InputError, match="verify.time_simulated=true"):
        run_quantize(compose_cfg, tmp_path, "quant=fp8", f"input={sft_dir}", "verify.ar_baseline=true",
                     "verify.min_speedup=1.0")
    assert not (tmp_path / "quantize" / "fp8").exists()  # refused before calibrating: nothing written


def test_nvfp4_below_the_sft_accuracy_fails_the_gate_after_writing_verify_json(compose_cfg, sft_dir, tmp_path):
    # An SFT record the random tiny model cannot match: the drop check (quant.max_accuracy_drop=0.02) must fail.
    sft_record = {"stage": "sft", "metric": "solved", "accuracy": 1.0}
    shutil.copytree(sft_dir, tmp_path / "sft" / "model")
    (tmp_path / "sft" / "verify.json").write_text(json.dumps(sft_record))
    with pytest.raises(GateFailed):
        run_quantize(compose_cfg, tmp_path, "quant=nvfp4")
    out = tmp_path / "quantize" / "nvfp4"
    verify = json.loads((out / "verify.json").read_text())
    drop = [c for c in verify["checks"] if "drop" in c["name"]]
    assert verify["passed"] is False and drop and drop[0]["threshold"] == 0.02
    assert json.loads((out / "quant.json").read_text())["nvfp4_backend"] == "dg_nvfp4_emulated"


def test_text_calibration_of_quantized_self_conditioning_is_refused(compose_cfg, sft_dir, tmp_path):
    with pytest.raises(InputError, match="calib.mode=diffusion or quant.self_conditioning=false"):
        run_quantize(compose_cfg, tmp_path, "quant=fp8", "calib=text", "quant.self_conditioning=true", f"input={sft_dir}")


def test_without_an_sft_model_the_error_names_the_stage_to_run(compose_cfg, tmp_path):
    with pytest.raises(InputError, match="stage=sft"):
        run_quantize(compose_cfg, tmp_path, "quant=fp8")


def test_an_sft_model_without_a_gate_record_is_refused_before_calibration(compose_cfg, sft_dir, tmp_path):
    """No verify.json beside the input: the drop allowance would compare with nothing and pass on min_accuracy."""
    bare = tmp_path / "bare" / "model"
    shutil.copytree(sft_dir, bare)
    with pytest.raises(InputError) as refused:
        run_quantize(compose_cfg, tmp_path / "run", "quant=fp8", f"input={bare}")
    message = str(refused.value)
    assert str(bare) in message and "no gate record" in message
    assert "verify.reference=" in message and "quant.max_accuracy_drop=null" in message
    assert not (tmp_path / "run" / "quantize").exists()  # nothing calibrated, nothing written

    # the documented way out: an absolute floor instead of a drop
    run_quantize(compose_cfg, tmp_path / "run", "quant=fp8", f"input={bare}", "quant.max_accuracy_drop=null")
    assert (tmp_path / "run" / "quantize" / "fp8" / "verify.json").exists()


def test_a_rerun_reuses_a_passed_output_only_with_the_same_settings_and_input(compose_cfg, sft_dir, tmp_path):
    first = run_quantize(compose_cfg, tmp_path, "quant=fp8", f"input={sft_dir}")
    assert "skipped" not in first
    assert run_quantize(compose_cfg, tmp_path, "quant=fp8", f"input={sft_dir}")["skipped"]

    changed = run_quantize(compose_cfg, tmp_path, "quant=fp8", "quant.kv_cache=fp8", f"input={sft_dir}")
    assert "skipped" not in changed and changed["kv_cache"] == "fp8"
    record = json.loads((tmp_path / "quantize" / "fp8" / "quant.json").read_text())
    assert record["kv_cache"] == "fp8" and record["fingerprint"] == changed["fingerprint"] != first["fingerprint"]


@pytest.mark.parametrize("objective, all_mask_canvases", [("masked", True), ("uniform", False)])
def test_calibration_samples_the_canvas_the_run_was_trained_for(compose_cfg, objective, all_mask_canvases):
    """A masked model is calibrated on <mask> canvases, as its gate and inference run it (not on uniform noise)."""
    from dg_pipeline.data import generate_boards, sudoku_examples
    from dg_pipeline.settings import RunSettings
    from dg_pipeline.stages.quantize import forward_loop

    tokenizer = build_board_tokenizer()
    model = build_model("tiny", tokenizer, canvas_length=17, seed=0)
    examples = sudoku_examples(generate_boards(4, 4, 4, 10, seed=0), tokenizer)
    settings = RunSettings.from_cfg(compose_cfg(*FAST, f"objective={objective}", "sampler.max_denoising_steps=2"))
    loop, recorded = forward_loop(settings, model, tokenizer, examples)
    assert recorded["canvas_init"] == ("mask" if objective == "masked" else "uniform")

    rows = []
    hook = model.model.decoder.embed_tokens.register_forward_pre_hook(lambda _m, args: rows.extend(args[0].tolist()))
    try:
        loop(model)
    finally:
        hook.remove()
    mask_canvases = [r for r in rows if len(r) == 17 and set(r) == {tokenizer.mask_token_id}]
    assert bool(mask_canvases) is all_mask_canvases


def test_the_gate_bounds_the_logits_error_and_refuses_a_metric_that_cannot_move(compose_cfg, sft_dir, tmp_path):
    # The random tiny model solves no board: its SFT record is 0, so 0 after quantization passes any drop allowance.
    with pytest.raises(GateFailed, match=r"metric_can_move: False .*the reference gate got no example right"):
        run_quantize(compose_cfg, tmp_path / "flat", "quant=fp8", f"input={sft_dir}", "verify.allow_flat_metric=false")
    verify = json.loads((tmp_path / "flat" / "quantize" / "fp8" / "verify.json").read_text())
    checks = {c["name"]: c for c in verify["checks"]}
    assert verify["accuracy"] == 0.0 and checks["max_accuracy_drop"]["passed"] is True  # what used to pass alone
    assert checks["metric_can_move"] == {"name": "metric_can_move", "value": False, "threshold": True, "op": "is",
                                         "passed": False}
    assert checks["max_logits_error"]["passed"] is True and checks["max_logits_error"]["threshold"] == 0.5

    # Allowed, the flat metric is still recorded as such; a logits error above the bound fails the gate.
    with pytest.raises(GateFailed, match=r"max_logits_error: [0-9.e-]+ \(needs <= 1e-06\)"):
        run_quantize(compose_cfg, tmp_path / "bound", "quant=fp8", f"input={sft_dir}", "quant.max_logits_error=1e-6")
    verify = json.loads((tmp_path / "bound" / "quantize" / "fp8" / "verify.json").read_text())
    checks = {c["name"]: c for c in verify["checks"]}
    assert checks["metric_can_move"]["value"] is False and checks["metric_can_move"]["passed"] is True
    assert checks["max_logits_error"]["value"] == verify["logits_relative_error"] > 1e-6
