#!/usr/bin/env bash
# One study's `gpu` scale on the lent GPU, in slices that fit one device command (10 minutes): the sweep runs under
# a wall limit, is interrupted cleanly (SIGINT: the running run dies and resumes or restarts next time; finished runs
# and follow-ups are skipped), and what the study has so far is copied to $OUT. Call it again on the same (warm)
# machine to go on: runs/ is kept between calls there, and the sweep resumes.
#
#   bash benchmarks/gpu_studies.sh STUDY [WALL_S]            sweep (default wall 540 s, everything included)
#   bash benchmarks/gpu_studies.sh STUDY estimate [PATTERN]  `peftlab estimate ... --preset-scale=gpu --gpus 0`
#                                                            (--only PATTERN: probe a few runs; each distinct
#                                                            configuration costs a setup, 4 steps and its follow-ups;
#                                                            run it before the sweep: finished runs count zero. It
#                                                            writes $OUT/STUDY/estimate.{txt,json}; give the JSON to
#                                                            scripts/results_page.py --estimate to compare)
#
# RESUME (environment): see below; goes on with a study an earlier session (another machine) began.
# GPUS (environment, default 0): the sweep's --gpus, e.g. GPUS=0,0,0 runs three runs side by side on GPU 0 (a slot per
# listed id; small models leave most of one GPU idle, and each run's process start and data setup overlap the others).
# The estimate gets the same --gpus: with a repeated id it also times the first probe beside copies of itself (the
# slowdown of sharing, applied to every run; about a minute more).
#
# STUDY: subspace_allocation | budget_aware | sparse_adapters | gradient_projection | compare.
# Needs the study's files under ./gpu_assets/, made on a machine with the offline assets by
# `bash scripts/gpu_bundle.sh STUDY` (it prints the paths to carry). Wheels in .whl/ (datasets, constriction, ...) are
# installed into /tmp/site once per machine.
# Writes $OUT/STUDY.tgz (the folder STUDY/: sweep.txt (console), study.log, study.jsonl, analysis/ (tables, plots,
# hypotheses, report), runs/<run>/ (its small files: config, logs, results, bounds; no weights); one archive, since the device returns at most
# 8 files) and one JSON line per call in $OUT/gpu_studies.jsonl.
set -u
STUDY=${1:?usage: bash benchmarks/gpu_studies.sh STUDY [WALL_S | estimate [PATTERN]]}
MODE=${2:-540}
GPUS=${GPUS:-0}
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu_studies}
DEST="$OUT/$STUDY"
mkdir -p "$DEST"
YAML=configs/studies/$STUDY.yaml
[ -f "$YAML" ] || { echo "no study $YAML" >&2; exit 2; }

if ls .whl/*.whl > /dev/null 2>&1 && [ ! -f /tmp/site/.peftlab-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && touch /tmp/site/.peftlab-wheels
fi
export PYTHONPATH=/tmp/site:$(pwd):${PYTHONPATH:-} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# every ./gpu_assets/ path the gpu scale names must be here (carried), else say which and how to make it
missing=$(python3 - "$YAML" <<'EOF'
import re, sys
from pathlib import Path
import yaml
gpu = yaml.safe_load(Path(sys.argv[1]).read_text())["scales"]["gpu"]
paths = set(re.findall(r"\./gpu_assets/[\w./-]+?(?=[\s,'\"}]|$)", yaml.safe_dump(gpu), flags=re.M))
print(" ".join(sorted(p for p in paths if not Path(p).exists())))
EOF
)
if [ -n "$missing" ]; then
  echo "missing $missing: run \`bash scripts/gpu_bundle.sh $STUDY\` where the offline assets are installed and carry gpu_assets/" | tee "$DEST/error.txt" >&2
  echo "{\"study\": \"$STUDY\", \"rc\": 3, \"error\": \"missing $missing\"}" >> "$OUT/gpu_studies.jsonl"
  exit 3
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader > "$DEST/gpu.txt" 2>&1

if [ "$MODE" = estimate ]; then
  only=()
  [ -n "${3:-}" ] && only=(--only "$3")
  python3 -m peftlab estimate "$YAML" --preset-scale=gpu --gpus "$GPUS" "${only[@]}" --json "$DEST/estimate.json" 2>&1 | tee "$DEST/estimate.txt" | tail -40
  rc=${PIPESTATUS[0]}
  # $OUT is new for every device command: keep a copy for the sweep's later archives ($OUT/STUDY.tgz of each call)
  mkdir -p /tmp/gpu_studies_state
  for f in estimate.json estimate.txt; do [ -f "$DEST/$f" ] && cp -f "$DEST/$f" "/tmp/gpu_studies_state/$STUDY.$f"; done
  echo "{\"study\": \"$STUDY\", \"mode\": \"estimate\", \"gpus\": \"$GPUS\", \"only\": \"${3:-}\", \"rc\": $rc, \"wall_s\": $(( $(date +%s) - T0 ))}" >> "$OUT/gpu_studies.jsonl"
  exit "$rc"
fi

SD=$(python3 -c "
import sys; sys.argv = ['x']
import peftlab.methods  # noqa: F401
from peftlab.studies.spec import load_study
print(load_study('$YAML', 'gpu', follow_ups=False).output_dir)")
# RESUME=DIR (a carried folder STUDY/ unpacked from an earlier session's $OUT/STUDY.tgz): its finished runs (config and
# results_final.json, so the sweep counts them done; no weights, so only for studies without per-run follow-ups still
# to run) and its study.jsonl/log go into the study directory first, and the sweep goes on from there
if [ -n "${RESUME:-}" ]; then
  [ -f "$RESUME/study.jsonl" ] || { echo "RESUME=$RESUME: no study.jsonl there (unpack an earlier $STUDY.tgz and carry its $STUDY/ folder)" >&2; exit 2; }
  mkdir -p "$SD"
  for run in "$RESUME"/runs/*/; do
    n=$(basename "$run"); [ -e "$SD/$n" ] || cp -r "$run" "$SD/$n"
  done
  for f in study.jsonl study.log; do
    [ -f "$RESUME/$f" ] && [ ! -e "$SD/$f" ] && cp "$RESUME/$f" "$SD/$f"
  done
  [ -f "$RESUME/estimate.json" ] && [ ! -e "$DEST/estimate.json" ] && cp "$RESUME/estimate.json" "$DEST/"
  echo "resumed from $RESUME: $(ls "$RESUME"/runs | wc -l) finished run(s)"
fi
left=$(( MODE - ($(date +%s) - T0) - 30 ))   # 30 s for the copy below
echo "study dir $SD; sweep wall limit ${left}s; --gpus $GPUS"
timeout --signal=INT --kill-after=20 "$left" python3 -m peftlab sweep "$YAML" --preset-scale=gpu --gpus "$GPUS" >> "$DEST/sweep.txt" 2>&1
rc=$?
wall=$(( $(date +%s) - T0 ))
if [ "$rc" = 124 ]; then
  if tail -1 "$DEST/sweep.txt" | grep -q "^==== TOTAL: .* 0 failed"; then  # cut while exiting, after its last line
    rc=0; echo "the sweep finished (its TOTAL line above); the wall limit only cut its exit" | tee -a "$DEST/sweep.txt"
  else
    echo "wall limit reached after ${wall}s: call again to go on (finished runs are skipped)" | tee -a "$DEST/sweep.txt"
  fi
fi

cp -f "$SD/study.log" "$SD/study.jsonl" "$DEST/" 2>/dev/null
for f in estimate.json estimate.txt; do  # this machine's estimate, from an earlier call
  [ -f "/tmp/gpu_studies_state/$STUDY.$f" ] && [ ! -e "$DEST/$f" ] && cp "/tmp/gpu_studies_state/$STUDY.$f" "$DEST/$f"
done
if [ -d "$SD/analysis" ]; then rm -rf "$DEST/analysis"; cp -r "$SD/analysis" "$DEST/analysis"; fi
for run in "$SD"/*/; do
  [ -f "$run/results_final.json" ] || continue
  n=$(basename "$run"); mkdir -p "$DEST/runs/$n"
  # every small file of the run (config, logs, method records), no weights: `peftlab analyze` can run again here
  find "$run" -maxdepth 1 -type f -size -2048k ! -name '*.safetensors' ! -name '*.pt' ! -name '*.bin' -exec cp -f {} "$DEST/runs/$n/" \;
done
python3 - "$SD" "$STUDY" "$rc" "$wall" >> "$OUT/gpu_studies.jsonl" <<'EOF'
import json, os, sys
from pathlib import Path
sd, study, rc, wall = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
done = sorted(p.parent.name for p in sd.glob("*/results_final.json"))
devices = {}
for p in sd.glob("*/bounds_metrics.json"):
    d = json.loads(p.read_text()).get("device", "?")
    devices[d] = devices.get(d, 0) + 1
phases = {}
for line in (sd / "study.jsonl").read_text().splitlines() if (sd / "study.jsonl").is_file() else []:
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("event") == "end" and e.get("outcome") == "completed":
        for k, v in (e.get("phases") or {}).items():
            phases[k] = round(phases.get(k, 0.0) + v, 1)
    if e.get("event") == "study_step":
        k = e["step"].split()[0]
        phases[k] = round(phases.get(k, 0.0) + e.get("duration_s", 0.0), 1)
print(json.dumps({"study": study, "gpus": os.environ.get("GPUS", "0"), "rc": rc, "wall_s": wall, "runs_done": len(done), "bounds_devices": devices,
                  "phases_s": phases, "analysis": (sd / "analysis" / "report.html").is_file()}))
EOF
tail -1 "$OUT/gpu_studies.jsonl"
tail -15 "$DEST/sweep.txt"
# the device returns at most 8 files, none deeper than $OUT/a/b/file: the study's outputs travel as one archive
# (unpack here with `tar xzf STUDY.tgz`; docs/results/<study>/ takes its tables and PNGs)
tar czf "$OUT/$STUDY.tgz" -C "$OUT" "$STUDY" && rm -rf "$DEST"
exit 0
