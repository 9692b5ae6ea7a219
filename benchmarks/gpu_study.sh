#!/usr/bin/env bash
# The accuracy study at the paper's scale, and the default-model candidates, on a lent GPU:
#
#   THREENGAN_HOME=HOME benchmarks/gpu_study.sh OUT_DIR [STUDY_SECONDS]
#
# Needs the dataset `kermany` (64 px) prepared under THREENGAN_HOME. In one go:
# 0. a 2-epoch robust run on the GPU (CUDA graphs with augmentation, averaging and the
#    unlabelled pool), which fails fast if any of it cannot be captured;
# 1. in the background, the default-model candidates: 3ngan and vanilla, robust recipe, on all
#    labelled train images (30 epochs, width 64, batch 10), each exported as a shippable file;
# 2. the `study` profile at the paper's width 64 and 100 epochs (N = 200, 5 seeds, vanilla and
#    3ngan under both recipes, and the ladder), resumable: a second call goes on with it.
# What comes back: OUT_DIR/results.tgz (reports, results.json, summaries and metrics of every
# run; no checkpoints), the exported candidates, and the logs.
set -u -o pipefail
out=${1:?give an output folder}
study_s=${2:-380}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
home=${THREENGAN_HOME:?set THREENGAN_HOME}
log="$out/log.txt"

nvidia-smi -L | tee "$log"
$py -m threengan_cli info >>"$log" 2>&1

t0=$SECONDS
timeout 120 $py -m threengan_cli train kermany --size 200 --epochs 2 --device cuda \
  --name gpu-smoke --json >"$home/smoke.json" 2>"$home/smoke.log"
echo "smoke: rc $? in $((SECONDS - t0)) s" | tee -a "$log"
tail -3 "$home/smoke.log" >>"$log"

for m in 3ngan vanilla; do
  (
    t=$SECONDS
    timeout $((study_s + 60)) $py -m threengan_cli train kermany --method $m --recipe robust \
      --epochs 30 --device cuda --seed 0 --name default-$m --json \
      >"$home/default-$m.json" 2>"$home/default-$m.log"
    echo "default-$m: rc $? in $((SECONDS - t)) s" >>"$log"
    $py tools/export_default_model.py "$home/runs/default-$m" --weights final \
      --out "$out/default-$m.safetensors" >>"$log" 2>&1
  ) &
done

t0=$SECONDS
timeout "$study_s" $py -m threengan_cli benchmark kermany --profile study --width 64 \
  --epochs 100 --device cuda --out "$home/study" --json >"$home/study.json" \
  2>"$home/study.log"
echo "study: rc $? in $((SECONDS - t0)) s" | tee -a "$log"
tail -5 "$home/study.log" >>"$log"
wait

cd "$home" && tar czf "$out/results.tgz" --exclude='*.safetensors' --exclude='samples' \
  study smoke.json smoke.log default-*.json default-*.log runs/default-* 2>>"$log"
ls -la "$out" >>"$log"
