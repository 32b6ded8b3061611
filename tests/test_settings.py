"""Typed settings: the composed config is checked against one dataclass per group when it is built, and a bad
value fails with one error that names the key."""

import pytest
from hydra.errors import ConfigCompositionException

from dg_pipeline.core.errors import InputError
from dg_pipeline.settings import (
    CalibSettings,
    DataSettings,
    QuantSettings,
    RunSettings,
    SamplerSettings,
    TrainerSettings,
    VerifySettings,
)


def test_the_composed_config_is_typed_by_the_settings_dataclasses(compose_cfg):
    settings = RunSettings.from_cfg(compose_cfg())
    assert isinstance(settings.data, DataSettings) and isinstance(settings.trainer, TrainerSettings)
    assert isinstance(settings.quant, QuantSettings) and isinstance(settings.sampler, SamplerSettings)
    assert settings.quant.max_accuracy_drop == 0.005 and settings.data.n_eval == 300


@pytest.mark.parametrize("override, names", [
    ("data.n_train=-1", r"data\.n_train=-1: must be a non-negative integer"),
    ("data.kind=images", r"data\.kind='images': unknown data kind"),
    ("verify.batch_size=0", r"verify\.batch_size=0: must be a positive integer"),
    ("verify.min_accuracy=80", r"verify\.min_accuracy=80"),
    ("quant.name=int3", r"quant\.name=int3: choose one of fp8, nvfp4, nvfp4_experts_only"),
    ("quant.formats=[fp8,int3]", r"quant\.formats contains 'int3'"),
    ("calib.n_samples=0", r"calib\.n_samples=0: must be a positive number of prompts"),
    ("calib.mode=images", r"calib\.mode=images: choose one of diffusion, text"),
    ("sampler.max_denoising_steps=0", r"sampler\.max_denoising_steps=0"),
    ("sampler.acceptance=greedy", r"sampler\.acceptance=greedy"),
    ("trainer.strategy=ring", r"trainer\.strategy=ring: choose one of auto, ddp, fsdp"),
    ("trainer.betas=[0.9]", r"trainer\.betas=\[0\.9\]: expected two numbers"),
    ("trainer.expert_parallel=2", r"trainer\.expert_parallel=2 needs trainer\.strategy=fsdp"),
    ("trainer.precision=fp8", r"trainer\.precision=fp8: choose one of"),
    ("plan.device_memory_gb=0", r"plan\.device_memory_gb=0"),
    ("plan.prompt_length=0", r"plan\.prompt_length=0: must be a positive number of tokens"),
    ("export.format=onnx", r"export\.format=onnx: choose one of hf, bf16"),
    ("logger.mode=sometimes", r"logger\.mode=sometimes: choose one of offline, online, disabled"),
    ("device=tpu", r"device=tpu: choose cpu, cuda or auto"),
])
def test_a_bad_value_names_its_key(compose_cfg, override, names):
    with pytest.raises(InputError, match=names):
        RunSettings.from_cfg(compose_cfg(override))


def test_a_wrong_type_or_an_unknown_key_fails_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException) as wrong_type:
        compose_cfg("data.n_train=many")
    assert "data.n_train" in str(wrong_type.value) + str(wrong_type.value.__cause__)
    with pytest.raises(ConfigCompositionException):
        compose_cfg("verify.no_such_key=1")


def test_a_required_value_left_unset_reads_as_none_for_the_stage_that_needs_it_to_name(compose_cfg):
    settings = RunSettings.from_cfg(compose_cfg("recipe=chat"))  # model.base: ???, data.train_path: ???
    assert settings.model.base is None and settings.data.train_path is None


def test_text_calibration_of_a_quantized_self_conditioning_block_is_refused_up_front(compose_cfg):
    with pytest.raises(InputError, match="calib.mode=diffusion or quant.self_conditioning=false"):
        RunSettings.from_cfg(compose_cfg("calib=text", "quant.self_conditioning=true"))


def test_the_canvas_follows_the_objective_unless_the_sampler_says_otherwise(compose_cfg):
    assert RunSettings.from_cfg(compose_cfg()).sampler.canvas_init is None  # the checkpoint's (uniform)
    assert RunSettings.from_cfg(compose_cfg("objective=masked")).sampler.canvas_init == "mask"
    explicit = RunSettings.from_cfg(compose_cfg("objective=masked", "sampler.canvas_init=uniform"))
    assert explicit.sampler.canvas_init == "uniform"


def test_group_settings_check_themselves_when_built_directly():
    with pytest.raises(InputError, match=r"verify\.n_eval=0"):
        VerifySettings(n_eval=0)
    with pytest.raises(InputError, match=r"calib\.batch_size=0"):
        CalibSettings(batch_size=0)
    assert QuantSettings(fp8_gemm="False").fp8_gemm == "false"  # YAML `false` arrives as a bool


def test_the_default_timestamped_run_dir_reads_the_same_in_the_settings_later(compose_cfg):
    import time

    cfg = compose_cfg()  # run_dir: runs/${now:...}
    first = str(cfg.run_dir)
    time.sleep(1.1)
    assert RunSettings.from_cfg(cfg).run_dir == first


def test_each_quant_format_bounds_its_logits_error(compose_cfg):
    bounds = {name: RunSettings.from_cfg(compose_cfg(f"quant={name}")).quant.max_logits_error
              for name in ("fp8", "nvfp4", "nvfp4_experts_only")}
    assert bounds == {"fp8": 0.1, "nvfp4": 0.25, "nvfp4_experts_only": 0.25}
    with pytest.raises(InputError, match=r"quant.max_logits_error"):
        RunSettings.from_cfg(compose_cfg("quant.max_logits_error=-1"))
