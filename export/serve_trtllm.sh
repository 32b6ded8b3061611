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

source "$(dirname "${BASH_SOURCE[0]}")/_bundle.sh"
bundle_dir_checked "trtllm-serve args" "$@"
shift

exec trtllm-serve "$dir" --backend pytorch "$@"
