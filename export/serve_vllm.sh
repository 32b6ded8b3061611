#!/usr/bin/env bash
# Serve an exported DiffusionGemma bundle (<run_dir>/export/<name>/) with vLLM (>= 0.32): an OpenAI-compatible API.
#
#   export/serve_vllm.sh <export dir> [extra `vllm serve` arguments...]
#   e.g. export/serve_vllm.sh runs/demo/export/fp8 --port 8001 --max-num-seqs 8
#
# Only what vLLM 0.32 reads: the bundle itself (config.json incl. quantization_config, generation_config.json with
# the sampler settings, tokenizer) and the canvas length through --diffusion-config (from the bundle's config.json).
# Requests must use temperature 1.0 (or omit it); penalties are ignored. Size --max-num-seqs with the memory figure
# in the bundle's README.md (the diffusion sampler's per-sequence transients are not in vLLM's memory profile).
# Before serving, the bundle is checked (vLLM's start-up attributes and loader rules + manifest sha256) when
# dg_pipeline is importable by $PYTHON (default python3); DG_SKIP_CHECK=1 skips that.
#
# TensorRT-LLM has no DiffusionGemma model yet, so there is no TensorRT-LLM script (export/FORMAT.md).
set -euo pipefail

if [[ $# -lt 1 || ! -d "$1" ]]; then
  echo "usage: $0 <export dir> [vllm serve args...]   (a dir written by: python -m dg_pipeline stage=export)" >&2
  exit 2
fi
dir="$(cd "$1" && pwd)"
shift
PYTHON="${PYTHON:-python3}"
if [[ "${DG_SKIP_CHECK:-0}" != "1" ]] && "$PYTHON" -c "import dg_pipeline" 2>/dev/null; then
  "$PYTHON" -m dg_pipeline stage=check input="$dir" logger=none
fi

canvas_length="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["canvas_length"])' "$dir/config.json")"

exec vllm serve "$dir" --diffusion-config "{\"canvas_length\": ${canvas_length}}" "$@"
