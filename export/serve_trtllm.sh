#!/usr/bin/env bash
# Serve an exported DiffusionGemma bundle (<run_dir>/export/<name>/) with TensorRT-LLM's PyTorch backend
# (trtllm-serve: an OpenAI-compatible API). It reads the same unified Hugging Face checkpoint as vLLM.
#
#   export/serve_trtllm.sh <export dir> [extra `trtllm-serve` arguments...]
#   e.g. export/serve_trtllm.sh runs/demo/export/nvfp4 --port 8001 --max_batch_size 8
#
# NVFP4 GEMMs need a Blackwell GPU; Hopper (H100/H200) serves the FP8 bundle. Before serving, the bundle is
# checked (loader rules, incl. the shared q/k/v and gate/up NVFP4 scales TensorRT-LLM asserts on, + manifest
# sha256) when dg_pipeline is importable; DG_SKIP_CHECK=1 skips that.
set -euo pipefail

if [[ $# -lt 1 || ! -d "$1" ]]; then
  echo "usage: $0 <export dir> [trtllm-serve args...]   (a dir written by: python -m dg_pipeline stage=export)" >&2
  exit 2
fi
dir="$(cd "$1" && pwd)"
shift
PYTHON="${PYTHON:-python3}"

if [[ "${DG_SKIP_CHECK:-0}" != "1" ]] && "$PYTHON" -c "import dg_pipeline" 2>/dev/null; then
  "$PYTHON" -m dg_pipeline stage=check input="$dir" logger=none
fi

exec trtllm-serve "$dir" --backend pytorch "$@"
