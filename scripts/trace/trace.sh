#!/usr/bin/env bash
# Builds cupti-trace.c on the GPU machine against its CUPTI, then traces
# `kvalign ARGS…` and prints analyze.py's table.
#   usage: scripts/trace/trace.sh KVALIGN_BINARY TITLE ARGS…   (OUT: where the CSV goes;
#   ANALYZE_ARGS: more arguments for analyze.py, e.g. "--after sample_final")
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
so=/tmp/cupti-trace.so
if [ ! -e $so ]; then
  inc=$(dirname "$(find /usr/local /opt /usr/include $(python3 -c 'import site; print(" ".join(site.getsitepackages()))') \
    -name cupti.h 2>/dev/null | head -1)")
  lib=$(dirname "$(find /usr/local /opt /usr/lib $(python3 -c 'import site; print(" ".join(site.getsitepackages()))') \
    -name 'libcupti.so*' 2>/dev/null | head -1)")
  krec=$(grep -o "CUpti_ActivityKernel[0-9]*" "$inc/cupti_activity.h" | sort -V | tail -1)
  mrec=$(grep -oE "CUpti_ActivityMemcpy[0-9]+" "$inc/cupti_activity.h" | sort -V | tail -1)
  mrec=${mrec:-CUpti_ActivityMemcpy}
  cuinc=$(dirname "$(find /usr/local /opt /usr/include -name cuda.h 2>/dev/null | head -1)")
  echo "cupti: $inc $lib $krec $mrec"
  gcc -O2 -fPIC -shared -I"$inc" -I"$cuinc" -DKREC="$krec" -DMREC="$mrec" -o $so "$here/cupti-trace.c" -L"$lib" -l:$(basename "$(ls "$lib"/libcupti.so* | head -1)") \
    -Wl,-rpath,"$lib" || exit 1
fi
bin=$1 title=$2
shift 2
csv=${OUT:-/tmp}/trace-$(echo "$title" | tr -c 'a-zA-Z0-9\n' '-').csv
CUDA_INJECTION64_PATH=$so KV_TRACE_OUT=$csv "$bin" "$@" 2>&1 | grep -E "^decode" | sed -E 's/\(p10[^)]*\)//'
python3 "$here/analyze.py" "$csv" --title "$title" ${ANALYZE_ARGS:-}
gzip -f "$csv"
