#!/usr/bin/env python3
"""Picks a small seed corpus for a fuzz target: the fewest inputs that still cover every edge.

    minimize_corpus.py FUZZ_BINARY POOL_DIR OUT_DIR

Runs the target's libFuzzer merge on each input of POOL_DIR alone to get the coverage edges that
input reaches, then copies to OUT_DIR, greedily, the input adding the most edges not yet covered
(the smaller one on ties) until every edge of the pool is covered. libFuzzer's own -merge=1 keeps
every input that adds a feature in size order, which leaves several times more files.
"""
import os
import shutil
import subprocess
import sys
import tempfile


def edges_of(binary, path, scratch):
    one, out, control = (os.path.join(scratch, n) for n in ("one", "out", "control"))
    for directory in (one, out):
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
    if os.path.exists(control):
        os.remove(control)  # an existing control file would resume an earlier merge
    shutil.copy(path, one)
    subprocess.run([binary, "-merge=1", "-use_value_profile=0", "-use_counters=0", "-merge_control_file=" + control, out, one],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    edges = set()
    with open(control) as lines:
        for line in lines:
            fields = line.split()
            if fields and fields[0] == "COV":
                edges.update(fields[2:])
    return edges


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    binary, pool, out_dir = sys.argv[1:]
    inputs = sorted(os.path.join(pool, name) for name in os.listdir(pool))
    with tempfile.TemporaryDirectory() as scratch:
        coverage = {path: edges_of(binary, path, scratch) for path in inputs}
    universe = set().union(*coverage.values()) if coverage else set()
    chosen, covered = [], set()
    while covered != universe:
        best = max(inputs, key=lambda p: (len(coverage[p] - covered), -os.path.getsize(p), p))
        chosen.append(best)
        covered |= coverage[best]
    os.makedirs(out_dir, exist_ok=True)
    for path in chosen:
        shutil.copy(path, out_dir)
    print(f"{len(universe)} edges: {len(chosen)} of {len(inputs)} inputs, {sum(os.path.getsize(p) for p in chosen)} bytes")


if __name__ == "__main__":
    main()
