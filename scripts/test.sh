#!/usr/bin/env bash
# README command 2: set up (if needed) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export NO_ALBUMENTATIONS_UPDATE=1 OMP_WAIT_POLICY=PASSIVE
python -m pytest -q "$@"
