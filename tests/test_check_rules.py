"""The loader-rule checker: a real ModelOpt export of a tiny DiffusionGemma passes it, and each deliberately
broken copy of that export is reported with the tensor/file at fault, the rule and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.export import check_export, export_quantized, release_generation_config
from dg_pipeline.export.sample import quantized_random_model

CANVAS = 16
Q_PROJ = "model.decoder.layers.0.self_attn.q_proj"
ATTN0 = "model.decoder.layers.0.self_attn"


def _export(tmp_path_factory, quant: str, kv_cache: str = "none") -> Path:
    tokenizer = build_board_tokenizer()
    model = quantized_random_model("tiny", quant, tokenizer, CANVAS, kv_cache=kv_cache)
    out = tmp_path_factory.mktemp(f"export_{quant}_kv_{kv_cache}")
    export_quantized(model, tokenizer, out, release_generation_config(model, tokenizer), dtype=torch.bfloat16)
    return out


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory) -> Path:
    return _export(tmp_path_factory, "fp8")


@pytest.fixture(scope="module")
def nvfp4_export(tmp_path_factory) -> Path:
    return _export(tmp_path_factory, "nvfp4")


def broken_copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def edit_tensors(export_dir: Path, edit) -> None:
    path = export_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def violations_at(export_dir: Path) -> dict[str, str]:
    return {v.where: f"{v.rule} | fix: {v.fix}" for v in check_export(export_dir)}


# ------------------------------------------------------------------------------------------------- passing


@pytest.mark.parametrize("quant", ["fp8", "nvfp4"])
def test_a_modelopt_export_of_a_tiny_model_passes_every_rule(quant, fp8_export, nvfp4_export):
    export_dir = fp8_export if quant == "fp8" else nvfp4_export
    assert check_export(export_dir) == []


def test_the_export_stores_experts_per_expert_and_the_tied_backbone_once(nvfp4_export):
    names = set(load_file(nvfp4_export / "model.safetensors"))
    assert "model.decoder.layers.0.experts.3.gate_proj.weight_scale_2" in names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)
    assert not any(n.startswith("model.encoder.language_model.") and "layer_scalar" not in n for n in names)
    assert "lm_head.weight" not in names
    quant = json.loads((nvfp4_export / "hf_quant_config.json").read_text())["quantization"]
    assert {"lm_head", "model.decoder.embed_tokens", "model.decoder.self_conditioning*"} <= set(quant["exclude_modules"])
    assert json.loads((nvfp4_export / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"


# -------------------------------------------------------------------------------------------- broken copies


def test_a_missing_weight_scale_names_the_tensor(fp8_export, tmp_path):
    broken = broken_copy(fp8_export, tmp_path)
    edit_tensors(broken, lambda t: t.pop(f"{Q_PROJ}.weight_scale"))
    found = violations_at(broken)
    assert f"{Q_PROJ}.weight_scale" in found
    assert "missing" in found[f"{Q_PROJ}.weight_scale"]


def test_a_block_scale_in_the_wrong_dtype_is_reported_with_the_dtype_trtllm_needs(nvfp4_export, tmp_path):
    broken = broken_copy(nvfp4_export, tmp_path)
    name = f"{Q_PROJ}.weight_scale"
    edit_tensors(broken, lambda t: t.__setitem__(name, t[name].to(torch.float32)))
    found = violations_at(broken)
    assert "dtype float32, NVFP4 needs float8_e4m3fn" in found[name]


def test_a_quantized_lm_head_is_refused_and_must_be_excluded(fp8_export, tmp_path):
    broken = broken_copy(fp8_export, tmp_path)

    def quantize_lm_head(t):
        t["lm_head.weight"] = t["model.decoder.embed_tokens.weight"].float().to(torch.float8_e4m3fn)
        t["lm_head.weight_scale"] = torch.tensor(1.0)
        t["lm_head.input_scale"] = torch.tensor(1.0)

    edit_tensors(broken, quantize_lm_head)
    drop = lambda q: q.__setitem__("exclude_modules", [m for m in q["exclude_modules"] if m != "lm_head"])  # noqa: E731
    edit_json(broken / "hf_quant_config.json", lambda d: drop(d["quantization"]))
    edit_json(broken / "config.json", lambda d: d["quantization_config"].__setitem__(
        "ignore", [m for m in d["quantization_config"]["ignore"] if m != "lm_head"]))
    found = violations_at(broken)
    assert "must stay unquantized: vLLM cannot load a quantized lm_head" in found["lm_head.weight"]
    assert "lm_head is not listed" in found["config.json:quantization_config:exclude list"]


def test_qkv_with_different_nvfp4_global_scales_is_reported_per_attention_block(nvfp4_export, tmp_path):
    broken = broken_copy(nvfp4_export, tmp_path)
    name = f"{ATTN0}.k_proj.weight_scale_2"
    edit_tensors(broken, lambda t: t.__setitem__(name, t[name] * 2))
    found = violations_at(broken)
    where = f"{ATTN0} (q/k/v)"
    assert "share an input but their NVFP4 weight_scale_2 differ" in found[where]
    assert "TensorRT-LLM asserts they are equal" in found[where]


def test_gate_and_up_with_different_input_scales_are_reported(nvfp4_export, tmp_path):
    broken = broken_copy(nvfp4_export, tmp_path)
    name = "model.decoder.layers.1.experts.2.up_proj.input_scale"
    edit_tensors(broken, lambda t: t.__setitem__(name, t[name] * 3))
    found = violations_at(broken)
    assert "gate/up share an input but their NVFP4 input_scale differ" in found[
        "model.decoder.layers.1.experts.2 (gate/up)"]


def test_missing_sampler_keys_in_generation_config_are_each_reported(fp8_export, tmp_path):
    broken = broken_copy(fp8_export, tmp_path)
    edit_json(broken / "generation_config.json", lambda g: (g.pop("t_min"), g.pop("sampler_config")))
    found = violations_at(broken)
    assert "generation_config.json:t_min" in found
    assert "EntropyBoundSamplerConfig" in found["generation_config.json:sampler_config"]


def test_a_quantized_fused_3d_expert_tensor_must_be_split_per_expert(fp8_export, tmp_path):
    broken = broken_copy(fp8_export, tmp_path)
    experts = "model.decoder.layers.0.experts"

    def fuse(t):
        parts = []
        for e in range(4):
            parts.append(torch.cat([t.pop(f"{experts}.{e}.gate_proj.weight").float(),
                                    t.pop(f"{experts}.{e}.up_proj.weight").float()]))
            for proj in ("gate_proj", "up_proj"):
                t.pop(f"{experts}.{e}.{proj}.weight_scale")
                t.pop(f"{experts}.{e}.{proj}.input_scale")
        t[f"{experts}.gate_up_proj"] = torch.stack(parts).to(torch.float8_e4m3fn)
        t[f"{experts}.gate_up_proj_weight_scale"] = torch.ones(4)

    edit_tensors(broken, fuse)
    found = violations_at(broken)
    assert "quantized fused 3-D expert tensor" in found[f"{experts}.gate_up_proj"]
    assert "experts.<E>.{gate,up,down}_proj" in found[f"{experts}.gate_up_proj"]


def test_a_missing_tokenizer_is_reported(fp8_export, tmp_path):
    broken = broken_copy(fp8_export, tmp_path)
    (broken / "tokenizer.json").unlink()
    found = violations_at(broken)
    assert "no tokenizer vocabulary file" in found["tokenizer.json / tokenizer.model"]


def test_a_copy_broken_in_several_ways_lists_every_violation(nvfp4_export, tmp_path):
    broken = broken_copy(nvfp4_export, tmp_path)
    edit_tensors(broken, lambda t: t.pop(f"{Q_PROJ}.input_scale"))
    edit_json(broken / "hf_quant_config.json", lambda d: d["quantization"].__setitem__("quant_algo", "nvfp4"))
    (broken / "tokenizer_config.json").unlink()
    found = violations_at(broken)
    assert f"{Q_PROJ}.input_scale" in found
    assert "not an upper-case algorithm name" in found["hf_quant_config.json"]
    assert "tokenizer_config.json" in found


def test_a_tied_encoder_weight_stored_twice_names_the_decoder_copy(fp8_export, tmp_path):
    broken = broken_copy(fp8_export, tmp_path)
    name = "model.decoder.layers.0.input_layernorm.weight"
    edit_tensors(broken, lambda t: t.__setitem__(name.replace("model.decoder.", "model.encoder.language_model."),
                                                 t[name].clone()))
    found = violations_at(broken)
    assert f"store it once, as {name}" in found["model.encoder.language_model.layers.0.input_layernorm.weight"]


def test_kv_cache_scales_are_on_every_k_and_v_projection_or_none_and_only_with_a_kv_algo(tmp_path_factory, tmp_path):
    kv_export = _export(tmp_path_factory, "fp8", kv_cache="fp8")
    assert check_export(kv_export) == []
    v_scale = f"{ATTN0}.v_proj.v_scale"
    broken = broken_copy(kv_export, tmp_path / "a")
    edit_tensors(broken, lambda t: t.pop(v_scale))
    assert "kv_cache_quant_algo is FP8 and other K/V projections" in violations_at(broken)[v_scale]

    # scales without the algorithm (in config.json, which vLLM reads, and hf_quant_config.json): ignored by loaders
    broken = broken_copy(kv_export, tmp_path / "b")
    edit_json(broken / "hf_quant_config.json", lambda d: d["quantization"].__setitem__("kv_cache_quant_algo", None))
    edit_json(broken / "config.json", lambda d: d["quantization_config"].pop("kv_cache_scheme"))
    found = violations_at(broken)
    assert "is null but the checkpoint stores" in found["config.json:quantization_config:KV-cache algorithm"]
    assert set(found) == {"config.json:quantization_config:KV-cache algorithm"}

    # the two files disagreeing: vLLM reads config.json, so the difference itself is the violation
    broken = broken_copy(kv_export, tmp_path / "c")
    edit_json(broken / "hf_quant_config.json", lambda d: d["quantization"].__setitem__("kv_cache_quant_algo", None))
    assert "KV-cache algorithm 'FP8' differs from hf_quant_config.json's None" in violations_at(broken)["config.json"]

    # the algorithm without any scale is a cast (quant.kv_cache=fp8_cast, the experts-only recipe's): loadable
    cast_export = _export(tmp_path_factory, "nvfp4_experts_only", kv_cache="fp8_cast")
    assert check_export(cast_export) == []
