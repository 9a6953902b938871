#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install scnym into it.
# Sourced by demo_script.sh, run_tests.sh and .ci/run. Override the location with SCNYM_VENV.
# torch is installed first, pinned to a CPU build, when it is missing: an unpinned torch
# requirement would otherwise pull several GB of CUDA packages.
# Idempotent and quiet: scnym is installed in editable mode, so code changes need no reinstall; pip runs
# again only when pyproject.toml or the Python changed (a stamp in the environment), and its output is
# shown only when it fails.
set -euo pipefail
SCNYM_VENV=${SCNYM_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$SCNYM_VENV/bin/python" ]; then
    "$PYTHON" -m venv "$SCNYM_VENV"
fi
# shellcheck disable=SC1091
source "$SCNYM_VENV/bin/activate"

_scnym_quietly() {  # run a command; show its output only if it fails
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

STAMP="$SCNYM_VENV/.scnym-installed"
WANTED="$(python -c 'import sys; print(sys.version)' | head -1) $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANTED" ] && python -c "import scnym_cli, torch" 2>/dev/null; then
    return 0 2>/dev/null || exit 0
fi
_scnym_quietly python -m pip install --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch (CPU build)" >&2
    _scnym_quietly python -m pip install "torch==2.13.0" \
        || _scnym_quietly python -m pip install torch --index-url https://download.pytorch.org/whl/cpu
fi
echo "[setup] installing scnym and its dependencies" >&2
_scnym_quietly python -m pip install -e ".[test]"
python -c "import scnym_cli, torch; print('[setup] scnym', scnym_cli.__version__, '| torch', torch.__version__)" >&2
echo "$WANTED" > "$STAMP"
