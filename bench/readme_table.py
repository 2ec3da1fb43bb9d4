#!/usr/bin/env python3
"""Turns shapes_bench's summary (its output, on stdin) into the README's table (markdown, on stdout).

    OMP_PROC_BIND=true build/release/bench/shapes_bench --benchmark_repetitions=3 \
        --benchmark_report_aggregates_only=true | tee run.log
    python3 bench/readme_table.py < run.log

Each table row joins a shape's T on 1 thread and on 2 threads (summary columns: T, thr, layer ms,
roofline, roof now, vs naive, share %, 2thr x, GFLOP/s, disp/cpy, comb/cpy, comb/rows, read now, sgemm now,
roof pairs).
"""
import re
import sys

ROW = re.compile(r"^(S\d)\s+(\d+)\s+([12])\s+(\S+(?:\s+\S+){10,12})\s*$")
FIELDS = ("ms", "roofline", "roofline_now", "naive", "share", "x2", "gflops", "dispatch", "combine", "combine_rows", "read",
          "sgemm", "roof_pairs")
# Summaries before session 50 have no "roof pairs" column, and those before session 34 no "roof now".
LAYOUTS = {len(FIELDS): FIELDS, len(FIELDS) - 1: FIELDS[:-1], len(FIELDS) - 2: tuple(f for f in FIELDS[:-1] if f != "roofline_now")}


def ms(value):
    """Three significant figures, as the README writes times."""
    v = float(value)
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def main():
    rows = {}
    for line in sys.stdin:
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # (Google Benchmark colours its output on a terminal)
        match = ROW.match(line.strip())
        if match:
            shape, tokens, threads, rest = match.groups()
            values = rest.split()
            row = dict(zip(LAYOUTS[len(values)], values))
            rows[(shape, int(tokens), int(threads))] = {"roofline_now": "-", "roof_pairs": "-", **row}
    if not rows:
        sys.exit("readme_table.py: no summary rows on stdin (run shapes_bench to the end)")
    print("| shape | T | ms, 1 thr | ms, 2 thr | roofline 1 / 2 thr | roofline in pairs 1 / 2 thr "
          "| vs naive 1 / 2 thr | 2 thr × | share % (2 thr) | dispatch, combine ÷ memcpy | combine ÷ row memcpy "
          "| read now, 2 thr | roofline at read/sgemm now, 2 thr |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, tokens in sorted({(s, t) for s, t, _ in rows}):
        one, two = rows.get((shape, tokens, 1)), rows.get((shape, tokens, 2))
        if one is None or two is None:
            continue
        print(f"| {shape} | {tokens} | {ms(one['ms'])} | {ms(two['ms'])} | {one['roofline']} / {two['roofline']} "
              f"| {one['roof_pairs']} / {two['roof_pairs']} "
              f"| {one['naive']} / {two['naive']} | {two['x2']} | {two['share']} "
              f"| {one['dispatch']}, {one['combine']} | {one['combine_rows']} | {two['read']} "
              f"| {two['roofline_now']} |")


if __name__ == "__main__":
    main()
