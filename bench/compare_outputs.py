#!/usr/bin/env python3
"""Are two runs the same? Field runs table by table, benchmark reports figure by figure.

For a change that must not change behaviour (a refactor), run the same command before and after
and compare::

    python jobs/process_field.py --set output=/tmp/before     # on the old revision
    python jobs/process_field.py --set output=/tmp/after      # on the new one
    python bench/compare_outputs.py --field /tmp/before /tmp/after
    galgan evaluate --out /tmp/bench_before                   # likewise
    python bench/compare_outputs.py --report /tmp/bench_before /tmp/bench_after

Field runs: the catalog, truth and blends tables must hold the same rows (by ``objectId``,
``truthId``, ``blendId``), integer and flag columns equal, float columns equal within ``--rtol``
(default 1e-6: float32 rounding where BLAS kernels differ). Reports: every number of
``report.json`` except timings, and ``table.md`` line by line. Prints one line per table and a last
line ``identical``/``within tolerance``/``DIFFERENT``; exits 1 when different.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from galgan_ray.outputs import read_run_table

KEYS = {"catalog": "objectId", "truth": "truthId", "blends": "blendId"}


def compare_field(a: str, b: str, *, rtol: float) -> str:
    worst = "identical"
    for table, key in KEYS.items():
        ta, tb = read_run_table(a, what=table).to_pandas(), read_run_table(b, what=table).to_pandas()
        if len(ta) == 0 and len(tb) == 0:
            continue
        if list(ta.columns) != list(tb.columns):
            print(f"{table}: columns differ: {sorted(set(ta.columns) ^ set(tb.columns))}")
            return "DIFFERENT"
        ta, tb = ta.sort_values(key).reset_index(drop=True), tb.sort_values(key).reset_index(drop=True)
        if not np.array_equal(ta[key].to_numpy(), tb[key].to_numpy()):
            print(f"{table}: {len(ta)} vs {len(tb)} rows, {len(set(ta[key]) ^ set(tb[key]))} {key}s differ")
            return "DIFFERENT"
        n_float, max_rel = 0, 0.0
        for c in ta.columns:
            x, y = ta[c].to_numpy(), tb[c].to_numpy()
            if np.issubdtype(x.dtype, np.floating):
                same = np.array_equal(x, y, equal_nan=True)
                if not same:
                    n_float += 1
                    with np.errstate(invalid="ignore", divide="ignore"):
                        rel = np.nanmax(np.abs(x - y) / np.maximum(np.abs(x), 1e-30))
                    max_rel = max(max_rel, float(rel))
                    if not np.allclose(x, y, rtol=rtol, atol=0, equal_nan=True):
                        print(f"{table}: column {c} differs beyond rtol {rtol} (max relative {rel:.2e})")
                        return "DIFFERENT"
            elif not np.array_equal(x, y):
                print(f"{table}: column {c} differs ({int((x != y).sum())} rows)")
                return "DIFFERENT"
        state = "identical" if n_float == 0 else f"within tolerance ({n_float} float columns, max relative {max_rel:.1e})"
        if n_float:
            worst = "within tolerance"
        print(f"{table}: {len(ta)} rows, {state}")
    return worst


def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("timing", "seconds", "created_utc", "git_revision", "provenance", "total_s"):
                continue
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, float(obj)
    else:
        yield path, obj


def compare_report(a: str, b: str, *, rtol: float) -> str:
    ra = dict(_numbers(json.loads((Path(a) / "report.json").read_text())))
    rb = dict(_numbers(json.loads((Path(b) / "report.json").read_text())))
    if set(ra) != set(rb):
        print(f"report.json: keys differ: {sorted(set(ra) ^ set(rb))[:10]}")
        return "DIFFERENT"
    n_diff, bad = 0, []
    for k, v in ra.items():
        w = rb[k]
        if isinstance(v, float) and isinstance(w, float):
            if v != w and not (math.isnan(v) and math.isnan(w)):
                n_diff += 1
                if not math.isclose(v, w, rel_tol=rtol, abs_tol=0):
                    bad.append((k, v, w))
        elif v != w:
            bad.append((k, v, w))
    for k, v, w in bad[:10]:
        print(f"report.json: {k}: {v} vs {w}")
    ta, tb = (Path(x) / "table.md" for x in (a, b))
    same_table = ta.read_text() == tb.read_text()
    print(f"report.json: {len(ra)} values, {n_diff} differ in float rounding, {len(bad)} beyond rtol {rtol}; "
          f"table.md {'identical' if same_table else 'DIFFERENT'}")
    if bad or not same_table:
        return "DIFFERENT"
    return "identical" if n_diff == 0 else "within tolerance"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--field", nargs=2, metavar=("BEFORE", "AFTER"), help="two field-run outputs")
    p.add_argument("--report", nargs=2, metavar=("BEFORE", "AFTER"), help="two `galgan evaluate --out` folders")
    p.add_argument("--rtol", type=float, default=1e-6)
    args = p.parse_args(argv)
    verdicts = []
    if args.field:
        verdicts.append(compare_field(*args.field, rtol=args.rtol))
    if args.report:
        verdicts.append(compare_report(*args.report, rtol=args.rtol))
    if not verdicts:
        p.error("give --field and/or --report")
    verdict = ("DIFFERENT" if "DIFFERENT" in verdicts else
               "within tolerance" if "within tolerance" in verdicts else "identical")
    print(verdict)
    return 1 if verdict == "DIFFERENT" else 0


if __name__ == "__main__":
    sys.exit(main())
