#!/usr/bin/env bash
# The bitsandbytes wheel cut down to what the lent GPU (CUDA 13.0) and the CPU backend load: the registry's wheel holds a
# library for every CUDA and ROCm version (42 MB), too much to carry beside the other wheels (the device's 64 MiB limit).
#   bash scripts/slim_bnb_wheel.sh [SRC_DIR=.whl-bnb] [DEST_DIR=.whl-bnbslim] [CUDA=130]
set -eu
SRC=${1:-.whl-bnb}; DEST=${2:-.whl-bnbslim}; CUDA=${3:-130}
whl=$(ls "$SRC"/bitsandbytes-*.whl | head -1)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && unzip -q "$OLDPWD/$whl")
find "$tmp/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_cuda$CUDA.so" ! -name 'libbitsandbytes_cpu.so' -delete
rec=$(ls -d "$tmp"/*.dist-info)/RECORD
grep -v -E "libbitsandbytes_(cuda|rocm|xpu)" "$rec" > "$rec.new" || true
grep -E "libbitsandbytes_cuda$CUDA.so" "$rec" >> "$rec.new" || true
mv "$rec.new" "$rec"
mkdir -p "$DEST"; rm -f "$DEST"/bitsandbytes-*.whl
(cd "$tmp" && zip -q -r "$OLDPWD/$DEST/$(basename "$whl")" .)
ls -la "$DEST"
