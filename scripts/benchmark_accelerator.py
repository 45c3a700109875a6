#!/usr/bin/env python3
"""Training throughput and MFU on the accelerator Keras runs on: the same as
`keras-vit benchmark-accelerator` (see `--help`). Needs no TensorFlow, so it runs from a
checkout on a machine with Keras on JAX: `PYTHONPATH=. python3 scripts/benchmark_accelerator.py`."""

import importlib.util
import os
import sys

# Keras defaults to TensorFlow, which GPU machines with only JAX (or PyTorch) lack: pick the
# backend that is there before keras_vit imports Keras.
if "KERAS_BACKEND" not in os.environ and not importlib.util.find_spec("tensorflow"):
    backend = next((b for b in ("jax", "torch") if importlib.util.find_spec(b)), None)
    if backend:
        os.environ["KERAS_BACKEND"] = backend

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_vit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["benchmark-accelerator", *sys.argv[1:]], as_program=True))
