#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one go, for a lent GPU machine:
#
#   THREENGAN_HOME=... benchmarks/gpu_suite.sh OUT_DIR
#
# Needs the dataset `kermany` prepared under THREENGAN_HOME. Writes into OUT_DIR: the CUDA
# tests' log, the host CPU's fp32 and bf16 step, the step benchmark on the GPU (eager vs
# CUDA graphs, fp32 and bf16), a timed slice of
# the `paper` profile, and the `quick` profile in fp32 and bf16 (accuracy comparison).
set -u -o pipefail
out=${1:?give an output folder}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

nvidia-smi -L | tee "$out/gpu.txt"
$py -m threengan_cli info >>"$out/gpu.txt" 2>&1

# 1. The CUDA-only tests (graphs vs eager) and the training tests on a GPU machine.
timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_training.py 2>&1 | tail -15 | tee "$out/tests.txt"

# 1b. The host CPU's bf16 (AMX/AVX512-BF16 there, not on the project's VM): one step in fp32
#     and bf16 on the CPU, channels-last (as training runs) and not, next to both matmuls.
timeout 200 $py benchmarks/bench_step.py --device cpu --methods vanilla,3ngan \
  --precisions fp32,bf16 --modes eager,nchw --repeats 10 | tee "$out/bench_step_cpu_bf16.md"

# 2. One training step, eager vs replayed from a CUDA graph, next to a large matmul.
timeout 150 $py benchmarks/bench_step.py --device cuda --modes eager,graphs,unpaired \
  --precisions fp32,bf16 --repeats 10 --matmul 8192 | tee "$out/bench_step_cuda.md"

# 3. A slice of the paper profile, timed end to end (all four methods, one repeat).
t0=${EPOCHREALTIME/./}
timeout 200 $py -m threengan_cli benchmark kermany --profile paper --sizes 200,1000 \
  --repeats 1 --epochs 5 --out "$out/paper-slice" --json >"$out/paper-slice.json" \
  2>"$out/paper-slice.log"
echo "paper slice: rc $? in $(((${EPOCHREALTIME/./} - t0) / 1000)) ms" | tee -a "$out/gpu.txt"

# 4. The quick profile in fp32 and in bf16 (accuracy equal within the spread over seeds?).
for p in fp32 bf16; do
  t0=${EPOCHREALTIME/./}
  timeout 150 $py -m threengan_cli benchmark kermany --profile quick --precision $p \
    --out "$out/quick-$p" --json >"$out/quick-$p.json" 2>"$out/quick-$p.log"
  echo "quick $p: rc $? in $(((${EPOCHREALTIME/./} - t0) / 1000)) ms" | tee -a "$out/gpu.txt"
done
