"""Stages export and check, end to end on a tiny model: a real quantize output -> a bundle that passes the
loader rules, reloads in plain torch and passes its gate; an existing bundle is never overwritten by accident;
a bundle breaking a loader rule is never published; stage=check reports every violation and fails."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.export import CheckFailed, check_export, load_export
from dg_pipeline.model import build_model, save_model
from helpers import write_sft_gate

# Small enough for 2 CPU cores: a tiny untrained model, 4 eval boards, 4 denoising steps.
FAST = [
    "model=tiny", "logger=none", "device=cpu",
    "data.n_train=32", "data.n_val=4", "data.n_eval=4",
    "calib.n_samples=4", "calib.batch_size=4", "verify.batch_size=4", "sampler.max_denoising_steps=4",
    "verify.ar_baseline=false", "verify.plots=false",
    "verify.allow_flat_metric=true",  # a random tiny model solves nothing: the drop check cannot fail
    "quant.max_logits_error=0.5",  # its logits error (fp8 0.15) is far above a trained model's (0.012)
]


def new_run(root: Path) -> Path:
    """A run with an 'SFT' model dir and its gate (a tiny random model: the stages do not care that it is untrained)."""
    tokenizer = build_board_tokenizer()
    save_model(build_model("tiny", tokenizer, 32, seed=0), tokenizer, root / "sft" / "model")
    write_sft_gate(root / "sft" / "model", *FAST)  # what the quantize and bf16-export gates compare with
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return new_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def stage_cfg():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf = str(Path(__file__).resolve().parents[1] / "conf")

    def _compose(run_dir: Path, *overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=conf, version_base=None):
            return compose(config_name="config", overrides=[f"run_dir={run_dir}", *FAST, *overrides])

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def fp8_bundle(run_dir, stage_cfg) -> tuple[Path, dict]:
    from dg_pipeline.stages import export, quantize

    quantize.run(stage_cfg(run_dir, "stage=quantize", "quant=fp8"))
    summary = export.run(stage_cfg(run_dir, "stage=export", "quant=fp8"))
    return run_dir / "export" / "fp8", summary


def test_export_of_a_quantize_output_is_a_checked_reloadable_release(fp8_bundle, run_dir):
    bundle, summary = fp8_bundle
    assert summary["quant_algo"] == "FP8" and summary["passed"]
    assert check_export(bundle) == []
    reloaded = load_export(bundle)  # verifies manifest.json first
    assert reloaded.dequantized_linears > 0
    names = {p.name for p in bundle.iterdir()}
    assert {"config.json", "hf_quant_config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "README.md", "manifest.json", "verify.json"} <= names
    # the reload-parity gate is measured against the quantize stage's gate, and both are reported
    record = json.loads((bundle / "verify.json").read_text())
    quantized = json.loads((run_dir / "quantize" / "fp8" / "verify.json").read_text())
    assert record["reference"]["accuracy"] == quantized["accuracy"] == summary["reference_accuracy"]
    assert {c["name"] for c in record["checks"]} >= {"max_accuracy_drop"}
    assert not any(p.name.startswith(".") for p in bundle.parent.iterdir())  # no temp dir left behind


def test_the_model_card_has_provenance_gates_sampler_and_serve_commands(fp8_bundle):
    bundle, _ = fp8_bundle
    card = (bundle / "README.md").read_text()
    assert "vllm serve <this dir> --diffusion-config '{\"canvas_length\": 32}'\n" in card
    assert "send `temperature` 1.0 or leave it out" in card and "ignores repetition_penalty" in card
    # vLLM's sampler transients per sequence: canvas 32 x vocab 16 x 4 B x 4 fp32 copies
    assert "32 x 16 x 4 B x 4 = **8.0 KiB per sequence**, 64.0 KiB at vLLM's default `--max-num-seqs 8`" in card
    assert "(the published 26B-A4B, canvas 256 x vocab 262,144: 1.0 GiB per sequence)" in card
    assert "TensorRT-LLM has no DiffusionGemma model yet" in card and "trtllm-serve" not in card
    assert "| quantize/fp8 (sim) |" in card and "| export/fp8 (sim) |" in card
    assert "| `max_denoising_steps` | 4 |" in card  # sampler.* overrides land in the release's generation config
    assert "| base weights | random init of the `tiny` shape (dg_pipeline.model.configs) |" in card
    assert "| data | Sudoku 4x4: 32 generated boards" in card  # FAST's data.n_train=32
    assert "| training objective | uniform" in card


def test_an_existing_export_is_refused_without_overwrite(fp8_bundle, run_dir, stage_cfg):
    from dg_pipeline.stages import export

    bundle, _ = fp8_bundle
    before = (bundle / "manifest.json").read_text()
    with pytest.raises(InputError, match="already exists; pass export.overwrite=true"):
        export.run(stage_cfg(run_dir, "stage=export", "quant=fp8"))
    assert (bundle / "manifest.json").read_text() == before


def test_a_bundle_breaking_a_loader_rule_is_not_published(tmp_path, stage_cfg):
    """A quantized self-conditioning block cannot load in vLLM: the export refuses and leaves nothing behind."""
    from dg_pipeline.stages import export, quantize

    run_dir = new_run(tmp_path)
    quantize.run(stage_cfg(run_dir, "stage=quantize", "quant=fp8", "quant.self_conditioning=true"))
    with pytest.raises(CheckFailed) as failed:
        export.run(stage_cfg(run_dir, "stage=export", "quant=fp8", "export.name=sc_quantized"))
    assert "model.decoder.self_conditioning.gate_proj.weight: is quantized (FP8) but must stay unquantized" in str(
        failed.value)
    assert not (run_dir / "export" / "sc_quantized").exists()
    assert not any(p.name.startswith(".sc_quantized") for p in (run_dir / "export").iterdir())


def test_check_stage_passes_a_good_bundle_and_lists_every_violation_of_a_bad_one(fp8_bundle, stage_cfg, tmp_path):
    import shutil

    from dg_pipeline.stages import check

    bundle, _ = fp8_bundle
    assert check.run(stage_cfg(bundle.parent.parent, "stage=check"))["passed"]
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "tokenizer.json").unlink()
    gen = json.loads((bad / "generation_config.json").read_text())
    del gen["confidence_threshold"]
    (bad / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(CheckFailed) as failed:
        check.run(stage_cfg(tmp_path, "stage=check", f"input={bad}"))
    message = str(failed.value)
    for expected in ("generation_config.json:confidence_threshold", "tokenizer.json / tokenizer.model",
                     "tokenizer.json: listed in manifest.json but missing"):
        assert expected in message
    assert re.search(r"generation_config\.json: (size \d+ bytes|sha256 differs)", message)


def test_an_overwrite_whose_gate_fails_keeps_the_old_bundle_and_the_new_one_beside_it(fp8_bundle, run_dir,
                                                                                      stage_cfg):
    from dg_pipeline.core import GateFailed
    from dg_pipeline.stages import check, export

    bundle, _ = fp8_bundle
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    with pytest.raises(GateFailed) as failed:
        export.run(stage_cfg(run_dir, "stage=export", "quant=fp8", "export.overwrite=true",
                             "export.max_accuracy_drop=null", "verify.min_accuracy=1.0"))
    rejected = bundle.with_name("fp8.failed")
    message = str(failed.value)
    assert f"{bundle} is unchanged" in message and f"kept at {rejected}" in message and "min_accuracy" in message
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == before
    assert json.loads((rejected / "verify.json").read_text())["passed"] is False
    # stage=check lists only published bundles: the rejected one and a killed writer's temp dir are skipped.
    leftover = bundle.with_name(".fp8.k3j_x9.tmp")
    shutil.copytree(bundle, leftover)
    result = check.run(stage_cfg(run_dir, "stage=check"))
    assert str(bundle) in result["checked"] and {Path(p).name for p in result["checked"]} <= {"fp8", "bf16"}
    shutil.rmtree(leftover)
    shutil.rmtree(rejected)


def test_a_bundle_without_its_manifest_fails_check_unless_hashes_are_skipped(fp8_bundle, stage_cfg, tmp_path):
    from dg_pipeline.stages import check

    bare = tmp_path / "bare"
    shutil.copytree(fp8_bundle[0], bare)
    (bare / "manifest.json").unlink()
    with pytest.raises(CheckFailed, match=r"manifest.json: missing.*export.skip_hashes=true"):
        check.run(stage_cfg(tmp_path, "stage=check", f"input={bare}"))
    assert check.run(stage_cfg(tmp_path, "stage=check", f"input={bare}", "export.skip_hashes=true"))["passed"]


@pytest.fixture(scope="module")
def bf16_bundle(run_dir, stage_cfg) -> tuple[Path, dict]:
    from dg_pipeline.stages import export

    summary = export.run(stage_cfg(run_dir, "stage=export", "export=bf16"))
    return run_dir / "export" / "bf16", summary


def test_bf16_export_of_the_sft_model_is_an_unquantized_release(bf16_bundle, tmp_path):
    import shutil

    bundle, summary = bf16_bundle
    assert summary["quant_algo"] is None
    assert not (bundle / "hf_quant_config.json").exists()
    assert "quantization_config" not in json.loads((bundle / "config.json").read_text())
    assert check_export(bundle) == []

    # a bf16 release is a model dir every stage can start from, and it is verified like any export
    from dg_pipeline.model import load_model

    load_model(bundle)
    tampered = tmp_path / "bf16"
    shutil.copytree(bundle, tampered)
    config = json.loads((tampered / "config.json").read_text())
    (tampered / "config.json").write_text(json.dumps({**config, "canvas_length": 8}))
    with pytest.raises(InputError, match=r"config\.json"):
        load_model(tampered)


@pytest.fixture(scope="module")
def nvfp4_bundles(tmp_path_factory) -> dict[str, Path]:
    """NVFP4 and NVFP4 experts-only releases of a tiny calibrated model (the stage's writer + manifest, no gate)."""
    from dg_pipeline.export import export_quantized, release_generation_config, write_manifest
    from dg_pipeline.export.sample import quantized_random_model

    tokenizer = build_board_tokenizer()
    out = {}
    for quant in ("nvfp4", "nvfp4_experts_only"):
        path = tmp_path_factory.mktemp("bundles") / quant
        path.mkdir()
        model = quantized_random_model("tiny", quant, tokenizer, 32)
        export_quantized(model, tokenizer, path, release_generation_config(model, tokenizer))
        write_manifest(path)
        out[quant] = path
    return out


@pytest.mark.parametrize("kind", ["model dir", "quantize output", "fp8", "nvfp4", "nvfp4_experts_only", "bf16"])
def test_eval_accepts_a_model_dir_a_quantize_output_and_every_export_format(
    kind, run_dir, fp8_bundle, bf16_bundle, nvfp4_bundles, stage_cfg, tmp_path
):
    from dg_pipeline.stages import eval as eval_stage

    dirs = {"model dir": run_dir / "sft" / "model", "quantize output": run_dir / "quantize" / "fp8",
            "fp8": fp8_bundle[0], "bf16": bf16_bundle[0], **nvfp4_bundles}
    record = eval_stage.run(stage_cfg(tmp_path, "stage=eval", f"input={dirs[kind]}"))
    # verify.n_eval=4 a source: the run's eval split and the independent held-out boards
    assert record["metric"] == "solved" and {s: c["n"] for s, c in record["by_source"].items()} == {
        "pipeline": 4, "independent": 4}
    loaded_as = json.loads((tmp_path / "eval" / "verify.json").read_text())["loaded_as"]
    expected = {"model dir": "model dir", "quantize output": "quantize output (fp8, fake-quantized)",
                "fp8": "FP8 export", "nvfp4": "NVFP4 export", "nvfp4_experts_only": "NVFP4 export", "bf16": "model dir"}
    assert loaded_as.startswith(expected[kind])
    if kind in ("fp8", "nvfp4"):
        assert "manifest verified" in loaded_as
    if kind in ("fp8", "quantize output"):  # its own gate record (verify.json inside the dir) is the reference
        assert record["reference"]["path"] == str(dirs[kind] / "verify.json")


def test_eval_of_a_tampered_bundle_is_refused_before_loading(fp8_bundle, stage_cfg, tmp_path):
    import shutil

    from dg_pipeline.stages import eval as eval_stage

    tampered = tmp_path / "fp8"
    shutil.copytree(fp8_bundle[0], tampered)
    (tampered / "tokenizer_config.json").write_text((tampered / "tokenizer_config.json").read_text() + " ")
    with pytest.raises(InputError, match=r"tokenizer_config\.json: size .* manifest\.json"):
        eval_stage.run(stage_cfg(tmp_path / "run", "stage=eval", f"input={tampered}"))


def test_an_hf_export_is_named_after_its_quantize_input_not_the_composed_quant_group(stage_cfg, tmp_path):
    from dg_pipeline.core import RunDir
    from dg_pipeline.stages import _output_and_upstream
    from dg_pipeline.stages.export import export_name

    quantized = tmp_path / "quantize" / "nvfp4-text"
    quantized.mkdir(parents=True)
    cfg = stage_cfg(tmp_path, "stage=export", f"input={quantized}")  # the composed group is still quant=fp8
    rd = RunDir.from_cfg(cfg)
    assert export_name(cfg, rd) == "nvfp4-text"
    assert _output_and_upstream(cfg, rd, "export", None) == (
        tmp_path / "export" / "nvfp4-text", "nvfp4-text", ("quantize", "nvfp4-text"))  # W&B lineage too


def serve(bundle: Path, tmp_path: Path, *args: str):
    """Run export/serve_vllm.sh with a stand-in `vllm` first on PATH that records its argv (vLLM is a GPU server,
    not a test dependency: what is checked here is the command line the script hands it)."""
    import os
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "vllm"
    stand_in.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SERVED_ARGS"\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "SERVED_ARGS": str(tmp_path / "argv"), "WANDB_MODE": "offline"}
    script_path = Path(__file__).resolve().parents[1] / "export" / "serve_vllm.sh"
    done = subprocess.run(["bash", str(script_path), str(bundle), *args], env=env, capture_output=True, text=True)
    argv = (tmp_path / "argv").read_text().splitlines() if (tmp_path / "argv").exists() else None
    return done, argv


def test_the_serve_script_checks_the_bundle_then_starts_vllm_with_the_model_cards_arguments(fp8_bundle, tmp_path):
    bundle, _ = fp8_bundle
    done, argv = serve(bundle, tmp_path, "--port", "8001")
    assert done.returncode == 0, done.stderr
    # only what vLLM 0.32 reads: the bundle (generation_config.json by default) and the canvas length
    assert argv == ["serve", str(bundle), "--diffusion-config", '{"canvas_length": 32}', "--port", "8001"]
    assert "PASS" in done.stdout
    assert "vllm serve <this dir> --diffusion-config '{\"canvas_length\": 32}'" in (bundle / "README.md").read_text()
    assert not (Path(__file__).resolve().parents[1] / "export" / "serve_trtllm.sh").exists()


def test_the_serve_script_refuses_a_tampered_bundle_and_a_missing_dir(fp8_bundle, tmp_path):
    import shutil

    bundle, _ = fp8_bundle
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    config = json.loads((tampered / "generation_config.json").read_text())
    config["max_denoising_steps"] = 1
    (tampered / "generation_config.json").write_text(json.dumps(config))
    done, argv = serve(tampered, tmp_path)
    assert done.returncode != 0 and argv is None  # the server never started
    assert "generation_config.json" in done.stdout + done.stderr

    done, argv = serve(tmp_path / "no_such_dir", tmp_path)
    assert done.returncode == 2 and argv is None
    assert "usage:" in done.stderr and "<export dir>" in done.stderr
