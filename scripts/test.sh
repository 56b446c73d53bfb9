#!/usr/bin/env bash
# Set up .venv with the dev extra, lint (ruff check) and run the whole test suite (including the real-model tests).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh "[dev]"
.venv/bin/ruff check rledit tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
