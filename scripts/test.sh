#!/usr/bin/env bash
# Creates .venv (Python >= 3.10), installs spark-gmm with its test extra, runs the whole suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k persistence
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv test
exec "$VENV/bin/python" -m pytest "$@"
