#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install zoo with its training, export and test extras.
# torch/torchvision are pinned to the builds this project is tested with; change ZOO_TORCH_SPEC to use others.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
python -m pip install -q ${ZOO_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1} -e ".[dev]"
