#!/usr/bin/env bash
# Prepares a run on a GPU machine that has no Go: builds the CUDA test
# binaries and kvalign (stripped, xz-compressed to fit what travels) and
# copies the shared fixtures the GPU tests read, all into .gpurun/
# (git-ignored). Then carry .gpurun to the GPU machine and run
# scripts/gpu-run.sh there.
#   usage: scripts/gpu-prepare.sh [gpu] [transformer] [align] [eval] [kvalign]
# (default: all five; name fewer when what travels would exceed the limit)
# GPURUN=.gpurun-x names another folder (matching /.gpurun*/ in .gitignore),
# so that work in several checkouts can be carried side by side;
# gpu-run.sh takes the same variable.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${KVALIGN_SHARED:-../shared}
R=${GPURUN:-.gpurun}
make -s lib
rm -rf "$R" && mkdir -p "$R/bin" "$R/shared/data" "$R/shared/seed" "$R/shared/reference"
what=${*:-gpu transformer align eval kvalign}
for p in $what; do
  if [ "$p" = kvalign ]; then
    # Without the embedded model: what travels is limited, and the GPU
    # machine gets that model's files from transformer/builtin/model anyway.
    go build -tags cuda,nobuiltin -ldflags="-s -w" -o "$R"/bin/kvalign .
  else # a package whose tests use the CUDA backend
    go test -c -tags cuda -ldflags="-s -w" -o "$R/bin/$p.test" "./$p"
  fi
done
# BASELINE=path/to/kvalign (an older build) travels as kvalign-base, and
# gpu-run.sh bench times it in the same run, for before/after numbers.
if [ -n "${BASELINE:-}" ]; then cp "$BASELINE" "$R/bin/kvalign-base"; fi
# EXTRA="path …": more binaries (experiment builds) travel under their names.
for f in ${EXTRA:-}; do cp "$f" "$R/bin/"; done
# One archive with a dictionary larger than a binary: the four binaries
# share the same kernel images (≈ 45 MB each), which xz then stores once
# (≈ 14 MB in all instead of ≈ 55 MB as separate files).
tar -C "$R/bin" -cf - . | xz -T1 --lzma2=preset=6,dict=256MiB > "$R/bin.tar.xz"
rm -rf "$R/bin"
mkdir -p "$R"/shared/models
cp -r "$shared/models/gutenberg-llama-7m" "$R"/shared/models/  # gpt2: from transformer/builtin/model
cp "$shared/data/wikitext-test.txt" "$R"/shared/data/
cp -r "$shared/seed/networks" "$R"/shared/seed/
cp -r "$shared/reference/configs" "$shared/reference/tokenizers" "$R"/shared/reference/
cp "$shared/data/gutenberg-valid.txt" "$R"/shared/data/
# The GPT-2 fixture comes from transformer/builtin/model on the GPU machine;
# its vocab.json + merges.txt (for the tokenizer's second loading path) travel.
mkdir -p "$R"/shared/models/gutenberg-gpt2-7m.extra
cp "$shared/models/gutenberg-gpt2-7m/vocab.json" "$shared/models/gutenberg-gpt2-7m/merges.txt" "$R"/shared/models/gutenberg-gpt2-7m.extra/
du -sh "$R"
