"""scripts/bench_speed.py in --quick mode: a well-formed table, a finite positive latency per method, the ratios.

Runs the script as a user would (a subprocess), so the argument parsing, the bundle configs and the output files
are covered too. Never asserts a speed: timings on a shared CPU are not reproducible.
"""

import json
import math
import os
import subprocess
import sys

from conftest import REPO_ROOT

METHODS = ("srds", "student", "student_ts", "student_onnx", "bsn", "bm3d", "nlm")
SIZES = (32, 64)  # the --quick sizes


def test_bench_speed_quick(shared_data, tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nprose kept\n\n"
                   "<!-- bench_speed:cpu:begin -->\nold table\n<!-- bench_speed:cpu:end -->\n\nafter\n")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "bench_speed.py"), "--quick", "--device", "cpu",
         "--data", str(shared_data), "--out", str(tmp_path / "bench.json"), "--out", str(doc)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    header, separator, rows = table[0], table[1], table[2:]
    columns = header.count("|")
    assert set(separator) <= set("|-") and separator.count("|") == columns
    assert len(rows) == len(SIZES) * len(METHODS)
    assert all(row.count("|") == columns for row in rows), rows
    assert not any("failed" in row for row in rows), rows

    data = json.loads((tmp_path / "bench.json").read_text())
    measured = {(row["size"], row["method"]) for row in data["rows"]}
    assert measured == {(size, method) for size in SIZES for method in METHODS}
    for row in data["rows"]:
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row
        assert row["throughput"] > 0 and all(p > 0 for p in row["peak_mib"]), row
    assert data["machine"]["commit"] and data["machine"]["torch"]

    for prefix in ("- student (eager) vs SRDS", "- student (TorchScript) vs SRDS", "- student (ONNX Runtime) vs SRDS",
                   "- SRDS vs BM3D"):
        assert any(line.startswith(prefix) for line in result.stdout.splitlines()), prefix
    assert {f"srds_over_student_{size}" for size in SIZES} <= set(data["ratios"])

    text = doc.read_text()
    assert "prose kept" in text and text.rstrip().endswith("after") and "old table" not in text
    assert text.count("<!-- bench_speed:cpu:begin -->") == 1 and "| 64x64 | BM3D |" in text
