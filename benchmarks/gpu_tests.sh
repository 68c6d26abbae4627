#!/usr/bin/env bash
# Every GPU-only test (the tests that skip without CUDA) in one device command, each file under its own time limit so
# that one hanging file does not cost the others; the pass/fail lines and the failures' short tracebacks go to
# OUTDIR/gpu_tests.log.
#   bash benchmarks/gpu_tests.sh OUTDIR [PATTERN]   (carry .whl and .whl-bnbslim: datasets, constriction, liger, bitsandbytes;
#                                                   PATTERN: an extended regex, only the test files it matches)
# The bitsandbytes wheel of the registry holds a library for every CUDA and ROCm version (42 MB);
# `bash scripts/slim_bnb_wheel.sh` writes .whl-bnbslim/ with the CUDA 13.0 and CPU libraries only (3.6 MB).
set -u
OUT=${1:?usage: gpu_tests.sh OUTDIR [PATTERN]}
PATTERN=${2:-.}
mkdir -p "$OUT"
LOG="$OUT/gpu_tests.log"
for d in .whl .whl-bnbslim; do
  ls $d/*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $d/*.whl 2>&1 | tail -2
done
export PYTHONPATH=/tmp/site:$(pwd) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$LOG"
# file [pytest -k expression] [seconds]
while read -r f k s; do
  [ -z "$f" ] && continue
  echo "$f" | grep -qE "$PATTERN" || continue
  args=(); [ "$k" != "-" ] && args=(-k "$k")
  echo "== $f ${args[*]}" | tee -a "$LOG"
  timeout --kill-after=10 "$s" python3 -m pytest -q -o addopts="" -p no:cacheprovider -rfE --tb=short "${args[@]}" "$f" > /tmp/gpu_test.out 2>&1
  rc=$?
  [ $rc = 124 ] && echo "TIMEOUT after ${s}s" >> /tmp/gpu_test.out
  grep -v -E "^\s*$|^\s+(/opt|return |\^)" /tmp/gpu_test.out | tail -150 | tee -a "$LOG" | tail -3
done <<'LIST'
tests/test_fused_lora.py cuda 90
tests/test_fused_ce.py cuda 60
tests/test_base_dtype.py cuda 60

tests/test_sora_fast.py cuda 60

tests/test_lora_init.py cuda 60
tests/test_quant.py cuda 150
tests/test_sharding.py cuda 120
tests/test_bounds_gpu.py - 120
LIST
