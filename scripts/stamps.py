#!/usr/bin/env python3
"""Summarise the in-kernel timestamps of a measuring build (csrc/stamps.cuh).

Usage: stamps.py FILE [first_layer last_layer]

FILE is what kv_stamps_write wrote: KVALIGN_STAMPS=FILE kvalign bench
decode ..., with a kernel library built by `make -C csrc clean && make -C
csrc STAMPS=1` (then linked as usual). For the decode chain's kernels
(q|k|v product, attention, output projection, the attention block that
folds the three, MLP; a layer ends with its MLP) it prints, as medians
over the middle layers of the recorded steps, in ns: when the kernel's blocks return from
the programmatic wait relative to the end of the kernel before it (the
hand-off), each checkpoint relative to the block's own wait, and the
kernel's end.
"""
import struct
import sys
from statistics import median

W = 32  # words a record (stamps.cuh kStampWords)

NAMES = {1: "qkv", 2: "attention", 3: "out-proj", 4: "norm-gemv", 5: "mlp", 6: "attention-1blk", 7: "attention-op",
         8: "head"}
CHECKS = {
    1: ["landed", "summed", "gemv+sums", "res-sync", "stored", "prologue-end", "gemv-loop"],
    3: ["landed", "summed", "gemv+sums", "-", "written", "prologue-end", "gemv-loop"],
    5: ["landed", "normed", "gemv+act", "h-sync", "atomics", "prologue-end", "gemv-loop"],
    2: ["scores", "merged", "pushed", "r0-wait", "r0-written", "prologue-end", "merge-sync1"],
    7: ["scores", "merged", "pushed", "merge-sync", "projected", "prologue-end", "merge-sync1",
        "stream-landed", "qkv-product", "qkv-exchanged"],
    8: ["split-x", "mma-loop", "threshold", "-", "exact", "prologue-end", "merged"],
}


def load(path):
    recs = []
    with open(path, "rb") as f:
        data = f.read()
    off = 0
    while off < len(data):
        n, cap = struct.unpack_from("<QQ", data, off)
        off += 16
        words = struct.unpack_from("<%dQ" % (cap * W), data, off)
        off += cap * W * 8
        for i in range(min(n, cap)):
            r = words[W * i : W * i + W]
            if r[1] == 0 or r[2] == 0:
                continue
            recs.append(r)
    return recs


def invocations(recs):
    by_id = {}
    for r in recs:
        by_id.setdefault(r[0] >> 48, []).append(r)
    invs = []
    for kid, rs in by_id.items():
        rs.sort(key=lambda r: r[2])
        cur = [rs[0]]
        for r in rs[1:]:
            if r[2] - cur[-1][2] > 3000:
                invs.append((kid, cur))
                cur = []
            cur.append(r)
        invs.append((kid, cur))
    out = []
    for kid, rs in invs:
        waits = sorted(r[2] for r in rs)
        ends = [max(t for t in r[1:16] if t) for r in rs]
        cps = {}
        for k in range(3, 16):
            d = [r[k] - r[2] for r in rs if r[k]]
            if d:
                cps[k] = median(d)
        out.append(
            dict(id=kid, n=len(rs), start_min=min(r[1] for r in rs), wait_min=waits[0], wait_med=median(waits),
                 wait_max=waits[-1], end_med=median(ends), end_max=max(ends), cps=cps)
        )
    out.sort(key=lambda v: v["wait_med"])
    return out


def main():
    recs = load(sys.argv[1])
    lo, hi = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (3, 26)
    ts = sorted({t for r in recs for t in r[1:16] if t})
    rates = [(r[16 + k] - r[17]) / (r[k] - r[1]) for r in recs for k in (7,) if r[k] and r[k] - r[1] > 3000]
    if rates:
        print("SM clock from clock64/globaltimer: median %.3f GHz (p10 %.3f, p90 %.3f)" % (
            median(rates), sorted(rates)[len(rates) // 10], sorted(rates)[9 * len(rates) // 10]))
    diffs = sorted({b - a for a, b in zip(ts, ts[1:]) if b > a})
    print("records %d; smallest timer steps (ns): %s" % (len(recs), diffs[:5]))
    invs = invocations(recs)
    steps, cur = [], [invs[0]]
    for v in invs[1:]:
        if v["wait_med"] - cur[-1]["wait_med"] > 15000:
            steps.append(cur)
            cur = []
        cur.append(v)
    steps.append(cur)
    # A layer ends with its MLP kernel (id 5), whichever kernels come before it.
    full = [s for s in steps if sum(1 for v in s if v["id"] == 5) >= hi + 1]
    print("steps %d, complete %d (layers %d..%d summarised)" % (len(steps), len(full), lo, hi))
    rows = {}
    for s in full:
        layer, prev = 0, None
        for v in s:
            if prev is not None and lo <= layer <= hi:
                d = rows.setdefault(v["id"], {})
                add = lambda k, x: d.setdefault(k, []).append(x)
                add("blocks", v["n"])
                add("start-min", v["start_min"] - prev["end_max"])
                add("wait-min", v["wait_min"] - prev["end_max"])
                add("wait-med", v["wait_med"] - prev["end_max"])
                add("wait-max", v["wait_max"] - prev["end_max"])
                for k, t in v["cps"].items():
                    add("cp%d" % k, t)
                add("end-med", v["end_med"] - v["wait_med"])
                add("end-max", v["end_max"] - v["wait_med"])
                add("marginal", v["end_max"] - prev["end_max"])
            if v["id"] == 5:
                layer += 1
            prev = v
    # One middle layer's timeline, relative to its first kernel's median wait.
    s = full[-1]
    layer, t0, shown = 0, None, 0
    print("\ntimeline of layer %d of the last complete step (ns from its first kernel's wait-med):" % ((lo + hi) // 2))
    print("  %-12s %8s %8s %8s %8s %8s" % ("kernel", "start", "prol-end", "wait-med", "end-med", "end-max"))
    for v in s:
        if layer == (lo + hi) // 2 and t0 is None:
            t0 = v["wait_med"]
        if v["id"] == 5:
            layer += 1
        if t0 is not None and shown < 7:
            shown += 1
            pe = v["cps"].get(8)
            print("  %-12s %8d %8s %8d %8d %8d" % (NAMES.get(v["id"], v["id"]), v["start_min"] - t0,
                  "%d" % (v["wait_med"] + pe - t0) if pe is not None else "-", v["wait_med"] - t0,
                  v["end_med"] - t0, v["end_max"] - t0))
    for kid in (1, 2, 3, 7, 5):
        d = rows.get(kid)
        if not d:
            continue
        names = CHECKS.get(kid, [])
        print("\n%s (%d samples, %d blocks)" % (NAMES.get(kid, kid), len(d["marginal"]), median(d["blocks"])))
        for k in ("start-min", "wait-min", "wait-med", "wait-max"):
            print("  %-22s %7.0f" % (k + " (from pred end)", median(d[k])))
        for k in range(3, 16):
            if "cp%d" % k in d:
                label = names[k - 3] if k - 3 < len(names) else str(k)
                print("  %-22s %7.0f" % ("cp%d %s (from wait)" % (k, label), median(d["cp%d" % k])))
        for k in ("end-med", "end-max"):
            print("  %-22s %7.0f" % (k + " (from wait-med)", median(d[k])))
        print("  %-22s %7.0f" % ("marginal", median(d["marginal"])))


if __name__ == "__main__":
    main()
