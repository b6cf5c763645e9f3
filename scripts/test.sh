#!/usr/bin/env bash
# Set up (first time) and run the checks CI runs: lint, types, the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k http -x (-n 0: no test workers).
# The tests run in ALLERAC_TEST_WORKERS worker processes (pytest-xdist; default: twice the
# cores, as many tests wait on a real timer part of the time: on 2 cores, 4 workers took
# 122-128 s where 3 took 133-142), a test file to a worker, so the nodes a module starts
# for its tests start once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# Every test starts node and CLI processes: compile the project's modules once, so that
# none of them compiles them again (where PYTHONDONTWRITEBYTECODE is set, nothing would
# keep the bytecode, and each process would pay ~0.3 s CPU for it). Likewise pytest's
# rewriting of the test modules' asserts (~3 s of CPU in every test worker): one
# collection keeps it, beside the lint, and the workers read it.
.venv/bin/python -m compileall -q -j 0 mesh node cloud_relay tests bench > /dev/null
env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -m pytest --collect-only -q -m "not slow" \
    -p no:xdist -p no:cacheprovider > /dev/null &
collecting=$!
echo "== ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict" >&2
.venv/bin/mypy
wait "$collecting" || true  # a collection error shows in the run below
echo "== pytest" >&2
workers="${ALLERAC_TEST_WORKERS:-$((2 * $(nproc)))}"
exec .venv/bin/python -m pytest -m "not slow" -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
