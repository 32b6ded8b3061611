"""Export: the release checkpoint (ModelOpt unified HF or plain HF), the loader-rule checker, manifest, reload
parity and the model card. The format and the checker's rules: export/FORMAT.md.

    export_quantized / export_unquantized   write a bundle's weights, configs, generation config, tokenizer
    check_export                            every loader-rule violation of a dir (Violation: where, rule, fix)
    write_manifest / verify_manifest        sha256 of every file; a tampered file is an error naming it
    load_export                             the bundle back as a plain-torch DiffusionGemmaForBlockDiffusion
    load_for_eval                           any model dir, quantize output or export, as its gate evaluates it
    render_model_card                       README.md of the bundle
"""

from dg_pipeline.export.checker import CheckFailed, Violation, check_export
from dg_pipeline.core.manifest import manifest_problems, verify_manifest, write_manifest
from dg_pipeline.export.model_card import ModelCardFacts, render_model_card
from dg_pipeline.export.reload import (
    EvalModel,
    ReloadedExport,
    dequantized_state_dict,
    load_export,
    load_for_eval,
    merge_per_expert,
)
from dg_pipeline.export.unified import (
    ExportResult,
    decoder_config_isolated,
    describe_export,
    export_quantized,
    export_unquantized,
    release_generation_config,
)

__all__ = [
    "CheckFailed",
    "Violation",
    "check_export",
    "manifest_problems",
    "verify_manifest",
    "write_manifest",
    "ModelCardFacts",
    "render_model_card",
    "EvalModel",
    "ReloadedExport",
    "dequantized_state_dict",
    "load_export",
    "load_for_eval",
    "merge_per_expert",
    "ExportResult",
    "decoder_config_isolated",
    "describe_export",
    "export_quantized",
    "export_unquantized",
    "release_generation_config",
]
