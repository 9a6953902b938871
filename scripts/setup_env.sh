#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install scnym into it.
# Sourced by demo_script.sh, run_tests.sh and .ci/run. Override the location with SCNYM_VENV.
# torch is installed first, pinned to a CPU build, when it is missing: an unpinned torch
# requirement would otherwise pull several GB of CUDA packages.
set -euo pipefail
SCNYM_VENV=${SCNYM_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$SCNYM_VENV/bin/python" ]; then
    "$PYTHON" -m venv "$SCNYM_VENV"
fi
# shellcheck disable=SC1091
source "$SCNYM_VENV/bin/activate"
python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch (CPU build)" >&2
    python -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" \
        || python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
fi
echo "[setup] installing scnym and its dependencies" >&2
python -m pip install --quiet -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import scnym_cli, torch; print('[setup] scnym', scnym_cli.__version__, '| torch', torch.__version__)" >&2
