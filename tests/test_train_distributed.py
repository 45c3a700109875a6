"""`keras-vit train` end to end under tf.distribute strategies (the command, in subprocesses):

- `--strategy mirrored --cpu-devices 2`: one process, two replicas on two logical CPUs;
- `--strategy multi-worker`: two processes on 127.0.0.1 (TF_CONFIG), the same command and the
  same --out, training one model together; only the chief (worker 0) keeps a run folder.

Every run is a process of its own (tests/processes.py; logical CPU devices and multi-worker
collectives can only be set up before TensorFlow's runtime starts), logs to a file, and has a
time limit; when one worker fails the other is killed after a grace period instead of waiting
for its dead peer until the limit.
"""

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_ports, run_processes

ROOT = Path(__file__).resolve().parents[1]
# tests/test_train.py's tiny model for two epochs, with a recipe that visibly learns in two
# (the digits defaults' regularisation, drop path, label smoothing and shifts, slows that down).
# --jit-compile is left at its default, as users run it.
FLAGS = ["--variant", "Ti/16", "--image-size", "8", "--patch-size", "2", "--depth", "1",
         "--batch-size", "32", "--no-export", "--verbose", "0",
         "--epochs", "2", "--learning-rate", "3e-3", "--warmup-epochs", "0.2",
         "--drop-path", "0", "--label-smoothing", "0", "--translate", "0"]
# What a finished run leaves in its folder (the backup is removed at the end).
RUN_FILES = ["config.json", "curves.png", "history.csv", "logs", "model.keras", "samples.npz"]
TIMEOUT_S = 240  # per run; healthy: ~40 s (mirrored), ~60 s (2 workers) on 2 busy cores
GRACE_S = 30  # how long the other workers may go on after one failed

pytestmark = pytest.mark.slow


def _env(**extra):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _command(out, strategy, *extra):
    return [sys.executable, "-m", "keras_vit.cli", "train", "--out", str(out),
            "--strategy", strategy, *FLAGS, *extra]


def _run_together(commands, envs, cwd, log_dir, watch=None):
    """Runs the commands at once; returns ([(pid, returncode, output)], seen) when all exited.

    Fails the test, with every log, when they take over TIMEOUT_S, or when one is still
    running GRACE_S after another one failed. `watch`: a folder polled while they run; `seen`
    is every path (relative to it) that existed there at some poll.
    """
    logs = [Path(log_dir) / f"process{i}.log" for i in range(len(commands))]
    procs, outputs, seen = run_processes(commands, envs, cwd, logs, timeout=TIMEOUT_S,
                                         grace=GRACE_S, watch=watch)
    return [(p.pid, p.returncode, out) for p, out in zip(procs, outputs)], seen


def _show(outputs):
    return "\n".join(f"---- process {i} (last 4000 characters) ----\n{out[-4000:]}"
                     for i, out in enumerate(outputs))


def _check_ok(results):
    outputs = [out for _, _, out in results]
    for i, (_, rc, _) in enumerate(results):
        assert rc == 0, f"process {i} exited with {rc}:\n" + _show(outputs)


def _start_line(output):
    lines = [line for line in output.splitlines() if line.startswith(("Starting run ",
                                                                        "Resuming run "))]
    assert len(lines) == 1, output[-4000:]
    return lines[0]


def _summary(output):
    """The final summary lines ("run: ...", "test loss: ...") as a dict."""
    lines = output.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("run: ")]
    assert starts, output[-4000:]
    return dict(line.split(": ", 1) for line in lines[starts[-1]:])


def _history(run_dir):
    with open(Path(run_dir) / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return [int(r["epoch"]) for r in rows], [float(r["loss"]) for r in rows]


def _fingerprint_of_saved_model(run_dir):
    import keras

    import keras_vit  # noqa: F401  registers the layers
    from keras_vit.training.trainer import weights_fingerprint

    # compile=False: only the weights matter here (and the optimizer's WarmupDecay schedule
    # is registered by importing keras_vit.schedules, which `import keras_vit` does not do).
    model = keras.saving.load_model(Path(run_dir) / "model.keras", compile=False)
    return weights_fingerprint(model)


def _check_finished_run_folder(run_dir, replicas):
    """The folder holds exactly a finished run's files, and they are sound."""
    assert sorted(p.name for p in run_dir.iterdir()) == RUN_FILES
    config = json.loads((run_dir / "config.json").read_text())
    assert config["finished"] is True and config["replicas"] == replicas
    assert config["result"]["steps"] == 2 * config["steps_per_epoch"]
    epochs, loss = _history(run_dir)
    assert epochs == [0, 1]
    assert loss[1] < 0.95 * loss[0], loss  # it learns (healthy: ~2.1 -> ~1.8)
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(run_dir / "samples.npz") as samples:
        assert len(samples["test_images"]) == len(samples["test_labels"]) == 359
    return config


# ------------------------------------------------------------------ mirrored, 2 logical CPUs

def test_mirrored_on_two_logical_cpus(tmp_path):
    work = tmp_path / "work"  # the command's working directory: nothing else may appear there
    work.mkdir()
    out = work / "run"
    results, _ = _run_together([_command(out, "mirrored", "--cpu-devices", "2")], [_env()],
                               work, tmp_path)
    _check_ok(results)
    [(_, _, output)] = results
    start = _start_line(output)
    assert start.startswith(f"Starting run {out}:"), start
    assert "MirroredStrategy with 2 replica(s)" in start, start
    config = _check_finished_run_folder(out, replicas=2)
    assert config["strategy"] == "mirrored" and config["cpu_devices"] == 2
    summary = _summary(output)
    assert summary["run"] == str(out)
    assert abs(float(summary["test accuracy"]) - config["result"]["test_accuracy"]) < 1e-4
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    # The fingerprint printed and recorded is that of the saved model.
    assert summary["weights fingerprint"] == config["result"]["weights_fingerprint"]
    assert _fingerprint_of_saved_model(out) == summary["weights fingerprint"]
    assert sorted(p.name for p in work.iterdir()) == ["run"]


# ------------------------------------------------------------------ multi-worker, 2 processes

@pytest.fixture(scope="module")
def multi_worker_run(tmp_path_factory):
    """The same command as two workers of one cluster on 127.0.0.1, with the same --out.

    Returns (run_dir, work_dir, [(pid, output)] of workers 0 and 1, paths seen under the run
    folder while they ran). A port taken by another process between choosing and binding it
    gets one retry with new ports (and a new folder).
    """
    tmp = tmp_path_factory.mktemp("multi_worker")
    for attempt in range(2):
        work = tmp / f"work{attempt}"
        work.mkdir()
        out = work / "run"
        cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
        envs = [_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                           "task": {"type": "worker", "index": index}}))
                for index in range(2)]
        logs = tmp / f"logs{attempt}"
        logs.mkdir()
        # In micro-batches (auto keeps these tiny batches whole): the multi-worker step
        # sums each replica's parts before the all-reduce.
        results, seen = _run_together(
            [_command(out, "multi-worker", "--micro-batches", "2")] * 2, envs, work, logs,
            watch=out)
        port_clash = any(rc and ("Address already in use" in output or "Failed to bind" in output)
                         for _, rc, output in results)
        if not port_clash:
            break
    _check_ok(results)
    return out, work, [(pid, output) for pid, _, output in results], seen


def test_multi_worker_trains_together_and_only_the_chief_keeps_a_run(multi_worker_run):
    out, work, workers, seen = multi_worker_run
    (chief_pid, chief), (_, other) = workers
    for output in (chief, other):
        start = _start_line(output)
        assert f"run {out}:" in start and "2 replica(s)" in start, start
        assert start.endswith("2 micro-batches of 8 per replica"), start
        assert _summary(output)["run"] == str(out)
    assert _start_line(chief).startswith(f"Starting run {out}:")

    # The chief's run folder is complete and holds only the chief's files: worker 1 wrote
    # into its own folder under .worker_temp while it ran, and removed it at the end.
    config = _check_finished_run_folder(out, replicas=2)
    assert config["strategy"] == "multi-worker"
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and all(f".{chief_pid}." in p.name for p in events), (chief_pid, events)
    temp = ".worker_temp/worker-1"
    assert f"{temp}/history.csv" in seen and f"{temp}/logs" in seen, sorted(seen)
    assert not any(p.startswith(".worker_temp/worker-0") for p in seen), sorted(seen)
    assert sorted(p.name for p in work.iterdir()) == ["run"]  # nothing else, anywhere

    # Both report the same evaluation (all-reduced) as the chief's config.json.
    chief_summary, other_summary = _summary(chief), _summary(other)
    for key in ("test loss", "test accuracy"):
        assert chief_summary[key] == other_summary[key], (chief_summary, other_summary)
    assert abs(float(chief_summary["test accuracy"]) - config["result"]["test_accuracy"]) < 1e-4


def test_multi_worker_workers_end_with_the_chiefs_saved_weights(multi_worker_run):
    out, _, ((_, chief), (_, other)), _ = multi_worker_run
    chief_print = _summary(chief)["weights fingerprint"]
    other_print = _summary(other)["weights fingerprint"]
    assert chief_print == other_print, "the workers ended with different weights"
    config = json.loads((out / "config.json").read_text())
    assert config["result"]["weights_fingerprint"] == chief_print
    assert _fingerprint_of_saved_model(out) == chief_print


def test_weights_fingerprint_tells_weights_apart():
    import keras_vit
    from keras_vit.training.trainer import weights_fingerprint

    model = keras_vit.build("Ti/16", image_size=8, patch_size=4, depth=1, num_classes=3)
    before = weights_fingerprint(model)
    assert len(before) == 16 and int(before, 16) >= 0
    assert weights_fingerprint(model) == before
    kernel = model.trainable_weights[0]
    value = kernel.numpy()
    value.flat[0] = np.nextafter(value.flat[0], np.float32(np.inf))  # one ulp, one weight
    kernel.assign(value)
    assert weights_fingerprint(model) != before
