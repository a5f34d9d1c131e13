#!/usr/bin/env python3
"""Where a decode step's time goes, from a cupti-trace.c CSV.

Splits the trace into steps at each step's first kernel (the input copy or
the embedding; with --after NAME, the kernel after each one whose name
starts with NAME: sample_final where a step starts with another kernel,
as SmolLM2's first layer's block), keeps the last --steps complete ones,
and prints for each kernel position of a step the medians of:
its start and end after the step's first kernel started, its duration
(start to end: a programmatic dependent's includes its wait), and its
marginal cost, end minus the latest end before it (what it adds to the
step). The marginal costs add up to the step.
  usage: analyze.py trace.csv [--steps N] [--title T] [--after NAME]
"""
import argparse, csv, re, statistics


def short(name):
    """A mangled kernel name without its namespaces and parameter types:
    fused_gemv_kernel_v1<1,1,4,32,0> for _ZN…_GLOBAL__N_…20fused_gemv_kernel_v1ILb1E…"""
    if not name.startswith("_Z"):
        return name[:60]
    i = 3 if name.startswith("_ZN") else 2
    base = ""
    while i < len(name) and name[i].isdigit():
        m = re.match(r"\d+", name[i:])
        n = int(m.group(0))
        i += m.end()
        part = name[i:i + n]
        i += n
        if not part.startswith("_GLOBAL__N"):
            base = part
    rest = name[i:]
    if rest.startswith("I"):
        t = re.findall(r"L[a-z](-?\w+?)E", rest.split("EEv")[0] + "E")
        base += "<" + ",".join(t) + ">"
    return base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--title", default="")
    ap.add_argument("--after", default="")
    a = ap.parse_args()
    rows = []
    with open(a.csv) as f:
        for r in csv.DictReader(f):
            if r["name"] is None:  # a line cut off when the traced program exited
                continue
            rows.append((int(r["start"]), int(r["end"]), short(r["name"]), int(r["blocks"])))
    rows.sort()
    steps, cur = [], None
    first = ("copy_in", "embed") if any(r[2].startswith("copy_in") for r in rows) else ("embed",)
    split = False
    for r in rows:
        if (split if a.after else r[2].startswith(first)):
            if cur:
                steps.append(cur)
            cur = [r]
        elif cur is not None:
            cur.append(r)
        split = bool(a.after) and r[2].startswith(a.after)
    # The last step may be cut short by the trace's end; steps of another
    # shape (prefill, warm-up) are dropped by keeping the commonest length.
    if len(steps) < 2:
        print("too few steps in", a.csv)
        return
    steps = steps[:-1]
    common = statistics.mode(len(s) for s in steps)
    steps = [s for s in steps if len(s) == common][-a.steps:]
    n = len(steps)
    med = statistics.median
    lens = [max(r[1] for r in s) - s[0][0] for s in steps]
    gaps = [steps[i + 1][0][0] - max(r[1] for r in steps[i]) for i in range(n - 1)]
    print(f"== {a.title} {n} steps of {common} kernels: step {med(lens)/1e3:.1f} us (GPU, first start to last end), "
          f"gap to the next step {med(gaps)/1e3:.1f} us")
    print("| # | kernel | blocks | start | end | duration | marginal |")
    print("|---|---|---|---|---|---|---|")
    total = 0.0
    for i in range(common):
        st = [s[i][0] - s[0][0] for s in steps]
        en = [s[i][1] - s[0][0] for s in steps]
        du = [s[i][1] - s[i][0] for s in steps]
        mg = [s[i][1] - max([s[0][0]] + [r[1] for r in s[:i]]) for s in steps]
        total += med(mg)
        print(f"| {i} | {steps[-1][i][2][:60]} | {steps[-1][i][3]} | {med(st)/1e3:.2f} | {med(en)/1e3:.2f} | "
              f"{med(du)/1e3:.2f} | {med(mg)/1e3:.2f} |")
    print(f"sum of median marginals {total/1e3:.1f} us")


if __name__ == "__main__":
    main()
