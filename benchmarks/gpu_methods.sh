#!/usr/bin/env bash
# GPU checks of the methods (issues 4-6): rSVD-Adam benchmark on CUDA, `peftlab profile` of
# DistilBERT-base on CUDA (measured peak memory), and short SoRA/BA-LoRA/rSVD runs in bf16.
#   bash benchmarks/gpu_methods.sh OUTDIR
set -u
OUT=${1:-/tmp/gpu_methods}
mkdir -p "$OUT"
export PYTHONPATH=$(pwd):${PYTHONPATH:-}
python benchmarks/bench_rsvd.py --device cuda --layers 6 --ranks 4,8,16,64,128 --full-svd --repeats 3 --steps 20 > "$OUT/bench_rsvd_cuda.txt" 2>&1
echo "bench rc=$?"; tail -15 "$OUT/bench_rsvd_cuda.txt"
python -m peftlab profile configs/seeds/004_rsvd_distilbert_sst2.yaml --model.from_scratch=true --system.device=cuda \
   --batch-size 8 --seq-len 128 --output-dir /tmp/gpu_profile > "$OUT/profile_cuda.txt" 2>&1
echo "profile rc=$?"; tail -25 "$OUT/profile_cuda.txt"
cp /tmp/gpu_profile/memory_breakdown_r16.csv "$OUT/" 2>/dev/null
for m in sora ba_lora rsvd; do
  case $m in sora) cfg=configs/examples/lm_sora.yaml;; ba_lora) cfg=configs/examples/cls_ba_lora.yaml;; rsvd) cfg=configs/examples/cls_rsvd.yaml;; esac
  python -m peftlab train $cfg --output.dir=/tmp/gpu_m/$m --output.overwrite=true --logging.progress_bar=false \
     --system.device=cuda --system.dtype=bf16 > /tmp/gpu_m_$m.log 2>&1
  echo "$m bf16 rc=$? $(tail -1 /tmp/gpu_m_$m.log)" | tee -a "$OUT/methods_bf16.txt"
done
