#!/usr/bin/env bash
# The CPU speed figures of issues 12 (item 9) and 13 (items 4, 5) for one trained 4x4 model, in one command:
#   bench/speed_figures.sh <run_dir>/sft/model
# 1. bench.sampler at batch 1 and 8: ours vs reference generate vs AR (adaptive stop; token parity checked)
# 2. the same in vLLM's fixed-step mode (16 steps per block, no adaptive stop)
# 3. bench.speedup_spread: the gate's speedup_vs_ar (5 interleaved rounds, median, spread, lower bound) quiet vs one
#    busy background process
# Each prints its table and writes bench/results/*.json. PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:?usage: bench/speed_figures.sh <model dir, e.g. runs/x/sft/model>}"
PY="${PYTHON:-python3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$PY" -m bench.sampler --model "$MODEL" --prompts sudoku4 --threads 1 --repeats 5
"$PY" -m bench.sampler --model "$MODEL" --prompts sudoku4 --threads 1 --repeats 5 --fixed-steps 16
"$PY" -m bench.speedup_spread --model "$MODEL" --rounds 5 --examples 16
