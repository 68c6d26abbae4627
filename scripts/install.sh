#!/usr/bin/env bash
# Install peftlab and its dependencies into the active Python environment (or .venv).
#   bash scripts/install.sh          # core + test dependencies
# On a machine without an NVIDIA GPU, torch is installed as the CPU build first
# (PEFTLAB_TORCH overrides the requirement, e.g. PEFTLAB_TORCH="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || "$PY" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "${PEFTLAB_TORCH:-torch}"
  else
    # torch==2.13.0 is the CPU build on this project's machines; elsewhere use PyTorch's CPU index.
    python -m pip install -q "${PEFTLAB_TORCH:-torch==2.13.0}" 2>/dev/null \
      || python -m pip install -q "${PEFTLAB_TORCH:-torch}" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
python -m pip install -q -e ".[dev]"
# galore-torch: reference implementation for a parity test of the full-SVD rSVD variant.
# --no-deps: its declared dependencies pull bitsandbytes, which the test does not need.
# A test dependency (the parity test fails without it), not an optional extra.
python -m pip install -q --no-deps galore-torch==1.0
python -c "import peftlab, torch; print(f'peftlab {peftlab.__version__} with torch {torch.__version__} installed')"
