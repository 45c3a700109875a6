import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Under pytest-xdist, each worker (and every process it starts) sizes TensorFlow's thread
# pools to its share of the cores: with a pool per core in each of 2 workers on 2 cores, their
# threads spun against each other (measured, test_train.py and test_deit.py on 2 workers:
# 202 -> 184 s, CPU 352 -> 336 s).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    for _pool in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(_pool, str(max(1, (os.cpu_count() or 1) // _WORKERS)))
# Folder-scan verdicts (keras_vit.training.data.scan_cache_file) go to a fresh folder, not ~/.cache.
os.environ["KERAS_VIT_CACHE"] = tempfile.mkdtemp(prefix="keras_vit_cache_")
atexit.register(shutil.rmtree, os.environ["KERAS_VIT_CACHE"], ignore_errors=True)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import processes  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy_and_seed():
    """Every test starts from float32 and a fixed seed, whatever the one before it set."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


def randomize_weights(model, seed=0, scale=0.05):
    """Fills every weight with random values (the zero-initialised head too), so that
    comparisons exercise every parameter."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(0.0, scale, w.shape).astype(w.dtype))
    return model


def kill_at_a_mid_epoch_backup(command, out, env, timeout=400):
    """Starts the training `command` (writing the run folder `out`) and kills it with SIGKILL
    as soon as its backup is a mid-epoch one in the second epoch or later; fails the test if
    the command exits first or no such backup appears within `timeout` seconds."""
    import json
    import signal

    process = processes.Process(command, env=env, stderr=subprocess.STDOUT)
    metadata = Path(out) / "backup" / "training_metadata.json"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            state = {}
            if metadata.exists():
                try:
                    state = json.loads(metadata.read_text())
                except ValueError:  # caught while being written
                    pass
            if state.get("epoch", 0) >= 1 and state.get("batch", 0) > 0:
                break
            assert process.poll() is None, process.stdout[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("no mid-epoch backup appeared")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.remove_files()


def free_ports(n):
    """n TCP ports on 127.0.0.1 that were free a moment ago (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_processes(commands, envs, cwd, log_paths, *, timeout, grace, watch=None):
    """Runs the commands at once, each logging to its file; returns (processes, outputs, seen)
    when all have exited.

    Fails the test, with every log, when they take over `timeout` seconds, or when one is
    still running `grace` seconds after another one failed (a worker would wait for a dead
    peer's collectives until the time limit). `watch`: a folder polled while they run; `seen`
    is every path (relative to it) that existed there at some poll.
    """
    procs, seen = [], set()
    for command, env, log_path in zip(commands, envs, log_paths):
        # Files, not pipes: no process blocks on its output.
        procs.append(processes.Process(command, cwd=cwd, env=env, stdout=log_path,
                                       stderr=subprocess.STDOUT))
    deadline, failed_at, problem = time.monotonic() + timeout, None, None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() for p in procs):
                failed_at = now
            if now > deadline:
                problem = f"timed out after {timeout} s"
            elif failed_at is not None and now > failed_at + grace:
                problem = f"one process failed and the others were still running {grace} s later"
            if problem:
                break
            if watch is not None and Path(watch).exists():
                try:
                    seen.update(str(p.relative_to(watch)) for p in Path(watch).rglob("*"))
                except OSError:  # a file removed while listing
                    pass
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.remove_files()
    outputs = [Path(path).read_text(errors="replace") for path in log_paths]
    if problem:
        pytest.fail(f"{problem}:\n" + "\n".join(
            f"---- process {i} (last 4000 characters) ----\n{out[-4000:]}"
            for i, out in enumerate(outputs)))
    return procs, outputs, seen


def pytest_collection_modifyitems(items):
    """The slow tests first, those with the longest time limits first among them (a stable
    sort): under pytest-xdist the two workers then end on short tests together, instead of
    one waiting for a long test the other started last."""
    def order(item):
        limit = item.get_closest_marker("timeout")
        return item.get_closest_marker("slow") is None, -(limit.args[0] if limit else 0)

    items.sort(key=order)
