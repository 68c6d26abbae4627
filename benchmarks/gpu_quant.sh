#!/usr/bin/env bash
# Issue 27 on one GPU, in one device call (about 6 minutes on an H200; the benchmark is capped at 7 minutes, its table kept current case by case):
#   bash benchmarks/gpu_quant.sh OUTDIR
# 1. the GPU tests of quantized bases (tests/test_quant.py, the cuda cases: parity with hand-written
#    peft + bitsandbytes step for step, exact resume, load_run, export + PeftModel.from_pretrained,
#    every adapter method on a 4-bit base) -> OUTDIR/test_quant.log
# 2. benchmarks/bench_quant.py: Qwen2.5-3B and Llama-3-8B shapes, LoRA/DoRA r16, 4 x 1024, gradient
#    checkpointing, peftlab vs HF PEFT + bitsandbytes -> OUTDIR/quant/{bench_quant.jsonl,summary.md}
# Wheels: .whl-bnbslim/ (bitsandbytes cut to CUDA 13.0 + CPU by scripts/slim_bnb_wheel.sh; else .whl-bnb/) and .whl/
# (liger-kernel for the fused loss, ...) into /tmp/site.
set -u
OUT=${1:?usage: gpu_quant.sh OUTDIR}
mkdir -p "$OUT"
BNB=.whl-bnbslim; ls $BNB/*.whl > /dev/null 2>&1 || BNB=.whl-bnb
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $BNB/*.whl .whl/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$(pwd) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia_smi.txt"
if python3 -c "import pytest" 2> /dev/null; then
  timeout 150 python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_quant.py -k cuda 2>&1 | tail -40 | tee "$OUT/test_quant.log"
else
  echo "pytest is not installed here: the GPU tests did not run" | tee "$OUT/test_quant.log"
fi
timeout 420 python3 benchmarks/bench_quant.py --out "$OUT/quant" --workdir /tmp/bench_quant 2>&1 | grep -v "^\s" | tail -40 | tee "$OUT/bench_quant.log"
