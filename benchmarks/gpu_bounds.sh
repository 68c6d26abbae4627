#!/usr/bin/env bash
# The bound's scoring on one GPU: variants of the scoring loop (benchmarks/bench_scoring.py) on
# OpenWebText-shaped and python-docs-shaped documents, a torch.profiler table of each, and the
# whole of `peftlab bounds` after loading (benchmarks/bench_bounds.py) at the issue's sizes.
#   bash benchmarks/gpu_bounds.sh OUTDIR [STAGES]   (STAGES: a comma list of owt,pydocs,fp32,fp32small,pytest,e2e)
set -u
OUT=${1:-/tmp/gpu_bounds}
STAGES=${2:-owt,pydocs,fp32,e2e}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$(pwd):${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
J="$OUT/bench_scoring.jsonl"
B=benchmarks/bench_scoring.py
case ",$STAGES," in *,owt,*)
  python $B --docs owt --num-docs 3000 --dtype bf16 --variants "${OWT_VARIANTS:-right-auto-compile:65536,right-auto-compile-body:65536}" \
    --profile "${OWT_PROFILE:-right-auto-compile-body:65536}" --out "$OUT" >> "$J" 2> "$OUT/owt.err"
  python $B --docs owt --num-docs 10000 --dtype bf16 --variants "${OWT10K_VARIANTS:-right-auto-compile:65536,right-auto-compile-body:65536}" --out "$OUT" >> "$J" 2>> "$OUT/owt.err";;
esac
case ",$STAGES," in *,pydocs,*)
  python $B --docs pydocs --num-docs 447 --dtype bf16 --variants "${PYDOCS_VARIANTS:-right-auto-compile:65536,right-auto-compile-body:65536}" --profile right-auto-compile-body:65536 \
    --out "$OUT" >> "$J" 2> "$OUT/pydocs.err";;
esac
case ",$STAGES," in *,fp32,*)
  python $B --docs owt --num-docs 1000 --dtype fp32 --variants right-model:16384,right-auto:16384,right-auto:65536 --out "$OUT" \
    >> "$J" 2> "$OUT/fp32.err";;
esac
case ",$STAGES," in *,fp32small,*)
  python $B --docs owt --num-docs 300 --dtype fp32 --variants right-model:16384,right-auto:65536 --out "$OUT" >> "$J" 2> "$OUT/fp32.err";;
esac
case ",$STAGES," in *,pytest,*)
  python -m pytest -q -p no:cacheprovider -n 0 tests/test_bounds_gpu.py tests/test_bounds_fastpath.py 2>&1 | tail -4 | tee "$OUT/pytest_bounds_gpu.txt";;
esac
case ",$STAGES," in *,e2e,*)
  for cb in ${E2E_COMPILE_BODY:-off on}; do
    python benchmarks/bench_bounds.py --device cuda --num-docs 10000 --dtype bf16 --batch-tokens 65536 --compile-body $cb >> "$OUT/bench_bounds.jsonl" 2>> "$OUT/e2e.err"
    python benchmarks/bench_bounds.py --device cuda --num-docs 447 --docs pydocs --dtype bf16 --batch-tokens 65536 --compile-body $cb >> "$OUT/bench_bounds.jsonl" 2>> "$OUT/e2e.err"
  done;;
esac
for f in "$OUT"/*.err; do tail -n 3 "$f"; done
cat "$J" "$OUT/bench_bounds.jsonl" 2>/dev/null | python3 -c "
import json,sys
for l in sys.stdin:
    try: r=json.loads(l)
    except Exception: continue
    print({k: r.get(k) for k in ('docs','variant','compile_body','dtype','num_docs','scoring_s','warmup_s','wall_s','docs_per_s','window_tokens_per_s','peak_mb','max_rel_diff_vs_first','topk_equal_fraction_vs_first','error') if k in r})
"
