#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Slow real-model tests run only with FORGETJAX_SLOW=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q "$@"
