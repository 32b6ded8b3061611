"""The loader-rule checker: what vLLM requires of a DiffusionGemma checkpoint dir at start-up and load (plus
TensorRT-LLM's NVFP4 loading rules, kept for when it has a DiffusionGemma model).

`check_export(dir)` applies every rule and returns EVERY violation (tensor or file, the rule, the fix), so one run
shows all that is wrong. The rules (export/FORMAT.md lists them for people):

files       config.json: every attribute vLLM reads at start-up and load, present and right
            (dg_pipeline.model.vllm_contract.CONFIG_READS, with the vLLM source of each); config.json
            quantization_config (quant_method modelopt*, upper-case quant_algo; nested form: kv_cache_quant_algo,
            group_size 16 for NVFP4, exclude_modules; flat form: ignore, kv_cache_scheme FP8) and, when present,
            hf_quant_config.json agreeing with it; generation_config.json (the sampler keys vLLM reads),
            tokenizer files, manifest.json (when present: every sha256 matches)
tensors     every tensor of the architecture present with its shape; a quantized linear has all its tensors with
            the format's dtypes and shapes and positive finite scales; experts are per-expert tensors when
            quantized; router, self-conditioning, vision tower, embeddings and lm_head unquantized; lm_head and
            every unquantized linear the loader would quantize matched by the exclude list (embeddings, routers,
            self-conditioning and the vision tower it never quantizes); linears the loaders fuse stored in one
            format, and for NVFP4 with one input_scale and weight_scale_2; tied encoder/decoder weights stored
            once, under model.decoder.*; KV-cache scales (float32 scalars) only with a KV-cache algorithm, and then
            on all K/V projections or none (a cast)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dg_pipeline.core.errors import InputError, PipelineError
from dg_pipeline.core.manifest import MANIFEST, manifest_problems
from dg_pipeline.data.tokenizer import TOKENIZER_RECORD, tokenizer_mismatch
from dg_pipeline.export.formats import (
    DECODER_PREFIX,
    ENCODER_TEXT_PREFIX,
    FORMAT_BY_WEIGHT_DTYPE,
    FUSED_EXPERT_REMNANT,
    FUSED_EXPERTS,
    GENERATION_CONFIG,
    HF_QUANT_CONFIG,
    NVFP4,
    SCALE_LEAVES,
    SHARED_SCALE_LEAVES,
    TOKENIZER_CONFIG,
    TOKENIZER_VOCAB_FILES,
    CheckpointTensors,
    LinearFormat,
    StoredTensor,
    canonical_tied_name,
    effective_quantization,
    keep_unquantized_reason,
    matches_module,
    quantized_format,
    split_leaf,
)
from dg_pipeline.model.vllm_contract import engine_quantizes, engine_read_problems, fused_group

REEXPORT = "re-export with `python -m dg_pipeline stage=export input=<quantize dir>`"
# Where the quantization settings the tensors are checked against come from (vLLM reads this block first).
QUANT_CONFIG_WHERE = "config.json:quantization_config"


@dataclass(frozen=True)
class Violation:
    where: str  # the file or tensor at fault
    rule: str  # what a loader requires and is not met
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.rule} (fix: {self.fix})"


class CheckFailed(PipelineError):
    """Exported directories break loader rules; the message lists every violation, one per line."""

    def __init__(self, violations: dict[Path, list[Violation]]):
        self.violations = violations
        parts = []
        for export_dir, found in violations.items():
            lines = "\n".join(f"  - {v}" for v in found)
            parts.append(f"{export_dir}: {len(found)} loader-rule violation(s):\n{lines}")
        super().__init__("\n".join(parts))


def check_export(export_dir: str | Path, require_manifest: bool = False, skip_hashes: bool = False) -> list[Violation]:
    """Every loader-rule violation of an exported directory (empty list = vLLM starts on it and loads it).
    `require_manifest`: a missing manifest.json is a violation (a bundle this pipeline published always has one);
    `skip_hashes`: the manifest is neither required nor compared."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise InputError(f"input={export_dir}: not a directory; point input= at an exported checkpoint dir")
    out: list[Violation] = []
    config = _read_json_file(export_dir, "config.json", out)
    if not skip_hashes:
        out += check_manifest_rule(export_dir, require_manifest)
    if config is None:
        return out  # nothing else can be interpreted without config.json
    out += check_config(config)
    quant = check_quant_configs(export_dir, config, out)
    out += check_generation_config(export_dir)
    out += check_tokenizer(export_dir, config)
    try:
        tensors = CheckpointTensors(export_dir)
    except InputError as e:
        out.append(Violation("model.safetensors", str(e), REEXPORT))
        return out
    out += check_tensors(tensors, config, quant)
    return out


# ----------------------------------------------------------------------------------------------------- files


def _read_json_file(export_dir: Path, name: str, out: list[Violation]) -> dict | None:
    path = export_dir / name
    if not path.exists():
        out.append(Violation(name, "file missing", REEXPORT))
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        out.append(Violation(f"{name}:{e.lineno}", f"invalid JSON ({e.msg})", REEXPORT))
        return None
    if not isinstance(data, dict):
        out.append(Violation(name, "not a JSON object", REEXPORT))
        return None
    return data


def check_config(config: dict) -> list[Violation]:
    """Every config.json attribute vLLM reads at start-up and load (dg_pipeline.model.vllm_contract.CONFIG_READS):
    present where it is read without a usable default, and with a value a DiffusionGemma can have."""
    out = []
    for read, problem in engine_read_problems(config):
        if read.written_by_writer:
            fix = f"set it to {read.fill!r} (what stage=export writes: the Gemma 4 / DiffusionGemma value)"
        elif problem == "missing":
            fix = "write it into config.json (a model saved by this pipeline carries it; re-export)"
        else:
            fix = "correct it in config.json to the model's value (the tensors were built with it); re-export"
        out.append(Violation(f"config.json:{read.path}", f"{problem} (vLLM reads it: {read.source})", fix))
    return out


def check_quant_configs(export_dir: Path, config: dict, out: list[Violation]) -> dict | None:
    """Checks config.json's quantization_config (what vLLM reads) and hf_quant_config.json (its fallback file, when
    present: it must agree); returns the effective `quantization` block (quant_algo, kv_cache_quant_algo,
    exclude_modules, group_size) the tensor rules check against, or None for an unquantized checkpoint."""
    qc = config.get("quantization_config")
    hf_path = export_dir / HF_QUANT_CONFIG
    if not hf_path.exists() and qc is None:
        return None  # an unquantized export; check_tensors flags quantized tensors without a config
    file_quant = None
    if hf_path.exists():
        hf = _read_json_file(export_dir, HF_QUANT_CONFIG, out)
        file_quant = (hf or {}).get("quantization")
        if hf is not None:
            producer = hf.get("producer") or {}
            if not producer.get("name") or not producer.get("version"):
                out.append(Violation(HF_QUANT_CONFIG, "no producer {name, version}", REEXPORT))
            if not isinstance(file_quant, dict):
                out.append(Violation(HF_QUANT_CONFIG, "no `quantization` block", REEXPORT))
                file_quant = None
        if file_quant is not None:
            out += _check_quantization_block(file_quant, HF_QUANT_CONFIG)
    if qc is None:
        out.append(Violation("config.json", "no quantization_config (vLLM reads it before hf_quant_config.json)",
                             "embed hf_quant_config.json's settings as config.json quantization_config; " + REEXPORT))
        return file_quant
    method = str(qc.get("quant_method", ""))
    if not method.startswith("modelopt"):
        out.append(Violation("config.json", f"quantization_config.quant_method is {method!r}; vLLM needs modelopt*",
                             'set "quant_method": "modelopt"'))
    quant = effective_quantization(qc)
    if "quantization" in qc:
        out += _check_quantization_block(quant, "config.json:quantization_config.quantization")
    else:
        out += _check_flat_quantization_config(qc)
    if file_quant is not None:
        for key, label in (("quant_algo", "quant_algo"), ("kv_cache_quant_algo", "KV-cache algorithm")):
            if quant.get(key) != file_quant.get(key):
                out.append(Violation("config.json", f"quantization_config's {label} {quant.get(key)!r} differs from "
                                     f"{HF_QUANT_CONFIG}'s {file_quant.get(key)!r} (vLLM reads config.json)", REEXPORT))
        if sorted(quant.get("exclude_modules") or []) != sorted(file_quant.get("exclude_modules") or []):
            out.append(Violation("config.json", f"quantization_config.ignore differs from {HF_QUANT_CONFIG} "
                                 "exclude_modules (vLLM reads config.json first)",
                                 "make both lists identical; " + REEXPORT))
    return quant


def _check_flat_quantization_config(qc: dict) -> list[Violation]:
    where = "config.json:quantization_config"
    out = []
    algo = qc.get("quant_algo")
    if not isinstance(algo, str) or not algo or algo != algo.upper():
        out.append(Violation(where, f"quant_algo {algo!r} is not an upper-case algorithm name",
                             "write it upper-case (FP8, NVFP4)"))
    if "ignore" in qc and not isinstance(qc["ignore"], list):
        out.append(Violation(where, f"ignore must be a list of module patterns, found {qc['ignore']!r}", REEXPORT))
    scheme = qc.get("kv_cache_scheme")
    if scheme is not None and not (isinstance(scheme, dict) and scheme.get("type") == "float"
                                   and scheme.get("num_bits") == 8):
        out.append(Violation(where, f"kv_cache_scheme {scheme!r} is not an FP8 scheme (type float, num_bits 8); "
                             "vLLM would serve an unquantized KV cache", "use FP8 or drop kv_cache_scheme"))
    if algo == "NVFP4":
        sizes = {"group_size": qc.get("group_size")}
        for name, group in (qc.get("config_groups") or {}).items():
            for part in ("weights", "input_activations"):
                if isinstance((group or {}).get(part), dict):
                    sizes[f"config_groups.{name}.{part}.group_size"] = group[part].get("group_size")
        for key, size in sizes.items():
            if size is not None and size != NVFP4.group_size:
                out.append(Violation(where, f"NVFP4 needs {key} {NVFP4.group_size}, found {size!r}",
                                     f"set it to {NVFP4.group_size}"))
    return out


def _check_quantization_block(quant: dict, where: str) -> list[Violation]:
    """The nested ModelOpt block (hf_quant_config.json `quantization`): vLLM requires every field listed here."""
    out = []
    algo = quant.get("quant_algo")
    if not isinstance(algo, str) or not algo or algo != algo.upper():
        out.append(Violation(where, f"quant_algo {algo!r} is not an upper-case algorithm name",
                             "write it upper-case (FP8, NVFP4)"))
    if "kv_cache_quant_algo" not in quant:
        out.append(Violation(where, "no kv_cache_quant_algo key (vLLM requires it, null when the KV cache is not "
                             "quantized)", 'add "kv_cache_quant_algo": null'))
    else:
        kv = quant["kv_cache_quant_algo"]
        if kv is not None and (not isinstance(kv, str) or kv != kv.upper()):
            out.append(Violation(where, f"kv_cache_quant_algo {kv!r} is not upper-case", "write it upper-case (FP8)"))
    if algo != "MIXED_PRECISION" and not isinstance(quant.get("exclude_modules"), list):
        out.append(Violation(where, "no exclude_modules list", 'add "exclude_modules": [...] (lm_head, routers, ...)'))
    if algo == "NVFP4" and quant.get("group_size") != NVFP4.group_size:
        out.append(Violation(where, f"NVFP4 needs group_size {NVFP4.group_size}, found {quant.get('group_size')!r}",
                             f'set "group_size": {NVFP4.group_size}'))
    if algo == "MIXED_PRECISION" and not isinstance(quant.get("quantized_layers"), dict):
        out.append(Violation(where, "MIXED_PRECISION without a quantized_layers map", REEXPORT))
    return out


def check_generation_config(export_dir: Path) -> list[Violation]:
    out: list[Violation] = []
    gen = _read_json_file(export_dir, GENERATION_CONFIG, out)
    if gen is None:
        return [Violation(GENERATION_CONFIG, v.rule, "write the sampler defaults (stage=export does)") for v in out]

    def bad(key: str, rule: str) -> None:
        out.append(Violation(f"{GENERATION_CONFIG}:{key}", rule,
                             f"set `{key}` (sampler.{key} or the DiffusionGemma default); " + REEXPORT))

    steps = gen.get("max_denoising_steps")
    if not isinstance(steps, int) or steps <= 0:
        bad("max_denoising_steps", f"must be a positive integer, found {steps!r}")
    sampler = gen.get("sampler_config")
    if not isinstance(sampler, dict) or "EntropyBound" not in str(sampler.get("_cls_name", "")):
        bad("sampler_config", f"vLLM needs an EntropyBoundSamplerConfig, found {sampler!r}")
    elif not _positive_number(sampler.get("entropy_bound")):
        bad("sampler_config", f"entropy_bound must be > 0, found {sampler.get('entropy_bound')!r}")
    t_min, t_max = gen.get("t_min"), gen.get("t_max")
    for key, value in (("t_min", t_min), ("t_max", t_max)):
        if not isinstance(value, (int, float)) or value < 0:
            bad(key, f"must be a number >= 0, found {value!r}")
    if isinstance(t_min, (int, float)) and isinstance(t_max, (int, float)) and t_max <= t_min:
        bad("t_max", f"must be above t_min ({t_max} <= {t_min})")
    stability = gen.get("stability_threshold")
    if not isinstance(stability, int) or stability < 0:
        bad("stability_threshold", f"must be an integer >= 0, found {stability!r}")
    if not _positive_number(gen.get("confidence_threshold")):
        bad("confidence_threshold", f"must be > 0, found {gen.get('confidence_threshold')!r}")
    if gen.get("eos_token_id") is None:
        bad("eos_token_id", "missing (the sampler stops at end-of-sequence)")
    return out


def check_tokenizer(export_dir: Path, config: dict) -> list[Violation]:
    fix = "copy the tokenizer files of the SFT model dir (stage=export saves them)"
    if not any((export_dir / f).exists() for f in TOKENIZER_VOCAB_FILES):
        return [Violation(" / ".join(TOKENIZER_VOCAB_FILES), "no tokenizer vocabulary file", fix)]
    if not (export_dir / TOKENIZER_CONFIG).exists():
        return [Violation(TOKENIZER_CONFIG, "file missing", fix)]
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(export_dir)
    except (OSError, ValueError, TypeError) as e:
        return [Violation(TOKENIZER_CONFIG, f"the tokenizer does not load ({e})", fix)]
    mismatch = tokenizer_mismatch(tokenizer, export_dir)
    if mismatch:
        return [Violation(TOKENIZER_RECORD, mismatch, fix)]
    vocab = (config.get("text_config") or config).get("vocab_size")
    if vocab is not None and len(tokenizer) > vocab:
        return [Violation(TOKENIZER_CONFIG, f"{len(tokenizer)} tokens but vocab_size is {vocab}",
                          "export the tokenizer the model was trained with")]
    return []


def check_manifest_rule(export_dir: Path, required: bool = False) -> list[Violation]:
    if not (export_dir / MANIFEST).exists():
        if required:
            return [Violation(MANIFEST, "missing, so no file of the bundle can be verified (a truncated or swapped "
                              "file would pass)", "re-export the bundle, or pass export.skip_hashes=true to check "
                              "the loader rules of a checkpoint another tool wrote")]
        return []  # foreign checkpoints carry none; the pipeline's loader requires it separately
    return [Violation(name, problem, "restore the file from the export, or re-export (the manifest is written "
                      "last and covers every file)") for name, problem in manifest_problems(export_dir)]


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


# --------------------------------------------------------------------------------------------------- tensors


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensors (canonical names -> shapes) a DiffusionGemma of this config stores, with its tied encoder
    weights under the decoder's names and no lm_head (tied to the embeddings)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig.from_dict({k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(cfg)
    shapes = {}
    for name, t in model.state_dict().items():
        shapes[canonical_tied_name(name)] = tuple(t.shape)
    shapes.pop("lm_head.weight", None)
    return shapes


def check_tensors(tensors: CheckpointTensors, config: dict, quant: dict | None) -> list[Violation]:
    out: list[Violation] = []
    try:
        expected = expected_tensors(config)
    except (ValueError, TypeError, KeyError) as e:
        return [Violation("config.json", f"does not build a DiffusionGemma ({e})", REEXPORT)]
    modules = tensors.modules()
    exclude = list((quant or {}).get("exclude_modules") or [])
    quantized_export = quant is not None

    expanded = _expand_experts(expected, tensors)
    accounted: set[str] = set()
    for name, shape in expanded.items():
        module, leaf = split_leaf(name)
        leaves = modules.get(module, {})
        fmt = quantized_format(leaves) if leaf == "weight" else None
        if fmt is not None:
            accounted.update(t.name for t in leaves.values())
            out += _check_quantized_linear(tensors, module, leaves, fmt, shape, quant, exclude)
            continue
        stored = tensors.get(name)
        if stored is None:
            out.append(Violation(name, "missing tensor", REEXPORT))
            continue
        accounted.add(name)
        if FUSED_EXPERTS.match(name) and stored.dtype in FORMAT_BY_WEIGHT_DTYPE:
            out.append(_fused_experts_violation(name))
            continue
        out += _check_unquantized(stored, shape, leaves, quantized_export, exclude, config)
    out += _check_stray_quantized(modules, accounted)
    out += _check_unexpected(tensors, accounted, modules)
    if quantized_export:
        if not matches_module("lm_head", exclude):
            out.append(Violation(f"{QUANT_CONFIG_WHERE}:exclude list", "lm_head is not listed (vLLM cannot load a "
                                 "quantized lm_head)", 'add "lm_head"'))
        out += _check_shared_input_scales(tensors, modules)
        out += _check_kv_scales(tensors, modules, quant.get("kv_cache_quant_algo"))
    elif any(quantized_format(leaves) for leaves in modules.values()):
        out.append(Violation(HF_QUANT_CONFIG, "quantized tensors but no quantization config",
                             "write hf_quant_config.json and config.json quantization_config; " + REEXPORT))
    return out


def _expand_experts(expected: dict[str, tuple[int, ...]], tensors: CheckpointTensors) -> dict[str, tuple[int, ...]]:
    """Expected names with each fused 3-D expert parameter replaced by per-expert linears, unless the checkpoint
    stores it fused (allowed for unquantized experts: Hugging Face's own layout)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in expected.items():
        m = FUSED_EXPERTS.match(name)
        if m is None or name in tensors:
            out[name] = shape
            continue
        n_experts, rows, cols = shape
        for e in range(n_experts):
            base = f"{m['experts']}.{e}"
            if m["param"] == "gate_up_proj":
                out[f"{base}.gate_proj.weight"] = (rows // 2, cols)
                out[f"{base}.up_proj.weight"] = (rows // 2, cols)
            else:
                out[f"{base}.down_proj.weight"] = (rows, cols)
    return out


def _check_quantized_linear(
    tensors: CheckpointTensors,
    module: str, leaves: dict[str, StoredTensor], fmt: LinearFormat, shape: tuple[int, ...],
    quant: dict | None, exclude: list[str],
) -> list[Violation]:
    out = []
    reason = keep_unquantized_reason(module)
    if reason:
        out.append(Violation(f"{module}.weight", f"is quantized ({fmt.algo}) but must stay unquantized: {reason}",
                             f"disable its quantizers in the quantize recipe ('{module.split('.')[-1]}' / "
                             f"'*{_keep_key(module)}*' enable: false) and re-export"))
    if quant is None:
        return out
    if matches_module(module, exclude):
        out.append(Violation(f"{module}.weight", f"is quantized ({fmt.algo}) but matched by exclude_modules",
                             "remove the module from exclude_modules, or export it unquantized"))
    algo = quant.get("quant_algo")
    if algo == "MIXED_PRECISION":
        algo = ((quant.get("quantized_layers") or {}).get(module) or {}).get("quant_algo")
    if algo != fmt.algo:
        out.append(Violation(f"{module}.weight", f"stored as {fmt.algo} but the quantization config says {algo!r}",
                             REEXPORT))
    for leaf in fmt.leaves:
        if leaf not in leaves:
            out.append(Violation(f"{module}.{leaf}", f"missing: every {fmt.algo} linear needs "
                                 f"{', '.join(fmt.leaves)}", REEXPORT))
    weight = leaves["weight"]
    if len(shape) == 2:
        out_f, in_f = shape
        if fmt.group_size and in_f % fmt.group_size:
            out.append(Violation(f"{module}.weight", f"in_features {in_f} is not a multiple of {fmt.group_size} "
                                 f"({fmt.algo} blocks)", "exclude this layer from NVFP4 quantization"))
        elif weight.shape != fmt.weight_shape(out_f, in_f):
            out.append(Violation(f"{module}.weight", f"shape {list(weight.shape)}, {fmt.algo} of a [{out_f}, {in_f}] "
                                 f"linear is {list(fmt.weight_shape(out_f, in_f))}", REEXPORT))
        scale = leaves.get("weight_scale")
        if scale is not None:
            want = fmt.weight_scale_shape(out_f, in_f)
            if (scale.numel != 1) if not want else scale.shape != want:
                out.append(Violation(f"{module}.weight_scale", f"shape {list(scale.shape)}, expected "
                                     f"{list(want) or 'a scalar'}", REEXPORT))
    for leaf in ("weight_scale", "weight_scale_2", "input_scale"):
        t = leaves.get(leaf)
        if t is None:
            continue
        want_dtype = fmt.weight_scale_dtype if leaf == "weight_scale" else torch.float32
        if t.dtype != want_dtype:
            out.append(Violation(f"{module}.{leaf}", f"dtype {_dt(t.dtype)}, {fmt.algo} needs {_dt(want_dtype)}",
                                 f"store it as {_dt(want_dtype)}"))
        elif leaf != "weight_scale" and t.numel != 1:
            out.append(Violation(f"{module}.{leaf}", f"shape {list(t.shape)}, expected a scalar", REEXPORT))
        else:
            out += _check_scale_values(t, tensors.load(t.name))
    return out


def _check_stray_quantized(modules: dict[str, dict[str, StoredTensor]], accounted: set[str]) -> list[Violation]:
    """Quantized modules outside the architecture's stored set that must stay unquantized (a quantized lm_head)."""
    out = []
    for module, leaves in modules.items():
        fmt = quantized_format(leaves)
        reason = keep_unquantized_reason(module)
        if fmt is None or reason is None or leaves["weight"].name in accounted:
            continue
        accounted.update(t.name for t in leaves.values())
        out.append(Violation(f"{module}.weight", f"is quantized ({fmt.algo}) but must stay unquantized: {reason}",
                             f"drop {module}.* (lm_head is {DECODER_PREFIX}embed_tokens.weight) and keep the "
                             "module out of the quantize recipe"))
    return out


def _check_scale_values(t: StoredTensor, value: torch.Tensor) -> list[Violation]:
    v = value.float()
    if not torch.isfinite(v).all() or (v <= 0).any():
        bad = v[~torch.isfinite(v) | (v <= 0)].flatten()[:1].item()
        return [Violation(t.name, f"scale {bad} is not a positive finite number (an uncalibrated quantizer)",
                          "calibrate on data that reaches this layer, then re-export")]
    return []


def _check_unquantized(
    stored: StoredTensor, shape: tuple[int, ...], leaves: dict[str, StoredTensor], quantized_export: bool,
    exclude: list[str], config: dict,
) -> list[Violation]:
    out = []
    module, leaf = split_leaf(stored.name)
    if not stored.dtype.is_floating_point or stored.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        out.append(Violation(stored.name, f"dtype {_dt(stored.dtype)} on a tensor stored unquantized",
                             "store it in bfloat16/float16/float32, or export its scales"))
    if stored.shape != shape:
        out.append(Violation(stored.name, f"shape {list(stored.shape)}, the architecture has {list(shape)}",
                             "export from a model built with this config.json"))
    scales = [name for name in SCALE_LEAVES if name in leaves and name not in ("k_scale", "v_scale")]
    if leaf == "weight" and scales:
        out.append(Violation(stored.name, f"carries {', '.join(scales)} but its weight is {_dt(stored.dtype)}, "
                             "not a quantized dtype", "store the quantized weight (fp8 / packed uint8) or drop the "
                             "scales and exclude the module"))
    is_linear = (leaf == "weight" and len(shape) == 2) or FUSED_EXPERTS.match(stored.name)
    if quantized_export and is_linear:
        owner = module if leaf == "weight" else split_leaf(stored.name)[0]
        if engine_quantizes(owner, config) and not matches_module(owner, exclude):
            reason = keep_unquantized_reason(owner)
            why = f" ({reason})" if reason else ""
            out.append(Violation(owner, f"unquantized but not in exclude_modules{why}: a loader will look for "
                                 "its scales", f"add '{owner}' to exclude_modules (hf_quant_config.json and "
                                 "config.json quantization_config.ignore)"))
    return out


def _check_unexpected(tensors: CheckpointTensors, accounted: set[str], modules: dict) -> list[Violation]:
    out = []
    for t in tensors:
        if t.name in accounted:
            continue
        module, leaf = split_leaf(t.name)
        if leaf in SCALE_LEAVES and quantized_format(modules.get(module, {})) is None and f"{module}.weight" in tensors:
            continue  # reported with the unquantized weight they sit on
        if leaf in ("k_scale", "v_scale"):
            continue  # KV-cache scales, checked by _check_kv_scales
        if t.name.startswith(ENCODER_TEXT_PREFIX):
            out.append(Violation(t.name, "tied encoder weight stored a second time",
                                 f"store it once, as {canonical_tied_name(t.name)} (vLLM maps both onto one backbone)"))
        elif t.name == "lm_head.weight" or module == "lm_head":
            out.append(Violation(t.name, "lm_head is tied to the embeddings and must not be stored (nor quantized)",
                                 f"drop it; it is {DECODER_PREFIX}embed_tokens.weight"))
        elif FUSED_EXPERT_REMNANT.search(t.name):
            out.append(_fused_experts_violation(t.name))
        else:
            out.append(Violation(t.name, "unexpected tensor (not part of the DiffusionGemma architecture)",
                                 "remove it; " + REEXPORT))
    return out


def _fused_experts_violation(name: str) -> Violation:
    return Violation(name, "quantized fused 3-D expert tensor: loaders read quantized experts one expert at a time",
                     "split it into experts.<E>.{gate,up,down}_proj.{weight, weight_scale, weight_scale_2, "
                     "input_scale} (ModelOpt's export does)")


def _check_shared_input_scales(tensors: CheckpointTensors, modules: dict) -> list[Violation]:
    """Linears the loaders fuse (q/k/v, gate/up) are one tensor there: one format for all of them (vLLM refuses a
    partly excluded fused layer), and for NVFP4 one input_scale and weight_scale_2 (TensorRT-LLM asserts it)."""
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    formats: dict[str, dict[str, str]] = {}
    labels: dict[str, str] = {}
    for module, leaves in modules.items():
        group = fused_group(module)
        if group is None or "weight" not in leaves:
            continue
        key, label = group
        labels[key] = label
        fmt = quantized_format(leaves)
        formats.setdefault(key, {})[module] = fmt.algo if fmt else "unquantized"
        if fmt is NVFP4:
            groups.setdefault(key, {})[module] = {
                leaf: tensors.load(leaves[leaf].name).float() for leaf in SHARED_SCALE_LEAVES if leaf in leaves
            }
    out = []
    for key, members in sorted(formats.items()):
        if len(set(members.values())) > 1:
            listing = ", ".join(f"{m.rsplit('.', 1)[-1]}={f}" for m, f in sorted(members.items()))
            out.append(Violation(key, f"{labels[key]} are fused into one GEMM by the loaders but stored in different "
                                 f"formats ({listing})", "quantize all of them or exclude all of them; " + REEXPORT))
    for key, members in sorted(groups.items()):
        for leaf in SHARED_SCALE_LEAVES:
            values = {m: s[leaf] for m, s in members.items() if leaf in s}
            if len({float(v.flatten()[0]) for v in values.values()}) > 1:
                listing = ", ".join(f"{m.rsplit('.', 1)[-1]}={float(v.flatten()[0]):.6g}" for m, v in values.items())
                out.append(Violation(f"{key}", f"{labels[key]} share an input but their NVFP4 {leaf} differ "
                                     f"({listing}); TensorRT-LLM asserts they are equal",
                                     f"set every {leaf} of the group to their max (ModelOpt's export does); "
                                     + REEXPORT))
    return out


# The (canonical, decoder-named) K and V projections whose outputs a quantized KV cache stores.
KV_PROJECTIONS = re.compile(r"^model\.decoder\.layers\.\d+\.self_attn\.(k|v)_proj$")


def _check_kv_scales(tensors: CheckpointTensors, modules: dict, kv_algo: str | None) -> list[Violation]:
    """KV-cache scales are float32 scalars; absent when kv_cache_quant_algo is null (loaders would ignore them).
    With the algorithm set, either no K/V projection has one (a cast: vLLM's default scale 1.0 is what ModelOpt's
    fp8_cast recipe calibrates to) or every one has (a calibrated cache: one missing would silently be 1.0)."""
    out, present = [], set()
    for t in tensors:
        if split_leaf(t.name)[1] in ("k_scale", "v_scale"):
            present.add(t.name)
            if t.dtype != torch.float32 or t.numel != 1:
                out.append(Violation(t.name, f"KV-cache scale must be a float32 scalar, found {_dt(t.dtype)} "
                                     f"{list(t.shape)}", REEXPORT))
            else:
                out += _check_scale_values(t, tensors.load(t.name))
    if kv_algo is None and present:
        out.append(Violation(f"{QUANT_CONFIG_WHERE}:KV-cache algorithm", f"is null but the checkpoint stores "
                             f"{len(present)} KV-cache scales (e.g. {min(present)}), which loaders then ignore",
                             'set "kv_cache_quant_algo": "FP8" (scales from a quant.kv_cache=fp8 calibration), or '
                             "re-export from a quantize dir with quant.kv_cache=none"))
    if kv_algo is not None and present:
        for module in sorted(m for m in modules if KV_PROJECTIONS.match(m)):
            scale = f"{module}.{module[-6]}_scale"  # k_proj -> k_scale, v_proj -> v_scale
            if scale not in present:
                out.append(Violation(scale, f"missing: kv_cache_quant_algo is {kv_algo} and other K/V projections "
                                     "carry calibrated scales; this one would silently be cast with scale 1.0",
                                     REEXPORT))
    return out


def _keep_key(module: str) -> str:
    for part in ("self_conditioning", "router", "vision_tower", "embed_vision", "embed_tokens", "lm_head"):
        if part in module:
            return part
    return module


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["Violation", "CheckFailed", "check_export", "expected_tensors"]
