"""LoRA through peft, with adapters SHARED by the encoder and decoder copy of each linear.

DiffusionGemma's encoder and decoder are separate module trees whose weights are tied. peft would give each copy
its own adapter, silently untying the backbone. So peft adapts only the decoder's linears, and each encoder layer
is then pointed at the very same wrapped modules: one base weight, one adapter, two call sites.

Targets: attention q/k/v/o and the dense MLP gate/up/down of the text layers. Never adapted: the MoE router
(frozen) and experts (3-D nn.Parameters, not Linear modules), the decoder-only self-conditioning MLP, the vision
tower. `merge_lora` folds the adapters into the base weights and returns a plain DiffusionGemma model.
"""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

from dg_pipeline.core.errors import InputError

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def decoder_target_pattern(target_modules) -> str:
    """peft `target_modules` regex (full match) for the named linears of the decoder's text layers only."""
    names = [str(n) for n in target_modules]
    unknown = [n for n in names if n not in ATTENTION_LINEARS + DENSE_MLP_LINEARS]
    if unknown or not names:
        raise InputError(
            f"trainer.lora.target_modules={names}: LoRA adapts only attention {list(ATTENTION_LINEARS)} and dense-MLP "
            f"{list(DENSE_MLP_LINEARS)} linears (router and experts are never adapted); "
            f"unknown: {unknown or 'none given'}"
        )
    attention = [n for n in names if n in ATTENTION_LINEARS]
    mlp = [n for n in names if n in DENSE_MLP_LINEARS]
    parts = []
    if attention:
        parts.append(rf"self_attn\.({'|'.join(attention)})")
    if mlp:
        parts.append(rf"mlp\.({'|'.join(mlp)})")
    return rf"model\.decoder\.layers\.\d+\.({'|'.join(parts)})"


def adapted_linears(layer, names) -> list[tuple[object, str]]:
    """(parent module, attribute) of each target linear present in one text layer (v_proj is absent on full
    layers, which reuse k for v)."""
    found = []
    for name in names:
        parent = layer.self_attn if name in ATTENTION_LINEARS else layer.mlp
        if getattr(parent, name, None) is not None:
            found.append((parent, name))
    return found


def share_adapters_with_encoder(model, target_modules) -> int:
    """Point each encoder layer at the decoder's LoRA-wrapped modules; returns how many were shared."""
    encoder_layers = model.model.encoder.language_model.layers
    shared = 0
    for enc_layer, dec_layer in zip(encoder_layers, model.model.decoder.layers):
        for (enc_parent, name), (dec_parent, _) in zip(
            adapted_linears(enc_layer, target_modules), adapted_linears(dec_layer, target_modules)
        ):
            setattr(enc_parent, name, getattr(dec_parent, name))
            shared += 1
    return shared


def apply_lora(model, lora_cfg):
    """Inject shared LoRA adapters in place; returns the peft model (keep it for `merge_lora`).

    Only adapter weights stay trainable. `model` itself (now holding the adapters) is what the objective runs.
    """
    targets = list(lora_cfg.target_modules)
    config = LoraConfig(
        r=int(lora_cfg.rank),
        lora_alpha=float(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=decoder_target_pattern(targets),
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    share_adapters_with_encoder(model, targets)
    return peft_model


def merge_lora(peft_model, target_modules):
    """Fold the adapters into the (tied) base weights; returns the plain DiffusionGemmaForBlockDiffusion."""
    model = peft_model.get_base_model()
    # Un-share first, so peft meets each wrapped module exactly once (under the decoder) when it unloads.
    encoder_layers = model.model.encoder.language_model.layers
    for enc_layer, dec_layer in zip(encoder_layers, model.model.decoder.layers):
        for (enc_parent, name), (dec_parent, _) in zip(
            adapted_linears(enc_layer, target_modules), adapted_linears(dec_layer, target_modules)
        ):
            setattr(enc_parent, name, getattr(dec_parent, name).get_base_layer())
    return peft_model.merge_and_unload()
