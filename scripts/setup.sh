#!/usr/bin/env bash
# Creates .venv with a CPU build of PyTorch and datatrace (editable, with everything the tests
# exercise: transformers, diffusers, Ray, fsspec, and the test tools).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The CPU build: a plain `torch` requirement in a fresh environment pulls several GB of CUDA
# packages. pyproject.toml declares an open range; the pin lives here, in the set-up path.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${EXTRAS}]"
