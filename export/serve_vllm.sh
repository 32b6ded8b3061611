#!/usr/bin/env bash
# Serve an exported DiffusionGemma bundle (<run_dir>/export/<name>/) with vLLM: an OpenAI-compatible API.
#
#   export/serve_vllm.sh <export dir> [extra `vllm serve` arguments...]
#   e.g. export/serve_vllm.sh runs/demo/export/fp8 --port 8001 --max-num-seqs 8
#
# The canvas length comes from the bundle's config.json and the sampler settings (max_denoising_steps,
# entropy_bound, t_min, t_max, stability_threshold, confidence_threshold) from its generation_config.json.
# Before serving, the bundle is checked (loader rules + manifest sha256) when dg_pipeline is importable;
# DG_SKIP_CHECK=1 skips that. Quantization (FP8 / NVFP4) is read from config.json's quantization_config.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_bundle.sh"
bundle_dir_checked "vllm serve args" "$@"
shift

canvas_length="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["canvas_length"])' "$dir/config.json")"

exec vllm serve "$dir" \
  --diffusion-config "{\"canvas_length\": ${canvas_length}}" \
  --generation-config "$dir" \
  "$@"
