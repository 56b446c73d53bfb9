#!/usr/bin/env bash
# Set up .venv with the dev extra and run the whole test suite (including the real-model tests).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh "[dev]"
exec .venv/bin/python -m pytest -q "$@"
