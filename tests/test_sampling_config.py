"""SamplerConfig: defaults come from the checkpoint's generation config; overrides of None keep them; bad values fail
with one error naming the key."""

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
)

from dg_pipeline.core.errors import InputError
from dg_pipeline.sampling import SamplerConfig
from dg_pipeline.settings import RunSettings

def checkpoint_config(**changes):
    values = dict(
        max_denoising_steps=12,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.3),
        t_min=0.2,
        t_max=0.9,
        stability_threshold=2,
        confidence_threshold=0.01,
        eos_token_id=[1, 7],
        pad_token_id=0,
    )
    values.update(changes)
    return DiffusionGemmaGenerationConfig(**values)


def test_defaults_are_the_reference_generate_defaults():
    reference = DiffusionGemmaGenerationConfig._get_default_generation_params()
    config = SamplerConfig()
    assert config.max_denoising_steps == reference["max_denoising_steps"]
    assert config.entropy_bound == reference["sampler_config"].entropy_bound
    for key in ("t_min", "t_max", "stability_threshold", "confidence_threshold"):
        assert getattr(config, key) == reference[key]


def test_checkpoint_values_are_taken_and_none_overrides_keep_them():
    config = SamplerConfig.from_generation_config(checkpoint_config(), entropy_bound=None, t_min=None)
    assert (config.max_denoising_steps, config.entropy_bound, config.t_min, config.t_max) == (12, 0.3, 0.2, 0.9)
    assert (config.stability_threshold, config.confidence_threshold) == (2, 0.01)
    assert config.eos_token_ids == (1, 7) and config.pad_token_id == 0


def test_an_override_wins_over_the_checkpoint():
    config = SamplerConfig.from_generation_config(checkpoint_config(), max_denoising_steps=5, entropy_bound=1)
    assert config.max_denoising_steps == 5 and config.entropy_bound == 1.0


def test_a_generation_config_json_dict_works_like_the_object():
    as_json = checkpoint_config().to_dict()  # what generation_config.json holds (sampler_config as a dict)
    assert SamplerConfig.from_generation_config(as_json) == SamplerConfig.from_generation_config(checkpoint_config())


def test_the_default_sampler_group_runs_the_checkpoint_as_is(compose_cfg):
    settings = RunSettings.from_cfg(compose_cfg()).sampler  # conf/sampler/default.yaml
    config = SamplerConfig.from_generation_config(checkpoint_config(), **settings.sampler_overrides())
    assert config.max_denoising_steps == 12 and config.entropy_bound == 0.3 and config.compile == "auto"


@pytest.mark.parametrize(
    "overrides, names",
    [
        (dict(t_min=0.9, t_max=0.5), "sampler.t_max"),
        (dict(max_denoising_steps=0), "sampler.max_denoising_steps"),
        (dict(entropy_bound=-1.0), "sampler.entropy_bound"),
        (dict(acceptance="greedy"), "sampler.acceptance"),
        (dict(canvas_init="mask"), "sampler.canvas_init=mask needs a mask token id"),
        (dict(compile="true", kv_cache="dynamic"), "sampler.kv_cache=static"),
        (dict(temperature=0.5), "sampler.temperature: unknown sampler setting"),
    ],
)
def test_a_bad_setting_names_the_key(overrides, names):
    with pytest.raises(InputError, match=names):
        SamplerConfig.from_generation_config(checkpoint_config(), **overrides)


def test_compile_and_static_cache_default_on_for_cuda_only():
    config = SamplerConfig.from_generation_config(None, compile=None)
    assert not config.use_compile(torch.device("cpu")) and not config.use_static_cache(torch.device("cpu"))
    assert config.use_compile(torch.device("cuda")) and config.use_static_cache(torch.device("cuda"))
    yaml_false = SamplerConfig.from_generation_config(None, compile=False)  # YAML `false` arrives as a bool
    assert yaml_false.compile == "false" and not yaml_false.use_compile(torch.device("cuda"))


def test_the_one_sampler_key_list_is_what_the_sampler_and_the_sampler_group_take():
    import dataclasses

    from dg_pipeline.settings import SamplerSettings
    from dg_pipeline.settings.sampler import SAMPLER_KEYS, read_sampler_settings, reference_defaults

    assert set(SAMPLER_KEYS) <= {f.name for f in dataclasses.fields(SamplerConfig)}
    assert set(SAMPLER_KEYS) <= {f.name for f in dataclasses.fields(SamplerSettings)}
    # the defaults are transformers' own, read through the same list
    reference = DiffusionGemmaGenerationConfig._get_default_generation_params()
    assert reference_defaults() == read_sampler_settings(reference, SAMPLER_KEYS)
    assert all(value is not None for value in reference_defaults().values())
