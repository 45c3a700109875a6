"""`keras-vit train` on the JAX backend with keras.distribution: one device, data parallel and
model parallel over two virtual CPU devices train the same (the same loss trajectory for the
same global batch), the model-parallel kernels are sharded, a killed run resumes to the same
weights, and the export runs on TensorFlow in a process of its own. Each in a fresh process:
the backend is chosen when Keras is imported."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("jax")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TWO_DEVICES = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "TF_CPP_MIN_LOG_LEVEL": "2"}
TINY = dict(data="digits", variant="Ti/4", image_size=16, depth=2, epochs=2, batch_size=64,
            drop_path=0.0, verbose=0)


def run_python(code, env, timeout=800):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_distributions_train_the_same_and_shard_the_kernels(tmp_path):
    found = run_python(f"""
        import json
        import jax, keras
        import keras_vit
        from keras_vit.training.jax_distribution import JaxDistribution

        results = {{}}
        for name in ("none", "data-parallel", "model-parallel"):
            result = keras_vit.train(keras_vit.TrainConfig(
                out=r"{tmp_path}/" + name, distribution=name, export=name == "none",
                **{TINY!r}))
            results[name] = dict(loss=result.history["loss"], test=result.test_accuracy,
                                 replicas=JaxDistribution(name).num_replicas_in_sync)
            if name == "none":
                results["export"] = [r.format for r in result.export_report.results]
        with JaxDistribution("model-parallel").scope():
            model = keras_vit.build("Ti/4", image_size=16, depth=1, num_classes=10)
        shardings = {{v.path.split("/")[-1]: str(v.value.sharding.spec)
                     for v in model.variables if "encoderblock_0" in v.path}}
        print(json.dumps(dict(results=results, shardings=shardings,
                              devices=len(jax.devices()))))
        """, TWO_DEVICES)
    assert found["devices"] == 2
    results = found["results"]
    one = results["none"]["loss"]
    for name in ("data-parallel", "model-parallel"):
        np.testing.assert_allclose(results[name]["loss"], one, rtol=1e-4)
        assert abs(results[name]["test"] - results["none"]["test"]) < 0.01
    assert [results[n]["replicas"] for n in ("none", "data-parallel", "model-parallel")] == \
        [1, 2, 1]
    shardings = found["shardings"]
    assert "'model'" in shardings["query_kernel"] and "'model'" in shardings["kernel"]
    assert "'model'" not in shardings["gamma"]  # LayerNorm stays replicated
    # The export ran on TensorFlow (a process of its own), verified as any other.
    assert {"keras", "savedmodel", "tflite_float32", "tflite_int8"} <= set(results["export"])


def test_a_killed_jax_run_resumes_to_the_same_weights(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2"}
    args = ["--variant", "Ti/4", "--image-size", "16", "--depth", "2", "--epochs", "3",
            "--batch-size", "64", "--checkpoint-every", "4", "--no-export", "--verbose", "0"]

    def command(out):
        return [sys.executable, "-m", "keras_vit.cli", "train", "--out", str(out), *args]

    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env)
    metadata = out / "backup" / "training_metadata.json"
    deadline = time.time() + 400
    try:
        while time.time() < deadline:  # a mid-epoch backup in epoch 2 or later
            if metadata.exists():
                try:
                    state = json.loads(metadata.read_text())
                except ValueError:
                    state = {}
                if state.get("epoch", 0) >= 1 and state.get("batch", 0) > 0:
                    break
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("no mid-epoch backup appeared")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    resumed = subprocess.run(command(out), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "Restored the backup at step" in resumed.stdout
    whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True, env=env,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    def fingerprint(stdout):
        return re.search(r"weights fingerprint: (\w+)", stdout).group(1)

    assert fingerprint(resumed.stdout) == fingerprint(whole.stdout)
