"""Python processes for the tests, started from an interpreter that has already imported
TensorFlow, Keras and keras-vit (a fork server, `serve`), instead of a fresh one.

Most of the suite's processes are tiny training runs, exports and loads whose behaviour is the
point (a run killed and resumed, a file loaded outside the process that wrote it, devices and
collectives set up before TensorFlow starts): each fresh interpreter spends ~6 s of CPU
importing TensorFlow and Keras before it does any of that, a third of the suite's CPU. A fork
of the warm server is a separate process with its own pid, memory, working directory,
environment, stdout, stderr and exit code; TensorFlow's runtime (devices, threads, collectives)
starts in it as in a fresh one, since the server only imported modules.

What a fork does not give: a fresh interpreter's start-up (imports, the CLI's start-up checks)
and its own hash seed. Tests of those pass `fresh=True` (the CLI's start-up tests, and the
never-killed reference runs of the determinism tests, so that an order that depends on the
hash seed still shows), and so does any command whose environment differs from the server's
in a variable that is read at import (the JAX and torch backends, logging levels).
"""

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the server imports once; a child imports anything else itself.
PRELOAD = ["numpy", "tensorflow", "keras", "keras_vit", "keras_vit.cli", "keras_vit.cli.train",
           "keras_vit.training.trainer", "keras_vit.training.data", "keras_vit.export"]
# Read when TensorFlow, Keras or NumPy is imported (or by the interpreter at start-up): a
# process that sets one of them differently starts fresh.
# (PYTHONPATH is not among them: a child puts its entries in front of sys.path. Devices, e.g.
# CUDA_VISIBLE_DEVICES, are looked up when TensorFlow's runtime starts, in the child.)
IMPORT_TIME = ("KERAS_BACKEND", "KERAS_HOME", "TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL",
               "TF_ENABLE_ONEDNN_OPTS", "TF_USE_LEGACY_KERAS", "XLA_FLAGS", "PYTHONHASHSEED",
               "PYTHONWARNINGS", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
               "OMP_NUM_THREADS")


def serve():
    """The server: imports PRELOAD, then forks a child for each request (a JSON line on
    stdin), answers its pid on stdout, and writes its exit code to the request's status file
    when it ends. Ends when stdin closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    print("ready", flush=True)
    status_files = {}
    while True:
        # One request at a time (its caller waits for the pid), so no second line can sit in
        # stdin's buffer unseen by select.
        ready, _, _ = select.select([sys.stdin], [], [], 0.05)
        if ready:
            line = sys.stdin.readline()
            if not line:
                return
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(**request)
            status_files[pid] = request["status"]
            print(pid, flush=True)
        while status_files:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            path = status_files.pop(pid)
            if not os.path.exists(path):  # killed: it could not say
                try:
                    _write_status(path, os.waitstatus_to_exitcode(status))
                except OSError:  # its caller is gone and took the folder with it
                    pass


def _write_status(path, code):
    Path(path + ".part").write_text(str(code))
    os.replace(path + ".part", path)


def _child(command, env, cwd, stdout, stderr, status):
    """Runs `command` ([python, -m module | -c code | script, *args]) as the interpreter
    would, in this forked process; writes its exit code to `status`."""
    import random

    import numpy as np

    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    err = out if stderr == stdout else os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdin = open(os.devnull)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # A fresh interpreter seeds these from the system: so does each fork.
    random.seed()
    np.random.seed()
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    mode, rest = command[1], command[2:]
    code = 0
    try:
        import runpy
        if mode == "-m":
            sys.argv = [mode, *rest[1:]]
            sys.path.insert(0, cwd)
            runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
        elif mode == "-c":
            sys.argv = ["-c", *rest[1:]]
            sys.path.insert(0, "")
            exec(compile(rest[0], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = [mode, *rest]
            sys.path.insert(0, os.path.dirname(os.path.abspath(mode)))
            runpy.run_path(mode, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # as at an interpreter's exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    _write_status(status, code)
    os._exit(code)


_server = None
_server_env = None
_lock = threading.Lock()


def _request(**request):
    """Starts the server on first use (with this process's environment; OpenBLAS kept to one
    thread, so that the server has no thread besides its main one when it forks) and asks
    it for a child; returns the child's pid."""
    global _server, _server_env
    with _lock:
        if _server is None or _server.poll() is not None:
            _server_env = dict(os.environ)
            _server = subprocess.Popen(
                [sys.executable, "-c", "from tests.processes import serve; serve()"],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={**os.environ, "OPENBLAS_NUM_THREADS": "1",
                     "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                 os.environ.get("PYTHONPATH")]))})
            atexit.register(_server.stdin.close)
            if _server.stdout.readline().strip() != "ready":
                raise RuntimeError("the test process server did not start")
        _server.stdin.write(json.dumps(request) + "\n")
        _server.stdin.flush()
        return int(_server.stdout.readline())


def _forkable(command, env, fresh):
    if fresh or len(command) < 2 or command[0] != sys.executable:
        return False
    if command[1].startswith("-") and command[1] not in ("-m", "-c"):
        return False  # interpreter options
    server = _server_env if _server_env is not None else os.environ
    return all(env.get(name) == server.get(name) for name in IMPORT_TIME)


class Process:
    """What the tests use of subprocess.Popen: pid, poll(), wait(), kill(), returncode, and
    the output as text once it ended (stdout, stderr; stderr is None when merged into
    stdout). `stdout`, `stderr`: file paths (stderr may be subprocess.STDOUT)."""

    def __init__(self, command, *, env=None, cwd=None, stdout=None, stderr=None, fresh=False):
        env = dict(os.environ if env is None else env)
        cwd = str(cwd or os.getcwd())
        self._folder = Path(tempfile.mkdtemp(prefix="keras_vit_test_process_"))
        self._stdout = Path(stdout) if stdout else self._folder / "stdout"
        self.merged = stderr is subprocess.STDOUT
        self._stderr = (self._stdout if self.merged
                        else Path(stderr) if stderr else self._folder / "stderr")
        self._stdout.write_bytes(b"")
        self._stderr.write_bytes(b"")
        self.args, self.returncode = command, None
        if _forkable(command, env, fresh):
            self._status = self._folder / "status"
            self._popen = None
            self.pid = _request(command=list(command), env=env, cwd=cwd,
                                stdout=str(self._stdout), stderr=str(self._stderr),
                                status=str(self._status))
        else:
            with open(self._stdout, "ab") as out, open(self._stderr, "ab") as err:
                self._popen = subprocess.Popen(command, env=env, cwd=cwd,
                                               stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=out if self.merged else err)
            self.pid = self._popen.pid

    def poll(self):
        if self.returncode is None:
            if self._popen is not None:
                self.returncode = self._popen.poll()
            elif self._status.exists():
                self.returncode = int(self._status.read_text())
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def kill(self):
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @property
    def stdout(self):
        return self._stdout.read_text(errors="replace")

    @property
    def stderr(self):
        return None if self.merged else self._stderr.read_text(errors="replace")

    def remove_files(self):
        """Removes the output files this object made itself (not those it was given)."""
        import shutil
        shutil.rmtree(self._folder, ignore_errors=True)


def run(command, *, env=None, cwd=None, timeout=None, fresh=False):
    """subprocess.run(command, capture_output=True, text=True, ...) for Python commands,
    forked from the warm server unless `fresh` or not `_forkable`."""
    process = Process(command, env=env, cwd=cwd, fresh=fresh)
    try:
        process.wait(timeout)
    finally:
        process.kill()
        process.wait()
    try:
        return subprocess.CompletedProcess(command, process.returncode, process.stdout,
                                           process.stderr)
    finally:
        process.remove_files()
