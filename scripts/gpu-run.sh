#!/usr/bin/env bash
# Runs on a GPU machine (no Go needed) after scripts/gpu-prepare.sh, with
# .gpurun carried along: the reference goldens that need torch on the GPU,
# every CUDA test, compute-sanitizer, the benchmarks; logs and new goldens
# under $OUT, a summary last.
#   usage: scripts/gpu-run.sh [tests|memcheck|bench|decode|micro|all]   (default all)
# (decode: the persistent decode kernel's test and benchmarks only, for
# quick iterations on it; micro: scripts/hopper-micro.cu, built here with
# this machine's nvcc: per-SM bandwidth and barrier latencies; and
# scripts/l2-prefetch-micro.cu: the LM head after an L2 prefetch;
# scripts/handoff-micro.cu: the floor of a dependent kernel hand-off;
# scripts/cluster-exchange-micro.cu: an exchange inside a block cluster;
# scripts/head-l2-micro.cu: the LM head with part of it kept in L2;
# scripts/acc-placement-micro.cu: the accumulators' placement in a chain
# of atomic kernels, which does not reproduce the step's)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
R=${GPURUN:-.gpurun}
what=${1:-all}
OUT=${OUT:-/tmp/gpurun-out}
mkdir -p "$OUT"
export KVALIGN_SHARED=$root/$R/shared
S=$OUT/summary.txt
: > "$S"
note() { echo "$*" | tee -a "$S"; }

# Unpack the binaries (scripts/gpu-prepare.sh's bin.tar.xz; Python, as the
# GPU machine may have no xz).
# (micro needs none: it builds its own program.)
[ "$what" = micro ] || python3 - <<'PY'
import os, tarfile
r = os.environ.get("GPURUN", ".gpurun")
with tarfile.open(r + "/bin.tar.xz", "r:xz") as t:
    t.extractall(r + "/bin")
for f in os.listdir(r + "/bin"):
    os.chmod(os.path.join(r, "bin", f), 0o755)
PY
B=$root/$R/bin
# The GPT-2 fixture is the built-in model: its files travel with the tree.
if [ "$what" != micro ] && [ ! -d "$KVALIGN_SHARED/models/gutenberg-gpt2-7m" ]; then
  cp -r transformer/builtin/model "$KVALIGN_SHARED/models/gutenberg-gpt2-7m"
  cp "$KVALIGN_SHARED"/models/gutenberg-gpt2-7m.extra/* "$KVALIGN_SHARED/models/gutenberg-gpt2-7m/"
fi
note "== card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"

if [ "$what" = all ] || [ "$what" = tests ]; then
  # Goldens made on this card: full-size random models (not committed) and
  # the original networks' outputs (committed from $OUT/align).
  export KVALIGN_FULLSIZE=/tmp/fullsize
  python3 scripts/reference/hf_golden.py --shared "$KVALIGN_SHARED" --out /tmp/hf-testdata --parts fullsize \
    --device cuda --fullsize-dir "$KVALIGN_FULLSIZE" > "$OUT/golden.log" 2>&1
  note "hf_golden fullsize rc=$?"
  if [ ! -e testdata/align/values_network_smollm2.golden.json ]; then
    python3 scripts/reference/align_golden.py --shared "$KVALIGN_SHARED" --out testdata/align >> "$OUT/golden.log" 2>&1
    note "align_golden rc=$?"
    tar -C testdata -cf "$OUT/align-goldens.tar" align
  fi
  for p in gpu transformer align eval; do
    [ -x "$B/$p.test" ] || continue
    (cd "$p" && timeout 400 "$B/$p.test" -test.v -test.timeout 390s > "$OUT/test-$p.log" 2>&1)
    rc=$?
    note "test $p rc=$rc: $(grep -c '^--- PASS\|^    --- PASS' "$OUT/test-$p.log") pass, $(grep -c -- '--- FAIL' "$OUT/test-$p.log") fail, $(grep -c -- '--- SKIP' "$OUT/test-$p.log") skip"
    grep -E -- "--- FAIL|panic:|^\s+\S+_test.go:[0-9]+: .*(Δ|agree|identical|RSS|greedy|worst|nll)" "$OUT/test-$p.log" | head -40 >> "$S"
  done
fi

if [ "$what" = all ] || [ "$what" = memcheck ]; then
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  # The out-of-memory test provokes a failed cudaMalloc on purpose, which
  # memcheck would count as an error: it is skipped here.
  for p in gpu transformer align eval; do
    [ -x "$B/$p.test" ] || continue
    (cd "$p" && timeout 240 "$SAN" --tool memcheck --error-exitcode 9 "$B/$p.test" -test.short -test.run 'CUDA|Tiny|MatchHF|Golden|Policies|AcrossBackends|Next' -test.skip 'OutOfMemory' \
      > "$OUT/memcheck-$p.log" 2>&1)
    note "memcheck $p rc=$?: $(grep 'ERROR SUMMARY' "$OUT/memcheck-$p.log" | tail -1)"
  done
fi

if { [ "$what" = all ] || [ "$what" = bench ]; } && [ -x "$B/kvalign" ]; then
  # This build, then the baseline (gpu-prepare.sh BASELINE=…) when it came
  # along, alternating in one run so that their numbers compare.
  for bin in kvalign kvalign-base; do
    [ -x "$B/$bin" ] || continue
    note "== $bin"
    for cfg in distilgpt2 smollm2-135m; do
      for dt in fp16 fp32; do
        "$B/$bin" bench decode --device cuda --config $cfg --dtype $dt 2>&1 | tee -a "$OUT/bench.log" | grep -v '^device' >> "$S"
      done
      # One-token steps as the persistent decode kernel, same binary.
      "$B/$bin" bench decode --device cuda --config $cfg --dtype fp16 --decode-kernel persistent 2>&1 | tee -a "$OUT/bench.log" | grep -v '^device' >> "$S"
    done
    for k in chain persistent; do
      "$B/$bin" bench run --device cuda --dtype fp16 --decode-kernel $k --json "$OUT/bench-run-$bin-$k.json" 2>&1 | grep -v '^device' | tee -a "$OUT/bench.log" >> "$S"
    done
  done
  (cd gpu && "$B/gpu.test" -test.run '^$' -test.bench "${BENCH:-CUDA}" -test.benchtime 200x > "$OUT/bench-kernels.log" 2>&1)
  grep -E "^Benchmark" "$OUT/bench-kernels.log" >> "$S"
fi
if [ "$what" = micro ]; then
  NVCC=$(command -v nvcc || ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
  "$NVCC" -O3 -gencode arch=compute_90,code=sm_90 -o /tmp/hopper-micro scripts/hopper-micro.cu &&
    /tmp/hopper-micro | tee "$OUT/micro.log" >> "$S"
  "$NVCC" -O3 -gencode arch=compute_90,code=sm_90 -o /tmp/l2-prefetch-micro scripts/l2-prefetch-micro.cu &&
    /tmp/l2-prefetch-micro | tee -a "$OUT/micro.log" >> "$S"
  "$NVCC" -O3 -gencode arch=compute_90,code=sm_90 -o /tmp/handoff-micro scripts/handoff-micro.cu &&
    /tmp/handoff-micro | tee -a "$OUT/micro.log" >> "$S"
  "$NVCC" -O3 -gencode arch=compute_90,code=sm_90 -o /tmp/cluster-exchange-micro scripts/cluster-exchange-micro.cu &&
    /tmp/cluster-exchange-micro | tee -a "$OUT/micro.log" >> "$S"
  "$NVCC" -O3 -gencode arch=compute_90,code=sm_90 -o /tmp/head-l2-micro scripts/head-l2-micro.cu &&
    /tmp/head-l2-micro | tee -a "$OUT/micro.log" >> "$S"
  "$NVCC" -O3 -gencode arch=compute_90,code=sm_90 -o /tmp/acc-placement-micro scripts/acc-placement-micro.cu &&
    /tmp/acc-placement-micro | tee -a "$OUT/micro.log" >> "$S"
fi
if [ "$what" = decode ]; then
  (cd gpu && timeout 300 "$B/gpu.test" -test.v -test.run 'CUDADecodePlan' -test.bench 'CUDADecodePlan|CUDAFusedDecodeChain/.*/^store\+attention$' -test.benchtime 100x > "$OUT/decode.log" 2>&1)
  note "decode tests rc=$?: $(grep -c -- '--- PASS' "$OUT/decode.log") pass, $(grep -c -- '--- FAIL' "$OUT/decode.log") fail"
  if [ -x "$B/transformer.test" ]; then
    (cd transformer && timeout 300 "$B/transformer.test" -test.v -test.run 'PersistentDecode' >> "$OUT/decode.log" 2>&1)
    note "transformer decode tests rc=$?"
  fi
  grep -E -- "--- FAIL|panic:|_test.go:[0-9]+:|^Benchmark" "$OUT/decode.log" | head -60 >> "$S"
  if [ -x "$B/kvalign" ]; then
    for cfg in distilgpt2 smollm2-135m; do
      for k in chain persistent; do
        "$B/kvalign" bench decode --device cuda --config $cfg --dtype fp16 --decode-kernel $k 2>&1 | grep -E "^config|^decode|GPU alone" >> "$S"
      done
    done
  fi
fi
echo
echo "======== summary"
cat "$S"
