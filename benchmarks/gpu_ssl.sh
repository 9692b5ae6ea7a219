#!/usr/bin/env bash
# The `ssl` profile (the unlabelled pool and its pseudo-label options, the generated images'
# lambda, tau and teacher) at the paper's scale on a lent GPU:
#
#   THREENGAN_HOME=HOME benchmarks/gpu_ssl.sh OUT_DIR [SECONDS] [PARALLEL]
#
# Needs the dataset `kermany` (64 px) prepared under THREENGAN_HOME. Trains the grid (width
# 64, 100 epochs, N = 200, 5 seeds) PARALLEL runs at a time (default 10) in grid order, which
# is seed-major, for at most SECONDS (default 480; a stop keeps every finished run), then
# writes the report of the finished runs into OUT_DIR/ssl (report.md, results.json/.csv).
# Checkpoints stay behind; a second call on the same HOME goes on with the grid.
set -u -o pipefail
out=${1:?give an output folder}
seconds=${2:-480}
parallel=${3:-10}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
home=${THREENGAN_HOME:?set THREENGAN_HOME}
mkdir -p "$out"
nvidia-smi -L | tee "$out/log.txt"
$py -m threengan_cli info >>"$out/log.txt" 2>&1
t0=$SECONDS
timeout "$seconds" $py -m threengan_cli benchmark kermany --profile ssl --width 64 \
  --epochs 100 --device cuda --parallel "$parallel" --out "$home/bench-ssl" \
  >>"$out/log.txt" 2>&1
echo "benchmark: rc $? in $((SECONDS - t0)) s" | tee -a "$out/log.txt"
$py -m threengan_cli benchmark merge "$home/bench-ssl" --out "$out/ssl" -q >>"$out/log.txt" 2>&1
echo "merge: rc $?" | tee -a "$out/log.txt"
