#!/usr/bin/env bash
# Set up mmpref in a virtual environment: torch first (so pip does not pull a multi-GB CUDA build where a CPU one
# is wanted), then the package. Usage: bash scripts/setup.sh [EXTRAS], e.g. `bash scripts/setup.sh test`.
# Override the torch requirement with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.5.1" or a CUDA index URL via
# PIP_EXTRA_INDEX_URL) and the environment folder with MMPREF_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MMPREF_VENV:-.venv}
extras=${1:-}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$py" -m pip install -q -e ".${extras:+[$extras]}"
