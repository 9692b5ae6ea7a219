#!/usr/bin/env bash
# How long the whole `paper` profile takes on this GPU, measured in pieces that fit a short
# lease, and what training the repeats of a cell in parallel buys:
#
#   THREENGAN_HOME=... benchmarks/gpu_paper_estimate.sh OUT_DIR
#
# 1. the CUDA tests; 2. the same slice of the paper grid (sizes 200 and 1000, 5 repeats,
# 5 epochs) with --parallel 1 and --parallel 5; 3. the whole paper grid (4 methods x 5 sizes
# x 5 repeats) at 2 and at 4 epochs, --parallel 5: the difference is the cost of 2 epochs of
# the grid, so 100 epochs ~ T(2) + 49 x (T(4) - T(2)). Wall times go to OUT_DIR/times.txt.
set -u -o pipefail
out=${1:?give an output folder}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

timed() {  # timed LABEL CMD...: run CMD, append "LABEL rc=.. ms=.." to times.txt
  local label=$1 t0=${EPOCHREALTIME/./}
  shift
  "$@"
  echo "$label rc=$? ms=$(((${EPOCHREALTIME/./} - t0) / 1000))" | tee -a "$out/times.txt"
}

nvidia-smi -L | tee "$out/times.txt"
timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_training.py -k cuda 2>&1 | tail -5

bench() {  # bench NAME ARGS...
  local name=$1
  shift
  timeout 240 $py -m threengan_cli benchmark kermany --profile paper --out "$out/$name" \
    --json "$@" >"$out/$name.json" 2>"$out/$name.log"
}
timed slice-p5 bench slice-p5 --sizes 200,1000 --epochs 5 --parallel 5
timed paper-e2 bench paper-e2 --epochs 2 --parallel 5
timed paper-e4 bench paper-e4 --epochs 4 --parallel 5
timed slice-p1 bench slice-p1 --sizes 200,1000 --epochs 5 --parallel 1
tail -3 "$out"/*.log
