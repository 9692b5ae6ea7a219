#!/usr/bin/env bash
# The bundled default model's candidates and the robust recipe's study cells, on a lent GPU:
#
#   THREENGAN_HOME=HOME benchmarks/gpu_default_model.sh OUT_DIR
#
# Needs the dataset `kermany` (64 px) prepared under THREENGAN_HOME.
# 1. in the background: 3ngan and vanilla, robust recipe, width 64, batch 10, 40 epochs, on a
#    class-balanced labelled set of 2,424 images (all 1,212 NORMAL train images and 1,212 of
#    the 3,471 PNEUMONIA ones, by seed 0), each exported as a shippable file. (Trained on all
#    4,683 labelled images, 74% of them pneumonia, the same recipe called 36% of normal test
#    X-rays pneumonia; at a balanced N = 200 it called 12-15%.)
# 2. the `study` profile's robust cells at the paper's width 64 and 100 epochs: vanilla and
#    3ngan, N = 200, 5 seeds (`--methods vanilla,3ngan --recipe robust`).
set -u -o pipefail
out=${1:?give an output folder}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
home=${THREENGAN_HOME:?set THREENGAN_HOME}
log="$out/log.txt"
nvidia-smi -L | tee "$log"

for m in 3ngan vanilla; do
  (
    t=$SECONDS
    timeout 200 $py -m threengan_cli train kermany --method $m --recipe robust --size 2424 \
      --epochs 40 --device cuda --seed 0 --name default-$m --json \
      >"$home/default-$m.json" 2>"$home/default-$m.log"
    echo "default-$m: rc $? in $((SECONDS - t)) s" >>"$log"
    $py tools/export_default_model.py "$home/runs/default-$m" --weights final \
      --out "$out/default-$m.safetensors" >>"$log" 2>&1
  ) &
done

t0=$SECONDS
timeout 200 $py -m threengan_cli benchmark kermany --profile study --methods vanilla,3ngan \
  --recipe robust --width 64 --epochs 100 --device cuda --out "$home/study-robust" --json \
  >"$home/study-robust.json" 2>"$home/study-robust.log"
echo "study robust cells: rc $? in $((SECONDS - t0)) s" | tee -a "$log"
tail -3 "$home/study-robust.log" >>"$log"
wait

cd "$home" && tar czf "$out/results.tgz" --exclude='*.safetensors' --exclude='samples' \
  study-robust study-robust.json default-*.json default-*.log runs/default-* 2>>"$log"
ls -la "$out" >>"$log"
