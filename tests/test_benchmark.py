"""`keras-vit benchmark` runs end to end with tiny settings and prints its table (not timed)."""

import json
import os
import subprocess
import sys

TINY = ["--variants", "Ti/16", "--batch-sizes", "2", "--image-size", "32", "--depth", "1",
        "--repeats", "1", "--warmup", "0", "--train-steps", "1", "--train-batch-size", "8",
        "--train-image-size", "16", "--memory-variant", "Ti/16", "--memory-batch-size", "2"]


def test_benchmark_prints_table_with_ratios(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark.py"),
         *TINY, "--json", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| work"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    assert "ratio" in columns and "keras-vit" in columns and "peer" in columns
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:]
            if line.startswith("|")]
    works = [row[0] for row in rows]
    for prefix in ("infer f32 Ti/16", "train fit", "infer bf16", "train fit bf16", "TFLite f32",
                   "TFLite int8", "peak memory"):
        assert any(w.startswith(prefix) for w in works), (prefix, works)
    ratio = columns.index("ratio")
    compared = [row for row in rows if row[ratio] != "-"]
    assert compared and all(row[ratio].endswith("x") and float(row[ratio][:-1]) > 0
                            for row in compared)
    assert "matmul peak" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["peak_gflops"] > 0 and len(saved["rows"]) == len(rows)
