"""`keras-vit train` on the JAX backend with keras.distribution: one device, data parallel and
model parallel over two virtual CPU devices train the same (the same loss trajectory for the
same global batch), the model-parallel kernels are sharded, a killed run resumes to the same
weights, and the export runs on TensorFlow in a process of its own. Each in a fresh process:
the backend is chosen when Keras is imported."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import kill_at_a_mid_epoch_backup

pytest.importorskip("jax")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TWO_DEVICES = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "TF_CPP_MIN_LOG_LEVEL": "2"}
# S: 6 heads, which two devices divide (model parallelism splits the heads). 10 steps an
# epoch, a backup every 4: the kill test finds a mid-epoch backup in the second epoch.
TINY = dict(data="digits", variant="S/4", image_size=16, depth=1, epochs=2, batch_size=64,
            drop_path=0.0, verbose=0, train_fraction=0.5, checkpoint_every=4)


def run_python(code, env, cwd, timeout=800):
    # cwd: a run's default export folder (exported/<run name>) is relative to it.
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, **env}, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def distributions(tmp_path_factory):
    """One JAX process trains TINY with no distribution (exported), data parallel and model
    parallel, and tries two settings the distributions refuse."""
    tmp_path = tmp_path_factory.mktemp("distributions")
    found = run_python(f"""
        import json
        import jax, keras
        import keras_vit

        # What Keras hands the devices: every batch goes through this JAX call when a
        # keras.distribution is active during fit/evaluate (a spy, not a change).
        batches = []
        place = jax.make_array_from_process_local_data

        def spy(sharding, data, *args, **kwargs):
            batches.append((len(sharding.device_set), data.shape[0]))
            return place(sharding, data, *args, **kwargs)

        jax.make_array_from_process_local_data = spy
        results = {{}}
        for name in ("none", "data-parallel", "model-parallel"):
            batches.clear()
            result = keras_vit.train(keras_vit.TrainConfig(
                out=r"{tmp_path}/" + name, distribution=name, export=name == "none",
                **{TINY!r}))
            results[name] = dict(loss=result.history["loss"], test=result.test_accuracy,
                                 fingerprint=result.weights_fingerprint,
                                 replicas=result.config["replicas"],
                                 batches=sorted(set(batches)),
                                 shardings={{v.path.split("/")[-1]: list(getattr(v.value.sharding, "spec", ()))
                                             for v in result.model.variables
                                             if "encoderblock_0" in v.path}})
            if name == "none":
                results["export"] = [r.format for r in result.export_report.results]
        refused = []
        for name, changes in (("model-parallel", dict(variant="Ti/4")),  # 3 heads
                              ("data-parallel", dict(batch_size=63))):
            try:
                keras_vit.train(keras_vit.TrainConfig(
                    out=r"{tmp_path}/refused", distribution=name, **{{**{TINY!r}, **changes}}))
            except keras_vit.errors.ConfigError as err:
                refused.append(str(err))
        print(json.dumps(dict(results=results, devices=len(jax.devices()), refused=refused)))
        """, TWO_DEVICES, cwd=tmp_path)
    return found, tmp_path


def test_distributions_train_the_same_and_shard_the_kernels(distributions):
    found, tmp_path = distributions
    assert len(found["refused"]) == 2, found["refused"]
    assert "has 3 heads" in found["refused"][0] and "S: 6" in found["refused"][0]
    assert "--batch-size 63 is not divisible by the 2 replicas" in found["refused"][1]
    assert not (tmp_path / "refused").exists()  # nothing written
    assert found["devices"] == 2
    results = found["results"]
    one = results["none"]["loss"]
    for name in ("data-parallel", "model-parallel"):
        np.testing.assert_allclose(results[name]["loss"], one, rtol=1e-4)
        assert abs(results[name]["test"] - results["none"]["test"]) < 0.01
    assert [results[n]["replicas"] for n in ("none", "data-parallel", "model-parallel")] == \
        [1, 2, 1]
    # Data parallel: batches went to both devices during fit and evaluate, the training
    # batches whole (64) and the test split's odd last batch (359 = 5 x 64 + 39) padded to 40.
    placed = {tuple(b) for b in results["data-parallel"]["batches"]}
    assert (2, 64) in placed and (2, 40) in placed and all(n % 2 == 0 for _, n in placed)
    assert not results["none"]["batches"]
    # Model parallel: the trained model's kernels are split by head, LayerNorm replicated.
    shardings = results["model-parallel"]["shardings"]
    assert shardings["query_kernel"] == [None, "model", None], shardings
    assert shardings["out_kernel"] == ["model", None, None], shardings
    assert "model" in shardings["kernel"] and "model" not in shardings["gamma"]
    # The export ran on TensorFlow (a process of its own), verified as any other.
    assert {"keras", "savedmodel", "tflite_float32", "tflite_int8"} <= set(results["export"])
    assert (tmp_path / "exported" / "none" / "1" / "saved_model.pb").is_file()


def test_a_killed_jax_run_resumes_to_the_same_weights(distributions, tmp_path):
    # The distributions' process trained the same settings, never killed (and in-process:
    # the CLI is a shell over keras_vit.train); a resume must end with its weights.
    found, _ = distributions
    env = {**os.environ, **TWO_DEVICES}  # as there: two host devices, the run on one
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in TINY.items()]

    def command(out):
        return [sys.executable, "-m", "keras_vit.cli", "train", "--out", str(out), *flags,
                "--no-export"]

    out = tmp_path / "killed"
    kill_at_a_mid_epoch_backup(command(out), out, env)
    resumed = subprocess.run(command(out), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "Restored the backup at step" in resumed.stdout
    fingerprint = re.search(r"weights fingerprint: (\w+)", resumed.stdout).group(1)
    assert fingerprint == found["results"]["none"]["fingerprint"]
