"""tests/processes.py: a process forked from the warm server behaves as a fresh interpreter
would for what the tests rely on (its own pid, environment, working directory, argv, output,
exit code, random seeds; killed with SIGKILL like any process), and a command that must not
be forked is not."""

import json
import os
import signal
import subprocess
import sys
import time

from tests import processes

CODE = """
import json, os, random, sys
import numpy as np
print(json.dumps(dict(pid=os.getpid(), cwd=os.getcwd(), argv=sys.argv,
                      marker=os.environ.get("KERAS_VIT_TEST_MARKER"),
                      tensorflow="tensorflow" in sys.modules,
                      draws=[random.random(), float(np.random.random())])))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def test_a_forked_process_has_its_own_environment_folder_output_and_exit_code(tmp_path):
    env = {**os.environ, "KERAS_VIT_TEST_MARKER": "one"}
    forked = [processes.run([sys.executable, "-c", CODE, str(code)], env=env, cwd=tmp_path,
                            timeout=120) for code in (0, 3)]
    fresh = processes.run([sys.executable, "-c", CODE, "0"], env=env, cwd=tmp_path,
                          timeout=120, fresh=True)
    reports = [json.loads(r.stdout) for r in (*forked, fresh)]
    assert [r.returncode for r in (*forked, fresh)] == [0, 3, 0]
    assert all(r.stderr == "to stderr\n" for r in (*forked, fresh))
    for report, code in zip(reports, ("0", "3", "0")):
        assert report["cwd"] == str(tmp_path) and report["argv"] == ["-c", code]
        assert report["marker"] == "one" and report["pid"] != os.getpid()
    # Forked: TensorFlow was imported before the fork; fresh: not by this code.
    assert [r["tensorflow"] for r in reports] == [True, True, False]
    # Each child draws its own random numbers, as fresh interpreters do.
    assert reports[0]["draws"][0] != reports[1]["draws"][0]
    assert reports[0]["draws"][1] != reports[1]["draws"][1]


def test_a_killed_process_ends_and_an_import_time_setting_starts_fresh(tmp_path):
    process = processes.Process([sys.executable, "-c", "import time; time.sleep(600)"],
                                stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        assert process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        process.kill()
        process.remove_files()
    # KERAS_BACKEND is read when Keras is imported: such a command is not forked.
    code = "import sys; print('keras' in sys.modules)"
    jax = processes.run([sys.executable, "-c", code], timeout=120,
                        env={**os.environ, "KERAS_BACKEND": "jax"})
    same = processes.run([sys.executable, "-c", code], timeout=120)
    assert (jax.stdout.strip(), same.stdout.strip()) == ("False", "True")
