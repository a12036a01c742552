#!/usr/bin/env bash
# Optional: create .venv-monailabel and install MONAI Label 0.8.5 with the bundle's dependencies
# (requirements-monailabel.txt): about 2-4 minutes and 8.2 GB here (CUDA torch from the local wheel cache); .venv is
# untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
start=$(date +%s)
[ -x .venv-monailabel/bin/python ] || "$PYTHON" -m venv .venv-monailabel
.venv-monailabel/bin/python -m pip install --quiet --upgrade pip
.venv-monailabel/bin/python -m pip install --quiet -r requirements-monailabel.txt
.venv-monailabel/bin/python -c "import monailabel, monai, torch; \
print(f'installed monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}')"
echo "MONAI Label environment ready in $(( $(date +%s) - start )) s: .venv-monailabel ($(du -sh .venv-monailabel | cut -f1))"
