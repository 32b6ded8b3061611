"""The quantize stage's artifact: <run_dir>/quantize/<quant>/ holds the ModelOpt state and quant.json.

`modelopt_state.pth` is `mto.save(model)`: ModelOpt's conversion state (which quantizers exist, their config, the
NVFP4 backend name) plus the model's state dict (weights and calibrated amax buffers). It restores onto the very
base it was made from, `load_model(quant.json["base_model_dir"])`, with `mto.restore` (`restore_quantized`).
"""

from __future__ import annotations

from pathlib import Path

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.io import read_json

STATE_FILE = "modelopt_state.pth"
QUANT_JSON = "quant.json"


def save_quantized(model, out_dir: str | Path) -> Path:
    import modelopt.torch.opt as mto

    path = Path(out_dir) / STATE_FILE
    mto.save(model, str(path))
    return path


def fold_weights_for_eval(model) -> int:
    """Bake every enabled fake-quant weight quantizer into its weight (ModelOpt's `mtq.fold_weight`); returns how many.

    Fake quantization re-rounds every weight on every forward; folded, the gate's forwards only quantize activations:
    the same logits bit for bit (tests), about 2x faster on CPU. Folding twice through the tied encoder/decoder weight
    is harmless: a rounded weight rounds to itself. Call it only after `save_quantized`: the folded model has lost
    the weight ranges export needs.
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer

    def enabled_weight_quantizers() -> int:
        return sum(
            1 for name, q in model.named_modules()
            if isinstance(q, TensorQuantizer) and "weight_quantizer" in name and q.is_enabled
        )

    before = enabled_weight_quantizers()
    mtq.fold_weight(model)
    return before - enabled_weight_quantizers()


def read_quant_record(quant_dir: str | Path) -> dict:
    quant_dir = Path(quant_dir)
    if not (quant_dir / QUANT_JSON).exists() or not (quant_dir / STATE_FILE).exists():
        raise InputError(
            f"{quant_dir}: not a quantize output (needs {QUANT_JSON} and {STATE_FILE}); run "
            f"`python -m dg_pipeline stage=quantize quant=<format>` first"
        )
    return read_json(quant_dir / QUANT_JSON)


def restore_quantized(quant_dir: str | Path, device: str = "cpu", dtype: str | None = None, base_dir: str | Path | None = None):
    """(quantized model, tokenizer, quant.json record): the base model re-loaded and the ModelOpt state restored.

    base_dir: the model dir the state was calibrated on; None = quant.json's `base_model_dir`.
    """
    import modelopt.torch.opt as mto

    from dg_pipeline.model import load_model
    from dg_pipeline.quant.nvfp4_cpu import register_nvfp4_backend

    quant_dir = Path(quant_dir)
    record = read_quant_record(quant_dir)
    base = Path(base_dir or record["base_model_dir"])
    if not base.exists():
        raise InputError(
            f"{quant_dir / QUANT_JSON}: base_model_dir {base} no longer exists; the ModelOpt state restores onto the "
            f"model it was calibrated on (re-run stage=quantize, or pass its new location)"
        )
    register_nvfp4_backend()  # the state may name the emulated NVFP4 backend
    model, tokenizer = load_model(base, dtype=dtype or record.get("dtype", "float32"), device=device)
    mto.restore(model, str(quant_dir / STATE_FILE))
    return model.eval(), tokenizer, record
