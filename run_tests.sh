#!/usr/bin/env bash
# Set up the environment (first run only) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
python -m pytest "$@"
