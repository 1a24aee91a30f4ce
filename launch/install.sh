#!/usr/bin/env bash
# Create ./.venv and install fsdp_ft into it (editable). `--dev` adds the test tools.
# Where no NVIDIA GPU is visible it installs the CPU build of torch (torch==2.13.0 here, a local wheel on our
# machines) instead of letting pip pull a multi-GB CUDA build; set FSDP_FT_TORCH to choose another torch spec.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" "${FSDP_FT_TORCH:-torch>=2.11}"
  else
    "${pip[@]}" "${FSDP_FT_TORCH:-torch==2.13.0}"
  fi
fi
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
"${pip[@]}" -e ".${extras}"
echo "fsdp_ft installed in $(pwd)/.venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
