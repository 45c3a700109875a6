"""`keras-vit benchmark` runs end to end with tiny settings and prints its table (not timed)."""

import json
import os
import subprocess
import sys

import pytest

from tests import processes

TINY = ["--variants", "Ti/16", "--batch-sizes", "2", "--image-size", "32", "--depth", "1",
        "--repeats", "1", "--warmup", "0", "--train-steps", "1", "--train-batch-size", "8",
        "--train-image-size", "16", "--memory-variant", "Ti/16", "--memory-batch-size", "2"]


@pytest.mark.slow
def test_benchmark_prints_table_with_ratios(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = processes.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark.py"),
         *TINY, "--json", str(out)], timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| work"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    assert "ratio" in columns and "keras-vit" in columns and "peer" in columns
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:]
            if line.startswith("|")]
    works = [row[0] for row in rows]
    for prefix in ("infer f32 Ti/16", "train fit", "RandAugment", "infer bf16", "train fit bf16",
                   "TFLite f32", "TFLite int8", "peak memory"):
        assert any(w.startswith(prefix) for w in works), (prefix, works)
    ratio = columns.index("ratio")
    compared = [row for row in rows if row[ratio] != "-"]
    assert compared and all(row[ratio].endswith("x") and float(row[ratio][:-1]) > 0
                            for row in compared)
    assert "matmul peak" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["peak_gflops"] > 0 and len(saved["rows"]) == len(rows)


@pytest.mark.slow
def test_accelerator_benchmark_runs_without_tensorflow_and_reports_mfu():
    """The GPU benchmark runs where only Keras and another backend are installed (the device
    machines have Keras on JAX, no TensorFlow): here on the torch backend, tiny settings."""
    import re

    import pytest

    pytest.importorskip("torch")
    code = ("import sys; from keras_vit.cli import main; rc = main(sys.argv[1:]); "
            "print('tensorflow imported:', 'tensorflow' in sys.modules); sys.exit(rc)")
    result = subprocess.run(
        [sys.executable, "-c", code, "benchmark-accelerator", "--variant", "Ti/16",
         "--image-size", "32", "--patch-size", "4", "--depth", "2", "--num-classes", "10",
         "--batch-size", "8", "--steps", "2", "--repeats", "2", "--matmul-size", "256"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "KERAS_BACKEND": "torch"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "tensorflow imported: False" in out and "on torch" in out
    peak = float(re.search(r"matmul peak .*: ([\d.]+) TFLOP/s", out).group(1))
    speed = float(re.search(r"([\d.]+) img/s", out).group(1))
    gflop = float(re.search(r"model FLOPs: ([\d.]+) GFLOP/image", out).group(1))
    mfu = float(re.search(r"MFU ([\d.]+)%", out).group(1))
    assert peak > 0 and speed > 0
    assert abs(mfu - 100 * gflop * speed / 1e3 / peak) <= 0.05 * mfu + 0.2
    # The PyTorch peer of the same shape ran in its own process (Hugging Face's ViT here,
    # timm needing torchvision), and the ratio is of the two rates printed.
    peer = re.search(r"peer: (.*) on cpu: ([\d.]+) img/s .*keras-vit/peer: ([\d.]+)x", out)
    assert peer, out
    assert "ViT" in peer.group(1) and float(peer.group(2)) > 0
    assert abs(float(peer.group(3)) - speed / float(peer.group(2))) <= 0.01 * float(peer.group(3)) + 0.01
