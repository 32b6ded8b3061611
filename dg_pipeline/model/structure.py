"""The weight structure of a DiffusionGemma: encoder and decoder run ONE text backbone and lm_head is the embedding
table (`untied_backbone_weights` lists every place where that no longer holds; empty = all tied), and how many
parameters each part holds (`parameter_counts`, tied tensors counted once)."""

from __future__ import annotations

import torch


def untied_backbone_weights(model) -> list[str]:
    """Names of encoder text weights that are not the very same tensor as the decoder's (plus lm_head/embeddings),
    and of layer_scalar buffers whose encoder and decoder values differ (buffers are never tied, only copied)."""
    encoder = model.model.encoder.language_model
    decoder = model.model.decoder
    problems = []
    for name, enc_param in encoder.named_parameters(remove_duplicate=False):
        dec_param = decoder.get_parameter(name)
        if enc_param.data_ptr() != dec_param.data_ptr():
            problems.append(f"model.encoder.language_model.{name}")
    if model.lm_head.weight.data_ptr() != decoder.embed_tokens.weight.data_ptr():
        problems.append("lm_head.weight")
    for i, (enc_layer, dec_layer) in enumerate(zip(encoder.layers, decoder.layers)):
        if not torch.equal(enc_layer.layer_scalar, dec_layer.layer_scalar):
            problems.append(f"layers.{i}.layer_scalar (encoder != decoder)")
    return problems


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def parameter_counts(model) -> dict[str, int]:
    """Unique parameters: total and per part (text backbone incl. experts, experts alone, self-conditioning, vision)."""
    encoder = model.model.encoder
    experts = sum(_numel(layer.experts) for layer in encoder.language_model.layers)
    return {
        "total": _numel(model),
        "text_backbone": _numel(encoder.language_model),
        "experts": experts,
        "self_conditioning": _numel(model.model.decoder.self_conditioning),
        "vision": _numel(encoder.vision_tower) + _numel(encoder.embed_vision),
    }
