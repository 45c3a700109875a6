"""What the study scripts share: one `keras-vit train` run in a fresh process, kept."""

import json
import os
import subprocess
import sys
import time


def train_once(out, args, env=None):
    """Runs `keras-vit train --out OUT ARGS` in a fresh process (with `env` added to the
    environment) unless OUT already holds a finished run; returns its config.json, with the
    wall time of the process as "study_seconds". Exits with the command's error if it fails."""
    config_path = out / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("finished"):
        return json.loads(config_path.read_text())
    command = [sys.executable, "-m", "keras_vit.cli", "train", "--out", str(out), *args]
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    config = json.loads(config_path.read_text())
    config["study_seconds"] = round(time.time() - start, 1)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config
