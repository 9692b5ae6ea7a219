#!/usr/bin/env bash
# The worked example of "Adapting to your own X-rays" (docs/guide.md), end to end:
#
#   THREENGAN_HOME=HOME benchmarks/adapt_external.sh SOURCE WORK [SEED] [EPOCHS] [FOLDS]
#
# SOURCE: a folder of class folders of one hospital's X-rays named by patient (the NIH
# names of ../shared/data/external-dev/nih-cxr8-darkcovidnet); WORK: a new folder outside
# the repository. Splits SOURCE by patient (threengan split: 20 labelled and 35
# unlabelled per class, the rest held out), prepares the labelled + held-out images, then
# scores on the held-out images: the bundled model; 3ngan started from it with the
# unlabelled pool (as the pool runs by default, and with unlabelled_norm = "labelled") and
# without; and 3ngan trained from scratch on the same labels. Every run: the
# robust recipe, width 64 (the bundled model's), all the labelled images, EPOCHS epochs
# (default 60), the final model. With FOLDS (2 to 10; default 0 = none) the pool run is
# trained once more with --calibration-folds FOLDS (the same model, its temperature
# cross-fitted: FOLDS more trainings). Prints one line per model, with the held-out ECE of
# its probabilities; the runs and their summaries stay under HOME/runs/adapt-s<SEED>-*.
set -eu -o pipefail
source=${1:?give the source folder}
work=${2:?give a new work folder}
seed=${3:-0}
epochs=${4:-60}
folds=${5:-0}
py=${PYTHON:-python3}
: "${THREENGAN_HOME:?set THREENGAN_HOME}"
name=adapt-s$seed

$py -m threengan_cli split "$source" "$work" --seed "$seed" -q
$py -m threengan_cli prepare "$work/dataset" --name "$name" --val-fraction 0 -q
$py -m threengan_cli evaluate "$name" --split test --json >"$work/bundled.json"

common=(--method 3ngan --width 64 --epochs "$epochs" --seed "$seed" --device cpu --json)
train() {  # run name, extra flags...
  local run=$1
  shift
  local t0=$SECONDS
  $py -m threengan_cli train "$name" --name "$name-$run" "${common[@]}" "$@" >"$work/$run.json"
  echo "$run: $((SECONDS - t0)) s" >>"$work/times.txt"
}
train init-pool --init default --unlabelled "$work/unlabelled"
train init --init default
train scratch
printf '[train]\nunlabelled_norm = "labelled"\n' >"$work/labelled-norm.toml"
train init-pool-bn --init default --unlabelled "$work/unlabelled" --config "$work/labelled-norm.toml"
if [ "$folds" -gt 0 ]; then
  train init-pool-cf --init default --unlabelled "$work/unlabelled" --calibration-folds "$folds"
fi

$py - "$work" <<'EOF'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
rows = [("bundled model", json.loads((work / "bundled.json").read_text()))]
for run, label in (("init-pool", "--init default, pool"),
                   ("init-pool-bn", "--init default, pool, unlabelled_norm = labelled"),
                   ("init", "--init default, no pool"), ("scratch", "from scratch"),
                   ("init-pool-cf", "--init default, pool, --calibration-folds")):
    if (work / f"{run}.json").is_file():
        rows.append((label, json.loads((work / f"{run}.json").read_text())["test"]))
print("model | held-out n | accuracy | AUC | sensitivity | specificity | ECE")
for label, m in rows:
    print(f"{label} | {m['n']} | {m['accuracy']:.4f} | {m['auc']:.4f} | "
          f"{m['sensitivity']:.4f} | {m['specificity']:.4f} | {m['ece']:.4f}")
EOF
