#!/usr/bin/env python3
"""Inclusive share of a function in a `perf record --call-graph dwarf`
profile, split by the function it calls directly (or "(self)").

    perf script -i perf.data > stacks.txt
    python3 benches/perf_stacks.py stacks.txt 'FileJournal::append_logged' 'spool::seal_record'

For each name (a substring of the symbol), prints the share of all samples
whose stack holds it, then its callees' shares. BENCHMARKS.md, "Lighter
work per message", was read this way.
"""
import collections
import re
import sys


def stacks(path):
    out, cur = [], []
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if not line.strip():
            if cur:
                out.append(cur)
                cur = []
            continue
        if line[0] in " \t":
            parts = line.strip().split(" ", 1)
            if len(parts) == 2:
                sym = re.sub(r"\+0x[0-9a-f]+", " ", parts[1])
                cur.append(re.sub(r"\s*\(.*\)$", "", sym).strip())
    if cur:
        out.append(cur)
    return out


def main():
    all_stacks = stacks(sys.argv[1])
    n = len(all_stacks)
    print(f"samples {n}")
    for target in sys.argv[2:]:
        callees, hits = collections.Counter(), 0
        for st in all_stacks:
            at = [i for i, f in enumerate(st) if target in f]
            if not at:
                continue
            hits += 1
            # Frames run from the leaf up: the one below the outermost match
            # is what it called.
            i = max(at)
            callees[st[i - 1][:100] if i > 0 else "(self)"] += 1
        print(f"== {target}: {100 * hits / max(n, 1):.1f} %")
        for name, k in callees.most_common(12):
            print(f"  {100 * k / n:5.1f} % {name}")


if __name__ == "__main__":
    main()
