"""The command line answers at once and shows only what matters: help without TensorFlow,
no TensorFlow start-up chatter (unless --verbose), and a crash's output still shown."""

import os
import subprocess
import sys
import time

import pytest

COMMANDS = ("train", "export", "predict", "attention-map", "variants", "benchmark",
            "benchmark-accelerator")
CHATTER = ("cuInit", "Could not find cuda drivers", "absl::InitializeLog", "oneDNN custom",
           "cpu_feature_guard")


def run(args, env=None, timeout=120):
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "keras_vit.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=environment)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_answers_at_once_without_importing_tensorflow(command):
    args = ["--help"] if command is None else [command, "--help"]
    code = ("import sys, time; start = time.perf_counter()\n"
            "from keras_vit.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', "
            "'jax', 'torch'})\n"
            "print('heavy:', heavy, 'seconds:', time.perf_counter() - start)")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            timeout=60)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "usage: keras-vit" in result.stdout
    assert "heavy: []" in result.stdout  # nothing heavy imported for help
    assert wall < 3.0, f"{wall:.1f} s for {args}"  # generous: about 0.1 s on 2 cores


@pytest.mark.slow
def test_no_tensorflow_chatter_but_errors_show(tmp_path):
    # A command that starts TensorFlow and then fails: its one line, nothing else.
    result = run(["export", str(tmp_path / "missing.keras")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"keras-vit export: error: {tmp_path / 'missing.keras'}: no such file. Give "
                     "a .keras file or a run folder (runs/NAME)."], result.stderr
    # What the chatter would have been here, and --verbose bringing it back.
    raw = subprocess.run([sys.executable, "-c", "import tensorflow as tf; "
                          "tf.config.list_physical_devices('GPU')"], capture_output=True,
                         text=True, timeout=120, env={"PATH": os.environ.get("PATH", "")})
    chatter = [line for line in raw.stderr.splitlines() if any(c in line for c in CHATTER)]
    verbose = run(["--verbose", "export", str(tmp_path / "missing.keras")])
    assert verbose.returncode == 2
    assert "keras-vit export: error:" in verbose.stderr
    if chatter:  # a machine without a GPU: TensorFlow's lines are there with --verbose
        assert any(c in verbose.stderr for c in CHATTER), verbose.stderr


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["raise", "abort"])
def test_a_crash_while_tensorflow_starts_still_shows(tmp_path, failure):
    # A broken TensorFlow: what it printed and the failure itself reach the terminal, whether
    # it raises or kills the process.
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    ending = ("raise ImportError('broken tensorflow build')" if failure == "raise"
              else "os.abort()")
    (fake / "__init__.py").write_text(
        "import os, sys\nsys.stderr.write('fake tensorflow: cannot load libtensorflow.so\\n')\n"
        "sys.stderr.flush()\n" + ending + "\n")
    env = {"PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "KERAS_BACKEND": "tensorflow"}
    (tmp_path / "m.keras").write_bytes(b"PK")
    result = run(["export", str(tmp_path / "m.keras")], env=env)
    assert result.returncode != 0
    assert "fake tensorflow: cannot load libtensorflow.so" in result.stderr
    if failure == "raise":
        assert "broken tensorflow build" in result.stderr
