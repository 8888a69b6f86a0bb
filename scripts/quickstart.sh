#!/usr/bin/env bash
# README command 1: set up (if needed), train the default experiment on the embedded dataset (generated on first
# use), then evaluate the best checkpoint with evaluate.py and print its metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export NO_ALBUMENTATIONS_UPDATE=1 OMP_WAIT_POLICY=PASSIVE
run_dir="outputs/quickstart/$(date +%Y-%m-%d_%H-%M-%S)"
python train.py experiment=shapes_cls hydra.run.dir="$run_dir" "$@"
python evaluate.py ckpt_path="$run_dir/checkpoints/best.ckpt" hydra.run.dir="$run_dir/evaluate"
