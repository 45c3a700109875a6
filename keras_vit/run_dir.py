"""The run folder: what training leaves behind and export/predict read.

    runs/NAME/
      config.json     class names, image size, data spec, training flags
      model.keras     the trained model (inputs in [-1, 1], outputs logits)
      samples.npz     uint8 images at the model's size: calibration_images (training data, for
                      int8 calibration), test_images + test_labels (held out, for verification)
      history.csv, curves.png, logs/ (TensorBoard), backup/ (resumable state, until it ends)
"""

import dataclasses
import json
from pathlib import Path

import numpy as np

CONFIG_FILE = "config.json"
MODEL_FILE = "model.keras"
SAMPLES_FILE = "samples.npz"


@dataclasses.dataclass
class Run:
    path: Path
    config: dict
    model: object
    samples: dict

    @property
    def class_names(self):
        return list(self.config["class_names"])

    @property
    def image_size(self):
        return tuple(self.config["image_size"])


def write_config(run_dir, config):
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_run(run_dir, model, config, samples):
    """Writes config.json, model.keras and samples.npz into `run_dir`."""
    for key in ("class_names", "image_size"):
        if key not in config:
            raise ValueError(f"run config needs {key!r}")
    write_config(run_dir, config)
    model.save(Path(run_dir) / MODEL_FILE)
    np.savez_compressed(Path(run_dir) / SAMPLES_FILE,
                        **{k: np.asarray(v) for k, v in samples.items()})


def load_run(run_dir):
    """Loads a finished run; raises FileNotFoundError saying what is missing and why."""
    from keras_vit.model import load_model

    path = Path(run_dir)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} not found: {path} is not a finished keras-vit run. Train one with "
                f"`keras-vit train --out {path}` (a run that was interrupted resumes when started "
                "again with the same command).")
    config = json.loads((path / CONFIG_FILE).read_text())
    samples = {}
    if (path / SAMPLES_FILE).is_file():
        with np.load(path / SAMPLES_FILE, allow_pickle=False) as data:
            samples = {k: data[k] for k in data.files}
    model = load_model(path / MODEL_FILE)  # a run of keras-vit 0.1 too
    return Run(path, config, model, samples)
