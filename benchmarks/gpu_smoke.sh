#!/usr/bin/env bash
# GPU smoke check of the training loop: quickstart configs on CUDA in fp32, bf16, fp16,
# with torch.compile, and (when two GPUs are visible) two processes through accelerate.
#   bash benchmarks/gpu_smoke.sh OUTDIR
set -u
OUT=${1:-/tmp/gpu_smoke}
mkdir -p "$OUT"
export PYTHONPATH=$(pwd):${PYTHONPATH:-}
python - <<'PY'
import torch, transformers, peft, accelerate
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
run() {  # name, config, overrides...
  local name=$1 cfg=$2; shift 2
  local t0=$(date +%s)
  python -m peftlab train "$cfg" --output.dir=/tmp/gpu_smoke_runs/$name --output.overwrite=true --logging.progress_bar=false \
     --system.device=cuda "$@" > /tmp/gpu_smoke_runs_$name.log 2>&1
  local rc=$? t1=$(date +%s)
  local res=$(python -c "import json,sys; r=json.load(open('/tmp/gpu_smoke_runs/$name/results_final.json')); print(r['final'], 'peak_mb=%.1f'%r['peak_memory_mb'], r['peak_memory_kind'])" 2>/dev/null)
  printf '%-22s rc=%s wall=%4ss %s\n' "$name" "$rc" "$((t1 - t0))" "$res" | tee -a "$OUT/gpu_smoke.txt"
  [ $rc -eq 0 ] || tail -20 /tmp/gpu_smoke_runs_$name.log | tee -a "$OUT/gpu_smoke.txt"
}
mkdir -p /tmp/gpu_smoke_runs
run lm_fp32 configs/quickstart/lm_lora.yaml
run lm_bf16 configs/quickstart/lm_lora.yaml --system.dtype=bf16
run lm_fp16 configs/quickstart/lm_lora.yaml --system.dtype=fp16
run lm_compile configs/quickstart/lm_lora.yaml --system.compile=true
run cls_bf16 configs/quickstart/cls_lora.yaml --system.dtype=bf16
run cls_dora_fp16 configs/quickstart/cls_lora.yaml --method=dora --system.dtype=fp16
run lm_full_accum configs/quickstart/lm_lora.yaml --method=full --training.gradient_accumulation_steps=4 --system.dtype=bf16
# resume on GPU: stop after 30 steps, then continue to the end
run lm_resume_a configs/quickstart/lm_lora.yaml --training.max_steps=104
python -m peftlab train configs/quickstart/lm_lora.yaml --output.dir=/tmp/gpu_smoke_runs/lm_resume_b --output.overwrite=true \
   --logging.progress_bar=false --system.device=cuda --training.max_steps=104 > /dev/null 2>&1 &
pid=$!; while [ ! -d /tmp/gpu_smoke_runs/lm_resume_b/checkpoints/step-50 ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
rm -f /tmp/gpu_smoke_runs/lm_resume_b/results_final.json
python -m peftlab train configs/quickstart/lm_lora.yaml --output.dir=/tmp/gpu_smoke_runs/lm_resume_b --logging.progress_bar=false \
   --system.device=cuda --training.max_steps=104 --training.resume_from=latest > /tmp/gpu_smoke_runs_resume.log 2>&1
python - <<'PY' | tee -a "$OUT/gpu_smoke.txt"
import json
a=json.load(open('/tmp/gpu_smoke_runs/lm_resume_a/results_final.json'))['final']
b=json.load(open('/tmp/gpu_smoke_runs/lm_resume_b/results_final.json'))['final']
print("gpu resume: uninterrupted", a, "| killed+resumed", b, "| max abs diff", max(abs(a[k]-b[k]) for k in a))
PY
n=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$n" -ge 2 ]; then
  t0=$(date +%s)
  accelerate launch --num_processes 2 --multi_gpu -m peftlab train configs/quickstart/lm_lora.yaml --output.dir=/tmp/gpu_smoke_runs/ddp \
     --output.overwrite=true --logging.progress_bar=false --training.batch_size=4 > /tmp/gpu_smoke_runs_ddp.log 2>&1
  echo "ddp2 rc=$? $(cat /tmp/gpu_smoke_runs/ddp/results_final.json | python -c 'import json,sys; r=json.load(sys.stdin); print(r["final"], r["world_size"])')" | tee -a "$OUT/gpu_smoke.txt"
fi
