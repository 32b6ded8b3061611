"""The release bundle's README.md: what the checkpoint is, how it was made and verified, and how to serve it.

`render_model_card` only formats (a huggingface_hub ModelCard: YAML metadata the Hub indexes, then the markdown
body); the export stage gathers the facts (`ModelCardFacts`) from the run: provenance
from the config and quant.json, every stage's verify.json (rendered by dg_pipeline.verify's markdown table), the
sampler settings from generation_config.json, and the quantization block from hf_quant_config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import ModelCard, ModelCardData

from dg_pipeline.core.io import read_json
from dg_pipeline.core.manifest import MANIFEST
from dg_pipeline.export.formats import GENERATION_CONFIG, HF_QUANT_CONFIG
from dg_pipeline.model.vllm_contract import (
    DEFAULT_MAX_NUM_SEQS,
    IGNORED_REQUEST_PARAMS,
    REFUSED_REQUEST_PARAMS,
    SAMPLER_FP32_COPIES,
    sampler_bytes_per_sequence,
)
from dg_pipeline.settings.sampler import SAMPLER_KEYS, read_sampler_settings


@dataclass
class ModelCardFacts:
    name: str  # the export's name (fp8, nvfp4, bf16, ...)
    export_dir: Path
    base: str  # base weights: a local dir or a named random init
    recipe: str
    data: str
    objective: str
    canvas_length: int
    vocab_size: int
    parameters: int | None = None
    quant_details: Mapping[str, Any] = field(default_factory=dict)  # from quant.json (calibration, kv cache, ...)
    verify_records: Mapping[str, Mapping] = field(default_factory=dict)  # stage label -> verify.json record
    dtype: str = "bfloat16"


def sampler_settings(export_dir: Path) -> dict[str, Any]:
    return read_sampler_settings(read_json(export_dir / GENERATION_CONFIG), SAMPLER_KEYS)


def vllm_command(export_dir: str, canvas_length: int) -> str:
    """What vLLM 0.32 needs beyond the bundle: the canvas length (--diffusion-config); the sampler settings come
    from the bundle's generation_config.json, which vLLM reads by default."""
    return f"vllm serve {export_dir} --diffusion-config '{{\"canvas_length\": {canvas_length}}}'"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def serving_lines(canvas_length: int, vocab_size: int) -> list[str]:
    """The card's vLLM section: the command, the request constraints and the --max-num-seqs memory sizing."""
    per_seq = sampler_bytes_per_sequence(canvas_length, vocab_size)
    return [
        "vLLM (>= 0.32; OpenAI-compatible server on port 8000):",
        "",
        "```bash",
        vllm_command("<this dir>", canvas_length),
        "# or, with the bundle checked first:  export/serve_vllm.sh <this dir>",
        "```",
        "",
        "- The sampler (`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `stability_threshold`, "
        "`confidence_threshold`) is read from `generation_config.json`; only the canvas length is a flag. The old "
        "`--hf-overrides diffusion_*` flags do nothing.",
        "- Requests: send `temperature` 1.0 or leave it out (the denoiser runs its own `t_max` -> `t_min` "
        f"schedule); vLLM refuses {', '.join(REFUSED_REQUEST_PARAMS[1:])} and any other temperature, and ignores "
        f"{', '.join(IGNORED_REQUEST_PARAMS)}. Per request, `extra_args` may set `diffusion_max_steps` and a "
        "smaller `diffusion_canvas_length`.",
        f"- Memory: at each denoising step vLLM's sampler holds {SAMPLER_FP32_COPIES} fp32 [canvas x vocab] tensors "
        f"per sequence (the soft-capped logits plus the three it reserves per sequence), {canvas_length} x "
        f"{vocab_size:,} x 4 B x {SAMPLER_FP32_COPIES} = **{_size(per_seq)} per sequence**, "
        f"{_size(per_seq * DEFAULT_MAX_NUM_SEQS)} at vLLM's default `--max-num-seqs {DEFAULT_MAX_NUM_SEQS}` for "
        "DiffusionGemma. This is not in vLLM's memory profile, so it must fit in what `--gpu-memory-utilization` "
        "leaves free: pick `--max-num-seqs` <= (1 - gpu_memory_utilization) x GPU memory / the per-sequence figure "
        f"(the published 26B-A4B, canvas 256 x vocab 262,144: {_size(sampler_bytes_per_sequence(256, 262144))} per "
        "sequence).",
    ]


def quantization_summary(export_dir: Path) -> dict[str, Any] | None:
    path = export_dir / HF_QUANT_CONFIG
    if not path.exists():
        return None
    hf = read_json(path)
    return {**hf.get("quantization", {}), "producer": hf.get("producer", {})}


def render_model_card(facts: ModelCardFacts) -> str:
    from dg_pipeline.verify.report import stages_markdown

    quant = quantization_summary(facts.export_dir)
    fmt = quant["quant_algo"] if quant else f"none ({facts.dtype})"
    lines = [
        f"# DiffusionGemma `{facts.name}`: block-diffusion language model ({fmt})",
        "",
        "A DiffusionGemma checkpoint (`DiffusionGemmaForBlockDiffusion`): one set of weights run as a causal "
        "encoder (prompt prefill, block commits) and a bidirectional decoder that denoises a canvas of "
        f"{facts.canvas_length} tokens per block. Produced and verified by `dg_pipeline`.",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        f"| base weights | {facts.base} |",
        f"| recipe | {facts.recipe} |",
        f"| data | {facts.data} |",
        f"| training objective | {facts.objective} |",
        f"| canvas length | {facts.canvas_length} |",
    ]
    if facts.parameters:
        lines.append(f"| parameters | {facts.parameters:,} (tied encoder/decoder counted once) |")
    lines.append(f"| weight format | {fmt} |")
    if quant:
        producer = quant.get("producer") or {}
        lines += [
            f"| quantizer | {producer.get('name', '?')} {producer.get('version', '')} |",
            f"| KV cache | {quant.get('kv_cache_quant_algo') or 'not quantized'} |",
        ]
        if quant.get("group_size"):
            lines.append(f"| block size | {quant['group_size']} |")
        lines.append(f"| kept unquantized | {', '.join(f'`{m}`' for m in quant.get('exclude_modules', []))} |")
    for key, value in facts.quant_details.items():
        lines.append(f"| {key} | {value} |")
    lines += ["", "## Verification gates", ""]
    if facts.verify_records:
        lines += [
            "Every stage ends with a gate (task accuracy + throughput, `verify.json`). `export/...` is this "
            "checkpoint reloaded from its files (weights dequantized in plain torch, activations unquantized), "
            "so it checks the files, not the fake-quantized model. Throughputs are measured on the device "
            "named in each row (a CPU host measures emulation, not serving speed).",
            "",
            stages_markdown(dict(facts.verify_records)).rstrip(),
        ]
    else:
        lines.append("No verify.json was found in the run directory.")
    sampler = sampler_settings(facts.export_dir)
    lines += [
        "",
        "## Sampler defaults (`generation_config.json`)",
        "",
        "| key | value |",
        "|---|---|",
        *[f"| `{k}` | {v} |" for k, v in sampler.items()],
        "",
        "Denoising: temperature falls linearly from `t_max` to `t_min` over at most `max_denoising_steps` steps; "
        "the entropy-bound sampler accepts the lowest-entropy positions within `entropy_bound` and re-noises the "
        "rest; a block stops early once it is stable for `stability_threshold` steps and its mean entropy is "
        "below `confidence_threshold`.",
        "",
        "## Serve",
        "",
        *serving_lines(facts.canvas_length, facts.vocab_size),
        "",
        "TensorRT-LLM has no DiffusionGemma model yet (its PyTorch backend has Dream and DFlash, not "
        "DiffusionGemma), so there is no TensorRT-LLM serve command. The checker still applies TensorRT-LLM's "
        "loading rules for the formats it reads (one NVFP4 `input_scale` / `weight_scale_2` per fused q/k/v and "
        "gate/up group), so the checkpoint needs no change once it has one.",
        "",
        "## Files",
        "",
        "- `config.json` (`architectures: [\"DiffusionGemmaForBlockDiffusion\"]`"
        + (", `quantization_config`" if quant else "") + "), "
        + ("`hf_quant_config.json`, " if quant else "")
        + "`generation_config.json`, `model.safetensors`, tokenizer files.",
        "- The encoder and decoder share their weights: each is stored once, under `model.decoder.*`; `lm_head` is "
        "the embedding table (`model.decoder.embed_tokens.weight`).",
    ]
    if quant:
        lines.append("- MoE experts are stored per expert: `...experts.<E>.{gate,up,down}_proj.{weight, weight_scale"
                     + (", weight_scale_2" if quant.get("quant_algo") == "NVFP4" else "") + ", input_scale}`.")
    lines += [
        f"- `{MANIFEST}` holds the sha256 of every file; `python -m dg_pipeline stage=check input=<this dir>` "
        "re-checks the loader rules and the hashes.",
        "",
    ]
    metadata = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                             tags=["diffusion-gemma", "block-diffusion", "modelopt" if quant else "unquantized",
                                   (quant["quant_algo"] if quant else facts.dtype).lower()])
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)))
