#!/usr/bin/env bash
# Issue 23's next runs on one GPU, each stage one device command of under 10 minutes (carry .whl, .whl-bnbslim and
# .whl-unsloth; scripts/gpu_wheels.sh and scripts/unsloth_wheels.sh build them):
#   bash benchmarks/gpu_lead.sh OUTDIR a   the fused loss's GPU tests, then bench_lead part 8 (8B against Unsloth in
#                                          the order A B A, the compiled chunk body against the eager one, reentrant
#                                          checkpointing, 21 of 32 blocks checkpointed; 3B DoRA/SoRA/SDoRA next to LoRA)
#   bash benchmarks/gpu_lead.sh OUTDIR b   part 9: every adapter at GPT-2, eager and compiled
#   bash benchmarks/gpu_lead.sh OUTDIR c   both 8B rows of part 7 under torch.profiler (peftlab's fastest form and
#                                          Unsloth in one call: where each step goes)
# Output: OUTDIR/{gpu_tests.log,lead8,lead9,prof}/ with bench_lead.jsonl, bench_lead_summary.md and the profiles.
set -u
OUT=${1:?usage: gpu_lead.sh OUTDIR a|b|c}
STAGE=${2:?usage: gpu_lead.sh OUTDIR a|b|c}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl-bnbslim/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-unsloth .whl-unsloth/*.whl .whl-bnbslim/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$(pwd) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/nvidia_smi_$STAGE.txt"
lead() {  # NAME TIMEOUT ARGS...
  local name=$1 t=$2; shift 2
  timeout "$t" python3 benchmarks/bench_gpu.py --suite lead --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  cat "$OUT/$name/bench_lead_summary.md" 2> /dev/null; tail -2 "$OUT/$name.log"
}
case "$STAGE" in
  a)
    timeout 60 python3 -m pytest -q -o addopts="" -p no:cacheprovider -rfE --tb=short tests/test_fused_ce.py -k cuda 2>&1 | tail -20 | tee "$OUT/gpu_tests.log"
    lead lead8 480 --part 8 --steps 10 --budget-s 450 ;;
  b)
    lead lead9 370 --part 9 --budget-s 350 ;;
  c)
    lead prof 300 --part 7 --steps 10 --only llama8b:peftlab_chunked_gc75_cb,llama8b:unsloth \
      --lead-profile llama8b:peftlab_chunked_gc75_cb:lora,llama8b:unsloth:lora --budget-s 280 ;;
  *) echo "stage must be a, b or c" >&2; exit 2 ;;
esac
