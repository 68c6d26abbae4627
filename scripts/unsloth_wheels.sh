#!/usr/bin/env bash
# Rebuild .whl-unsloth/: Unsloth and what it needs, for the H200 device machine (Python 3.12, x86-64,
# torch 2.11+cu130, transformers 5.17, peft 0.21, accelerate 1.15; no internet there).
#   bash scripts/unsloth_wheels.sh [DEST_DIR=.whl-unsloth]      (run here, where the registry can be reached)
# Install there (the child process of benchmarks/bench_lead.py puts this folder first on its path):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-unsloth .whl-unsloth/*.whl .whl-bnbslim/*.whl
#
# The set is Unsloth's and unsloth_zoo's Requires-Dist (extras and Windows/macOS-only lines skipped), followed
# recursively, minus what the device image already has (KINDS.md package list). Also needed, not carried here:
# bitsandbytes (.whl-bnbslim/, scripts/slim_bnb_wheel.sh) and dill + multiprocess for datasets 4.x (from .whl/,
# installed into /tmp/site, which stays on the child's path after /tmp/site-unsloth).
# Left out on purpose (optional at import, checked in unsloth/unsloth_zoo sources, import tested without them):
#   xformers (try/except, falls back to PyTorch SDPA; PyPI builds are tied to one torch/CUDA), torchao (find_spec
#   guard; only QAT/fp8 paths), diffusers (never imported at import), hf_transfer (find_spec guard; offline device),
#   pydantic (+pydantic-core: only a guarded warnings filter outside Unsloth Studio), torchvision (on the device).
set -euo pipefail
DEST=${1:-.whl-unsloth}
mkdir -p "$DEST"
WHEELS=(
  unsloth==2026.10.9 unsloth_zoo==2026.10.9
  trl==1.15.0                    # unsloth wants trl<=1.15.0, !=0.19.0; imported at `import unsloth`
  datasets==4.8.5                # unsloth wants datasets<5 (main .whl/ has 5.2); trl 1.15 wants >=4.7
  tyro==1.0.17 typeguard==4.6.1 docstring-parser==0.18.0   # tyro and its needs
  msgspec==0.23.0 cut_cross_entropy==25.1.1                 # unsloth_zoo needs
  json5==0.17.3 nest-asyncio==1.6.0 structlog==26.1.0       # unsloth needs (small, pure Python)
  certifi==2026.10.19.post1      # both want certifi>=2026.10.19; the device's version is not known
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"; du -ch "$DEST"/*.whl | tail -1
