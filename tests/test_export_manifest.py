"""manifest.json: every file of a bundle is hashed; loading a bundle whose files changed is an error naming them."""

from __future__ import annotations

import json

import pytest
import torch

from dg_pipeline.core.errors import InputError
from dg_pipeline.data.tokenizer import build_board_tokenizer
from dg_pipeline.export import (
    check_export,
    export_unquantized,
    load_export,
    manifest_problems,
    release_generation_config,
    write_manifest,
)
from dg_pipeline.model import build_model


@pytest.fixture
def bundle(tmp_path):
    tokenizer = build_board_tokenizer()
    model = build_model("tiny", tokenizer, 16, seed=0)
    out = tmp_path / "bf16"
    export_unquantized(model, tokenizer, out, release_generation_config(model, tokenizer), dtype=torch.bfloat16)
    write_manifest(out)
    return out


def test_the_manifest_lists_every_file_with_its_sha256(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in bundle.iterdir() if p.name != "manifest.json"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert manifest_problems(bundle) == []
    assert load_export(bundle).quant_algo is None  # verified on load


def test_a_tampered_file_is_an_error_naming_the_file(bundle):
    config = json.loads((bundle / "config.json").read_text())
    config["canvas_length"] = 64
    (bundle / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"config\.json: (sha256 differs|size)"):
        load_export(bundle)


def test_a_modified_weight_file_of_the_same_size_is_caught_by_its_hash(bundle):
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"model\.safetensors: sha256 differs from manifest\.json"):
        load_export(bundle)


def test_missing_and_added_files_are_named(bundle):
    (bundle / "tokenizer_config.json").unlink()
    (bundle / "notes.txt").write_text("added later")
    problems = dict(manifest_problems(bundle))
    assert "missing" in problems["tokenizer_config.json"]
    assert "not listed" in problems["notes.txt"]
    where = {v.where for v in check_export(bundle)}
    assert {"tokenizer_config.json", "notes.txt"} <= where


def test_a_bundle_without_a_manifest_is_not_loaded_unverified(bundle):
    (bundle / "manifest.json").unlink()
    with pytest.raises(InputError, match="no manifest.json"):
        load_export(bundle)
