#!/usr/bin/env bash
# Set up the environment (first run only) and run the tests.
#   bash run_tests.sh          the fast tier (a few minutes): every test not marked slow
#   bash run_tests.sh --all    everything, as CI runs it (.ci/run)
# Other arguments go to pytest (e.g. -k name, -x).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
if [ "${1:-}" = "--all" ]; then
    shift
    python -m pytest "$@"
else
    python -m pytest -m "not slow" "$@"
fi
