#!/usr/bin/env python3
"""Set-up and entry points for a fresh clone; needs only Python 3.11-3.12.

    python3 dev.py run [train flags]   # set up, then train + evaluate + export on the embedded data
    python3 dev.py test [pytest args]  # set up, then run the test suite

Set-up makes `.venv/` and installs this package with its test, TFLite, ONNX, TF Serving client,
MediaPipe and keras-cv extras; it is skipped when `pyproject.toml` has not changed since the last
install.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".keras-vit-installed"


EXTRAS = "test,tflite,onnx,serving,mediapipe,keras-cv"


def _has_pip(python):
    return subprocess.run([str(python), "-m", "pip", "--version"],
                          capture_output=True).returncode == 0


def set_up():
    # Keras 3.15 and keras-hub 0.32 need Python 3.11 or later; TensorFlow 2.21 has no 3.13 build.
    if not (3, 11) <= sys.version_info[:2] <= (3, 12):
        sys.exit(f"keras-vit needs Python 3.11-3.12; this is {sys.version.split()[0]}.")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + sys.version.encode()
                            + EXTRAS.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists() or not _has_pip(BIN / "python"):
        # A .venv whose creation failed half-way (no pip) is made again, not reused.
        print(f"Creating {VENV} ...", flush=True)
        try:
            import ensurepip  # noqa: F401  (Debian/Ubuntu ship it separately)
        except ImportError:
            sys.exit("This Python cannot make virtual environments with pip: install the "
                     "venv package (e.g. `sudo apt install python3-venv`), then run again.")
        venv.create(VENV, with_pip=True, clear=True)
    print("Installing keras-vit and its dependencies (first run takes a few minutes) ...",
          flush=True)
    result = subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--quiet",
                             "--disable-pip-version-check", "-e", f"{ROOT}[{EXTRAS}]"])
    if result.returncode:
        sys.exit(f"Installing the dependencies failed (pip exit code {result.returncode}, "
                 "its messages above); fix the cause and run the same command again.")
    STAMP.write_text(wanted)


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("run", "test"):
        sys.exit(__doc__)
    command, args = sys.argv[1], sys.argv[2:]
    set_up()
    if command == "run":
        cmd = [str(BIN / "keras-vit"), "train", *args]
    else:
        # Both cores (pytest-xdist): many tests wait on processes, imports and compilers.
        # loadscope: a module's tests run on one worker, so that a module-scoped fixture (a
        # trained run, a two-worker cluster's run) is made once, not once per worker; in the
        # order tests/conftest.py collects them (slow first, longest time limits first), not by
        # their number of tests.
        workers = ([] if any(a.startswith(("-n", "--numprocesses", "--dist")) for a in args)
                   else ["-n", "2", "--dist", "loadscope", "--no-loadscope-reorder"])
        cmd = [str(BIN / "python"), "-m", "pytest", *workers, *args]
    sys.exit(subprocess.call(cmd, cwd=ROOT))


if __name__ == "__main__":
    main()
