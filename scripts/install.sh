#!/usr/bin/env bash
# Create .venv in the repository root and install the pinned dependencies (CPU torch from the local wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -c "import torch, monai; print(f'installed torch {torch.__version__}, monai {monai.__version__}')"
