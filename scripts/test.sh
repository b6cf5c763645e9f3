#!/usr/bin/env bash
# Set up (first time) and run the checks CI runs: lint, types, the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k http -x (-n 0: no test workers).
# The tests run in ALLERAC_TEST_WORKERS worker processes (pytest-xdist; default: one per
# core), a test file to a worker, so the nodes a module starts for its tests start once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
echo "== ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict" >&2
.venv/bin/mypy
echo "== pytest" >&2
exec .venv/bin/python -m pytest -m "not slow" -n "${ALLERAC_TEST_WORKERS:-auto}" --dist loadfile "$@"
