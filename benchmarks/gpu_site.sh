#!/usr/bin/env bash
# The site protocol (issue 24) at the paper's scale, one command on a GPU:
#
#   THREENGAN_HOME=HOME benchmarks/gpu_site.sh KERMANY_DIR OUT_DIR [PARALLEL] [SEEDS]
#
# KERMANY_DIR: the public tree (train/ val/ test/). Prepares `kermany-source` from its train/
# and val/ only (links in OUT_DIR/src; the test folder is the site), then runs
# benchmarks/site_study.py for robust 3ngan (N = 200, width 64, 100 epochs, seeds 11-15 by
# default, both halves) with every variant, and the same for vanilla without and with the
# pool; PARALLEL runs at a time (default 8). Reports: OUT_DIR/3ngan/report.md and
# OUT_DIR/vanilla/report.md. A second call goes on where the first stopped.
set -u -o pipefail
kermany=$(cd "${1:?give the Kermany folder}" && pwd)
out=${2:?give an output folder}
parallel=${3:-8}
seeds=${4:-11,12,13,14,15}
py=${PYTHON:-python3}
: "${THREENGAN_HOME:?set THREENGAN_HOME}"
export PYTHONUNBUFFERED=1
mkdir -p "$out/src"
ln -sfn "$kermany/train" "$out/src/train"
ln -sfn "$kermany/val" "$out/src/val"
nvidia-smi -L | tee "$out/log.txt"
$py -m threengan_cli prepare "$out/src" --name kermany-source -q >>"$out/log.txt" 2>&1
common=(--source kermany-source --site "$kermany/test" --size 200 --width 64 --epochs 100
  --seeds "$seeds" --device cuda --parallel "$parallel")
t0=$SECONDS
$py benchmarks/site_study.py "${common[@]}" --method 3ngan --out "$out/3ngan" \
  --variants none,pool,pool-bn,pool-dbn,pool-adamatch 2>&1 | tee -a "$out/log.txt"
echo "3ngan: rc $? in $((SECONDS - t0)) s" | tee -a "$out/log.txt"
t0=$SECONDS
$py benchmarks/site_study.py "${common[@]}" --method vanilla --out "$out/vanilla" \
  --variants none,pool 2>&1 | tee -a "$out/log.txt"
echo "vanilla: rc $? in $((SECONDS - t0)) s" | tee -a "$out/log.txt"
