#!/usr/bin/env bash
# Set up .venv and run the demo: SmolLM2-135M (offline), a handful of real zsRE edits, a before/after table.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/rledit demo "$@"
