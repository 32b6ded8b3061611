"""Tied encoder/decoder quantizers: one stored weight, two activation streams, one set of scales.

DiffusionGemma's encoder (causal prefill and block commits) and decoder (bidirectional canvas passes) are different
module objects over the very same weight tensors, so ModelOpt gives each its own quantizers and calibrates each on
its own stream. The checkpoint stores each weight once with one `input_scale`, so after calibration every pair of
corresponding quantizers (encoder layer i <-> decoder layer i, same relative name) is set to the max of the two
ranges: weight amax (equal anyway: same tensor), input amax (the two streams differ) and k/v cache amax. A quantizer
calibrated in only one stream takes that stream's amax, so a loop that skipped a stream cannot leave it at a default.
"""

from __future__ import annotations

import torch
from torch import nn

from dg_pipeline.model.structure import untied_backbone_weights


def _tensor_quantizers(module: nn.Module):
    from modelopt.torch.quantization.nn import TensorQuantizer

    for name, q in module.named_modules():
        if isinstance(q, TensorQuantizer):
            yield name, q


def _syncable(q) -> bool:
    """Enabled, statically scaled quantizers (dynamic / constant-amax ones carry no calibrated range)."""
    return q.is_enabled and not q._dynamic and not q._use_constant_amax and not q.is_mx_format


def tied_quantizer_pairs(model: nn.Module) -> list[tuple[str, object, str, object]]:
    """(encoder name, quantizer, decoder name, quantizer) for every quantizer of a tied encoder/decoder layer."""
    encoder = model.model.encoder.language_model
    decoder = model.model.decoder
    pairs = []
    for i, (enc_layer, dec_layer) in enumerate(zip(encoder.layers, decoder.layers)):
        dec_quantizers = dict(_tensor_quantizers(dec_layer))
        for rel, q_enc in _tensor_quantizers(enc_layer):
            q_dec = dec_quantizers.get(rel)
            if q_dec is not None:
                pairs.append(
                    (f"model.encoder.language_model.layers.{i}.{rel}", q_enc, f"model.decoder.layers.{i}.{rel}", q_dec)
                )
    return pairs


@torch.no_grad()
def sync_tied_quantizers(model: nn.Module) -> dict:
    """Give both quantizers of every tied pair amax = max(encoder, decoder); returns the quant.json `tied` block.

    `max_stream_gap` is the largest relative difference between the two streams' calibrated input ranges before
    the sync (why one stream's scale alone would clip the other).
    """
    untied = untied_backbone_weights(model)
    if untied:
        return {"synced": 0, "skipped": f"encoder/decoder weights are not tied ({', '.join(untied[:3])})"}
    synced, one_stream, gap = 0, [], 0.0
    for enc_name, q_enc, dec_name, q_dec in tied_quantizer_pairs(model):
        if not (_syncable(q_enc) and _syncable(q_dec)):
            continue
        a_enc, a_dec = getattr(q_enc, "_amax", None), getattr(q_dec, "_amax", None)
        if a_enc is None and a_dec is None:
            continue
        if a_enc is None or a_dec is None:
            one_stream.append(enc_name if a_enc is None else dec_name)
            amax = (a_dec if a_enc is None else a_enc).clone()
        else:
            amax = torch.maximum(a_enc, a_dec.to(a_enc.device))
            if "weight_quantizer" not in enc_name:
                hi = float(amax.max())
                if hi > 0:
                    gap = max(gap, float((a_enc - a_dec.to(a_enc.device)).abs().max()) / hi)
        q_enc.amax = amax
        q_dec.amax = amax.to(q_dec._amax.device if a_dec is not None else amax.device)
        synced += 1
    return {"synced": synced, "max_stream_gap": gap, "filled_from_other_stream": one_stream}


def tied_amax_mismatches(model: nn.Module) -> list[str]:
    """Names of tied quantizer pairs whose amax differ (empty after `sync_tied_quantizers`)."""
    bad = []
    for enc_name, q_enc, dec_name, q_dec in tied_quantizer_pairs(model):
        a, b = getattr(q_enc, "_amax", None), getattr(q_dec, "_amax", None)
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b.to(a.device))):
            bad.append(f"{enc_name} <-> {dec_name}")
    return bad
