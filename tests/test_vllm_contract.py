"""Every dir the pipeline writes is what vLLM 0.32 expects, shown without vLLM installed: each bundle kind of the
tiny model carries every config.json attribute vLLM reads at start-up (resolved with transformers' own config
classes, as the engine loads them), its tensor names fall onto ONE backbone through vLLM's weight-name mapping, the
checker reports any such attribute dropped or wrong, and it accepts the layout NVIDIA publishes (a wildcard exclude
list that leaves out what vLLM never quantizes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DiffusionGemmaConfig, GenerationConfig

from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.export import (
    check_export,
    export_quantized,
    export_unquantized,
    load_export,
    release_generation_config,
)
from dg_pipeline.export.checker import check_config
from dg_pipeline.export.formats import CheckpointTensors
from dg_pipeline.export.sample import quantized_random_model
from dg_pipeline.model import build_model, load_base, save_model
from dg_pipeline.model.tiny_gemma4 import save_tiny_gemma4
from dg_pipeline.model.vllm_contract import (
    CONFIG_READS,
    FULL,
    GEMMA4_DEFAULT_OUTPUT_LENGTH,
    engine_read_problems,
    lookup,
    vllm_targets,
)
from dg_pipeline.settings.sampler import SAMPLER_KEYS, read_sampler_settings

CANVAS = 16
# NVIDIA's published NVFP4 DiffusionGemma (nvidia/diffusiongemma-26B-A4B-it-NVFP4, config.json quantization_config)
NVIDIA_IGNORE = ["lm_head", "*embed_vision*", "*mlp*", "*router*", "*self_attn*", "*self_conditioning*",
                 "*vision_tower*"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_board_tokenizer()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """One dir of every kind the pipeline writes, from the tiny model."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    save_model(build_model("tiny", tokenizer, CANVAS), tokenizer, root / "model_dir")
    out["model dir (base / sft)"] = root / "model_dir"
    converted = load_base(save_tiny_gemma4(root / "gemma4", vision=True), canvas_length=CANVAS)
    save_model(converted.model, converted.tokenizer, root / "converted")
    out["converted Gemma 4"] = root / "converted"
    model = build_model("tiny", tokenizer, CANVAS)
    export_unquantized(model, tokenizer, root / "bf16", release_generation_config(model, tokenizer))
    out["bf16 export"] = root / "bf16"
    for quant, kv in (("fp8", "none"), ("nvfp4", "none"), ("nvfp4_experts_only", "fp8_cast")):
        model = quantized_random_model("tiny", quant, tokenizer, CANVAS, kv_cache=kv)
        (root / quant).mkdir()
        export_quantized(model, tokenizer, root / quant, release_generation_config(model, tokenizer))
        out[f"{quant} export"] = root / quant
    return out


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def violations_at(path: Path) -> dict[str, str]:
    return {v.where: f"{v.rule} | fix: {v.fix}" for v in check_export(path)}


# ------------------------------------------------------------------------------- start-up attributes


def test_every_bundle_kind_carries_every_attribute_vllm_reads_and_passes_the_checker(bundles):
    for kind, path in bundles.items():
        config = read_config(path)
        assert engine_read_problems(config) == [], kind
        assert config["vision_config"]["default_output_length"] == GEMMA4_DEFAULT_OUTPUT_LENGTH, kind
        assert config["text_config"]["final_logit_softcapping"] == 30.0, kind
        if kind.endswith("export"):
            assert check_export(path) == [], kind


def test_the_attributes_resolve_on_the_written_config_loaded_with_transformers_config_classes(bundles):
    """vLLM loads config.json with transformers' DiffusionGemmaConfig (and the vision tower's AutoConfig) and reads
    the attributes off those objects: every required one must resolve there, to the written value."""
    for kind, path in bundles.items():
        written = read_config(path)
        loaded = DiffusionGemmaConfig.from_pretrained(path)
        for read in CONFIG_READS:
            value = lookup(written, read.path, None)
            if not read.required and value is None:
                continue
            node = loaded
            for part in read.path.split("."):
                node = getattr(node, part)  # an AttributeError here is vLLM's start-up failure
            assert node == value, f"{kind}: {read.path} resolves to {node!r}, written {value!r}"
        # generation_config.json as vLLM reads it: the base GenerationConfig, then to_diff_dict()
        gen = GenerationConfig.from_pretrained(path).to_diff_dict()
        unset = [k for k, v in read_sampler_settings(gen, (*SAMPLER_KEYS, "eos_token_id")).items() if v is None]
        assert unset == [], f"{kind}: {unset}"
        assert "EntropyBound" in gen["sampler_config"]["_cls_name"] and gen["sampler_config"]["entropy_bound"] > 0


def test_the_full_attention_head_shape_the_engine_derives_matches_the_stored_k_proj(bundles):
    """transformers >= 5.16 (what vLLM 0.32 runs) builds per_layer_config from global_head_dim (default 512) and
    num_global_key_value_heads: on full-attention layers K is heads x global_head_dim wide, and no v_proj is stored
    (vLLM loads K into V there)."""
    for kind, path in bundles.items():
        text = read_config(path)["text_config"]
        tensors = CheckpointTensors(path)
        for i, layer_type in enumerate(text["layer_types"]):
            if layer_type == FULL:
                heads = text.get("num_global_key_value_heads") or text["num_key_value_heads"]
                head_dim = text["global_head_dim"]
            else:
                heads, head_dim = text["num_key_value_heads"], text["head_dim"]
            k_proj = tensors.get(f"model.decoder.layers.{i}.self_attn.k_proj.weight")
            assert k_proj.shape[0] == heads * head_dim, f"{kind}: layer {i}"
            assert (f"model.decoder.layers.{i}.self_attn.v_proj.weight" in tensors) == (layer_type != FULL), kind


@pytest.mark.parametrize("read", [r for r in CONFIG_READS if r.required], ids=lambda r: r.path)
def test_dropping_an_attribute_vllm_reads_is_reported_with_its_source(read, bundles):
    config = read_config(bundles["fp8 export"])
    *parents, leaf = read.path.split(".")
    node = config
    for part in parents:
        node = node[part]
    del node[leaf]
    found = {v.where: v for v in check_config(config)}
    where = f"config.json:{read.path}"
    assert where in found, f"dropping {read.path} is not reported"
    assert found[where].rule.startswith("missing (vLLM reads it: ") and read.source in found[where].rule


@pytest.mark.parametrize("path, value, expected", [
    ("vision_config.default_output_length", 100, "image processor's budgets [70, 140, 280, 560, 1120]"),
    ("text_config.num_kv_shared_layers", 2, "DiffusionGemma has no KV-shared layers"),
    ("text_config.tie_word_embeddings", False, "must be True"),
    ("text_config.layer_types", ["full_attention", "sliding_attention"], "the last layer must be"),
    ("text_config.top_k_experts", 9, "9 experts per token but num_experts is 4"),
    ("self_conditioning_size", 96, "96, but the self-conditioning MLP stored"),
    ("boi_token_id", 255_999, "outside the vocabulary"),
])
def test_a_wrong_value_of_an_attribute_vllm_reads_is_reported(path, value, expected, bundles):
    config = read_config(bundles["bf16 export"])
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value
    found = {v.where: v.rule for v in check_config(config)}
    assert expected in found[f"config.json:{path}"]


def test_the_check_stage_reports_a_bundle_without_default_output_length(bundles, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundles["fp8 export"], broken)
    config = read_config(broken)
    del config["vision_config"]["default_output_length"]
    (broken / "config.json").write_text(json.dumps(config))
    found = violations_at(broken)
    assert "get_mm_max_tokens_per_item" in found["config.json:vision_config.default_output_length"]
    assert f"set it to {GEMMA4_DEFAULT_OUTPUT_LENGTH}" in found["config.json:vision_config.default_output_length"]


def test_a_converted_gemma4_keeps_its_own_vision_values_and_gets_only_what_it_lacks(tmp_path):
    source = save_tiny_gemma4(tmp_path / "gemma4", vision=True)
    config = json.loads((source / "config.json").read_text())
    config["vision_config"]["default_output_length"] = 560
    (source / "config.json").write_text(json.dumps(config))
    converted = load_base(source, canvas_length=CANVAS)
    save_model(converted.model, converted.tokenizer, tmp_path / "converted")
    assert read_config(tmp_path / "converted")["vision_config"]["default_output_length"] == 560


# --------------------------------------------------------------------------------------- the name mapping


def test_tensor_names_map_through_vllms_mapping_onto_one_backbone(bundles):
    for kind, path in bundles.items():
        text = read_config(path)["text_config"]
        n_experts, seen = text["num_experts"], {}
        for t in CheckpointTensors(path):
            targets = vllm_targets(t.name, text["layer_types"], n_experts)
            assert targets is not None, f"{kind}: vLLM has no place for {t.name}"
            for target in targets:
                key = (target.param, target.shard, target.expert)
                # layer_scalar is a copied buffer: HF checkpoints store the encoder's and the decoder's, equal
                assert key not in seen or target.param.endswith("layer_scalar"), \
                    f"{kind}: {t.name} and {seen.get(key)} both load into {key}"
                seen[key] = t.name
        params = {p for p, _, _ in seen}
        assert not any(p.startswith(("model.decoder.", "model.encoder.")) for p in params), kind
        assert {"model.embed_tokens.weight", "model.norm.weight", "self_conditioning.gate_proj.weight"} <= params, kind
        for i in range(text["num_hidden_layers"]):
            layer = f"model.layers.{i}"
            assert {s for p, s, _ in seen if p == f"{layer}.self_attn.qkv_proj.weight"} == {"q", "k", "v"}, kind
            assert {s for p, s, _ in seen if p == f"{layer}.mlp.gate_up_proj.weight"} == {"0", "1"}, kind
            experts = {(s, e) for p, s, e in seen if p in (f"{layer}.experts.w13_weight", f"{layer}.experts.w2_weight")}
            assert experts == {(s, e) for s in ("w1", "w2", "w3") for e in range(n_experts)}, kind


def test_a_tensor_stored_for_the_encoder_and_the_decoder_collides_in_vllm(bundles):
    decoder = "model.decoder.layers.0.mlp.up_proj.weight"
    layer_types = read_config(bundles["bf16 export"])["text_config"]["layer_types"]
    encoder = decoder.replace("model.decoder.", "model.encoder.language_model.")
    assert vllm_targets(decoder, layer_types, 4) == vllm_targets(encoder, layer_types, 4)
    assert vllm_targets("lm_head.weight", layer_types, 4) is None  # tied: nothing to load it into
    assert vllm_targets("model.decoder.layers.1.self_attn.v_proj.weight", layer_types, 4) is None  # full layer


# ------------------------------------------------------------------------------- published layouts


def nvidia_layout(src: Path, dst: Path, keep_hf_quant_config: bool) -> Path:
    """A copy of an experts-only NVFP4 bundle quantized as NVIDIA publishes DiffusionGemma: config.json's flat
    quantization_config with the wildcard ignore list (no embed_tokens) and an FP8 KV-cache scheme (a cast)."""
    shutil.copytree(src, dst)
    config = read_config(dst)
    config["quantization_config"]["ignore"] = list(NVIDIA_IGNORE)
    config["quantization_config"]["kv_cache_scheme"] = {"type": "float", "num_bits": 8, "dynamic": False}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    hf = dst / "hf_quant_config.json"
    if keep_hf_quant_config:
        data = json.loads(hf.read_text())
        data["quantization"].update(exclude_modules=list(NVIDIA_IGNORE), kv_cache_quant_algo="FP8")
        hf.write_text(json.dumps(data, indent=2))
    else:
        hf.unlink()
    return dst


@pytest.mark.parametrize("keep_hf_quant_config", [False, True])
def test_nvidias_published_nvfp4_layout_passes(keep_hf_quant_config, bundles, tmp_path):
    bundle = nvidia_layout(bundles["nvfp4_experts_only export"], tmp_path / "nv", keep_hf_quant_config)
    assert check_export(bundle) == []
    assert load_export(bundle, verify=False).quant_algo == "NVFP4"  # settings read from config.json, as vLLM does


def test_a_linear_vllm_quantizes_still_must_be_excluded_when_stored_unquantized(bundles, tmp_path):
    bundle = nvidia_layout(bundles["nvfp4_experts_only export"], tmp_path / "nv", keep_hf_quant_config=False)
    config = read_config(bundle)
    config["quantization_config"]["ignore"].remove("*mlp*")
    (bundle / "config.json").write_text(json.dumps(config))
    found = violations_at(bundle)
    assert "unquantized but not in exclude_modules" in found["model.decoder.layers.0.mlp.gate_proj"]
    assert not any("embed_tokens" in where or "router" in where for where in found)


def test_a_fused_group_stored_in_two_formats_is_reported(bundles, tmp_path):
    """vLLM runs q/k/v as one GEMM: an unquantized k_proj next to an FP8 q_proj cannot load (even if excluded)."""
    broken = tmp_path / "broken"
    shutil.copytree(bundles["fp8 export"], broken)
    k = "model.decoder.layers.0.self_attn.k_proj"
    tensors = load_file(broken / "model.safetensors")
    tensors[f"{k}.weight"] = (tensors[f"{k}.weight"].float() * tensors.pop(f"{k}.weight_scale")).to(torch.bfloat16)
    tensors.pop(f"{k}.input_scale")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    for name, key in (("config.json", "quantization_config"), ("hf_quant_config.json", "quantization")):
        data = json.loads((broken / name).read_text())
        block = data[key]
        field = "ignore" if name == "config.json" else "exclude_modules"
        block[field] = block[field] + [k]
        (broken / name).write_text(json.dumps(data))
    found = violations_at(broken)
    assert "stored in different formats (k_proj=unquantized, q_proj=FP8, v_proj=FP8)" in \
        found["model.decoder.layers.0.self_attn (q/k/v)"]
