#!/usr/bin/env bash
# One GPU script (issue 13 item 7): at most 8 minutes on one H100/H200 with no network.
#   1. sudoku9 SFT (recipe=sudoku9, bf16) to a solve rate, with its gate (diffusion vs AR, fixed-step benchmark)
#   2. bench.sampler on bench100m in bf16, compiled with CUDA graphs: ours vs reference generate vs AR
#   3. FP8 real-GEMM decode vs bf16: stage=quantize quant=fp8 on the SFT model (its gate runs torch._scaled_mm)
#   4. NVFP4: ModelOpt's CUDA fake-quant vs our CPU emulation (max abs difference)
#   5. bench.gpu_report: one table + gpu.json
#
#   bench/gpu.sh --prepare            # HERE, with network: fetch the wheels the device lacks into .whl/
#   bench/gpu.sh [--out DIR]          # on the device (the device tool: carry .whl); DIR defaults to $OUT
#   bench/gpu.sh --smoke --out DIR    # every step at tiny size on CPU (tests/test_gpu_script.py runs it)
#   bench/gpu.sh --dry-run            # print the commands only
# Options: --sft-steps N (default 1200); --run DIR (the sudoku9 run dir; default /tmp/dg_gpu_run, outside $OUT: the
# device tool brings back at most 8 files); --skip-wheels. Each step has its own time limit (together 8 minutes) and
# a failing step does not stop the others: the table says which did not finish. DIR gets gpu.log (every step's
# output), sampler.json, nvfp4_cuda_vs_cpu.json and gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-bench/results/gpu}"
RUN=""; SMOKE=0; DRY=0; PREPARE=0; WHEELS=1; SFT_STEPS=1200
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --run) RUN="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --prepare) PREPARE=1; shift ;;
    --skip-wheels) WHEELS=0; shift ;;
    --sft-steps) SFT_STEPS="$2"; shift 2 ;;
    *) echo "bench/gpu.sh: unknown option $1 (see the header of bench/gpu.sh)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"

if [ "$PREPARE" = 1 ]; then
  exclude="$(git rev-parse --git-path info/exclude)"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  exec "$PY" -m bench.gpu_wheels download --dest .whl
fi

run() {  # run LIMIT_S NAME CMD...: one step, time-limited, output appended to gpu.log; a failure is reported, not fatal
  local limit="$1" name="$2"; shift 2
  echo "== $name (limit ${limit} s): $*"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS step="$OUT_DIR/step.log"
  echo "== $name: $*" >> "$OUT_DIR/gpu.log"
  timeout "$limit" "$@" > "$step" 2>&1
  local rc=$?
  cat "$step" >> "$OUT_DIR/gpu.log"
  echo "   $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT_DIR/gpu.log"
  if [ "$rc" != 0 ]; then tail -5 "$step"; fi
  if [ "$name" = report ]; then cat "$step"; fi
  rm -f "$step"
  return 0
}

if [ "$DRY" = 0 ]; then mkdir -p "$OUT_DIR"; : > "$OUT_DIR/gpu.log"; fi
WHEEL_DIR="${WHEEL_DIR:-.whl}"  # the device tool carries .whl (README of the device tool)
if [ "$WHEELS" = 1 ] && [ "$SMOKE" = 0 ] && [ -d "$WHEEL_DIR" ]; then
  echo "== wheels: pip install --no-index --no-deps --target /tmp/site $WHEEL_DIR/*.whl"
  if [ "$DRY" = 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEEL_DIR"/*.whl \
      || { echo "bench/gpu.sh: installing $WHEEL_DIR/ failed" >&2; exit 1; }
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1

if [ "$SMOKE" = 1 ]; then
  RUN="${RUN:-$OUT_DIR/run}"
  DEVICE=cpu
  MODEL=(model=tiny model.canvas_length=32)
  SIZE=(data.n_train=32 data.n_val=4 data.n_eval=2 data.independent.n_eval=2 trainer.batch_size=4
        trainer.max_steps=2 trainer.warmup_steps=1 trainer.val_check_interval=2 trainer.precision=32-true
        trainer.accelerator=cpu)
  GATE=(verify.batch_size=2 verify.speed_examples=1 verify.speed_rounds=1 verify.speed_confidence=0
        verify.fixed_steps_benchmark=2 verify.sweep_steps=[] verify.choose_steps=false verify.plots=false
        sampler.max_denoising_steps=2 calib.n_samples=2 calib.batch_size=2 quant.probe_prompts=2
        verify.allow_flat_metric=true quant.max_logits_error=0.5)  # a 2-step tiny model: nothing to solve, noisy logits
  SAMPLER=(--init tiny --device cpu --batch-sizes 1 --repeats 1 --warmup 0 --steps 2 --prompt-count 1)
  LIMITS=(600 600 600 600 600 600)
else
  RUN="${RUN:-/tmp/dg_gpu_run}"
  DEVICE=cuda
  MODEL=()
  # The ~24M-param sudoku9 model in bf16, sized so that the whole script stays under 8 minutes on one H100/H200.
  SIZE=(data.n_train=16000 data.n_val=128 data.n_eval=128 data.independent.n_eval=128 "trainer.max_steps=$SFT_STEPS"
        trainer.val_check_interval=400 trainer.progress_bar=none)
  # The gates run eager (sampler.compile=false): every sampler the gate builds (batch 64, batch 1, the fixed-step
  # benchmark, each sweep point) would compile its own CUDA graphs; step 2 measures the compiled sampler.
  GATE=(verify.batch_size=64 verify.speed_examples=8 verify.sweep_examples=32 sampler.compile=false
        calib.n_samples=64)
  SAMPLER=(--init bench100m --device cuda --dtype bfloat16 --compile true --batch-sizes 1 8 --repeats 5 --warmup 2)
  # seconds per step: base, sft (training + gate), sampler (compile + CUDA graphs), quantize fp8, nvfp4, report
  LIMITS=(30 190 110 100 30 20)
fi
COMMON=(recipe=sudoku9 "run_dir=$RUN" logger=none "device=$DEVICE" "${MODEL[@]}" "${SIZE[@]}" "${GATE[@]}")

run "${LIMITS[0]}" base "$PY" -m dg_pipeline stage=base "${COMMON[@]}"
run "${LIMITS[1]}" sft "$PY" -m dg_pipeline stage=sft "${COMMON[@]}"
run "${LIMITS[2]}" sampler "$PY" -m bench.sampler "${SAMPLER[@]}" --out "$OUT_DIR/sampler.json"
run "${LIMITS[3]}" quantize_fp8 "$PY" -m dg_pipeline stage=quantize quant=fp8 verify.time_simulated=true "${COMMON[@]}"
run "${LIMITS[4]}" nvfp4 "$PY" -m bench.quant_error --compare-cuda --skip-table --out "$OUT_DIR/nvfp4_cuda_vs_cpu.json"
run "${LIMITS[5]}" report "$PY" -m bench.gpu_report --run "$RUN" --sampler "$OUT_DIR/sampler.json" \
  --nvfp4 "$OUT_DIR/nvfp4_cuda_vs_cpu.json" --out "$OUT_DIR/gpu.json" --title "bench/gpu.sh ($DEVICE)"
