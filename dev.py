#!/usr/bin/env python3
"""Set-up and entry points for a fresh clone; needs only Python 3.10-3.12.

    python3 dev.py run [train flags]   # set up, then train + evaluate + export on the embedded data
    python3 dev.py test [pytest args]  # set up, then run the test suite

Set-up makes `.venv/` and installs this package with its test, TFLite, ONNX and TF Serving client extras;
it is skipped when `pyproject.toml` has not changed since the last install.
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


def set_up():
    if not (3, 10) <= sys.version_info[:2] <= (3, 12):
        sys.exit(f"keras-vit needs Python 3.10-3.12; this is {sys.version.split()[0]}.")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print(f"Creating {VENV} ...", flush=True)
        venv.create(VENV, with_pip=True)
    print("Installing keras-vit and its dependencies (first run takes a few minutes) ...",
          flush=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "-e", f"{ROOT}[test,tflite,onnx,serving]"], check=True)
    STAMP.write_text(wanted)


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("run", "test"):
        sys.exit(__doc__)
    command, args = sys.argv[1], sys.argv[2:]
    set_up()
    if command == "run":
        cmd = [str(BIN / "keras-vit"), "train", *args]
    else:
        cmd = [str(BIN / "python"), "-m", "pytest", *args]
    sys.exit(subprocess.call(cmd, cwd=ROOT))


if __name__ == "__main__":
    main()
