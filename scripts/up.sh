#!/usr/bin/env bash
# Set up (first time) and start a node on the embedded default model.
# Extra arguments go to `allerac up`, e.g. scripts/up.sh --http-port 9000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/allerac up "$@"
