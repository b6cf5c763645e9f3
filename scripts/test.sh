#!/usr/bin/env bash
# Set up (first time) and run the checks CI runs: lint, types, the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k http -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
echo "== ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict" >&2
.venv/bin/mypy
echo "== pytest" >&2
exec .venv/bin/python -m pytest -m "not slow" "$@"
