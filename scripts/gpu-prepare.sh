#!/usr/bin/env bash
# Prepares a run on a GPU machine that has no Go: builds the CUDA test
# binaries and kvalign (stripped, xz-compressed to fit what travels) and
# copies the shared fixtures the GPU tests read, all into .gpurun/
# (git-ignored). Then carry .gpurun to the GPU machine and run
# scripts/gpu-run.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${KVALIGN_SHARED:-../shared}
make -s lib
rm -rf .gpurun && mkdir -p .gpurun/bin .gpurun/shared/data .gpurun/shared/seed .gpurun/shared/reference
for p in gpu transformer align eval kvcache; do
  go test -c -tags cuda -ldflags="-s -w" -o ".gpurun/bin/$p.test" "./$p"
done
go build -tags cuda -ldflags="-s -w" -o .gpurun/bin/kvalign .
xz -T2 -6 .gpurun/bin/*
cp -r "$shared/models" .gpurun/shared/
cp "$shared/data/wikitext-test.txt" .gpurun/shared/data/
cp -r "$shared/seed/networks" .gpurun/shared/seed/
cp -r "$shared/reference/configs" .gpurun/shared/reference/
du -sh .gpurun
