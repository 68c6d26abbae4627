#!/usr/bin/env bash
# GPU regression check after a refactor: the GPU-only tests, the training smoke (gpu_smoke.sh),
# rSVD-Adam's batched CUDA path against its per-matrix loop, and a small study swept on GPU 0
# with its follow-up steps (bounds, analysis) on the same device.
#   bash benchmarks/gpu_regression.sh OUTDIR      (wheels of missing packages in .whl/ are installed first)
set -u
OUT=${1:-/tmp/gpu_regression}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$(pwd):${PYTHONPATH:-} PYTHONUNBUFFERED=1
python -m pytest -q -x -p no:cacheprovider tests/test_sora_fast.py tests/test_rsvd_batched.py tests/test_gpu_levers.py 2>&1 | tail -5 | tee "$OUT/pytest_gpu.txt"
python - <<'PY' 2>&1 | tee "$OUT/rsvd_cuda.txt"
import sys, torch
sys.path.insert(0, "tests")
from peftlab.optim import ProjectedAdamW
from test_rsvd_batched import SHAPES, _decaying
def run(batched, svd):
    gen = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(*s, generator=gen).cuda()) for s in SHAPES]
    opt = ProjectedAdamW([{"params": mats, "rank": 4, "svd": svd}], lr=1e-2, weight_decay=0.1, update_interval=3,
                         oversampling=3, seed=5, batched=batched)
    for step in range(8):
        g = torch.Generator().manual_seed(100 + step)
        for i, p in enumerate(mats):
            p.grad = _decaying(*p.shape, 1 + (i + step) % 4, g).cuda()
        opt.step()
    return mats
for svd in ("randomized", "full"):
    a, b = run("off", svd), run("on", svd)
    print(f"cuda rSVD-Adam {svd}: batched vs loop max |diff| after 8 steps (3 refreshes) = "
          f"{max((x - y).abs().max().item() for x, y in zip(a, b)):.2e}")
PY
bash benchmarks/gpu_smoke.sh "$OUT" > /dev/null 2>&1; cat "$OUT/gpu_smoke.txt"
t0=$(date +%s)
python -m peftlab sweep configs/studies/compare.yaml --preset-scale=smoke --gpus 0 > "$OUT/sweep_gpu.txt" 2>&1
echo "sweep rc=$? wall=$(( $(date +%s) - t0 ))s" | tee -a "$OUT/sweep_gpu.txt"
tail -25 "$OUT/sweep_gpu.txt"
grep -rh '"device"' runs/studies/compare-smoke/*/bounds_metrics.json 2>/dev/null | sort | uniq -c
