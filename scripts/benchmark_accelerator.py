#!/usr/bin/env python3
"""Training throughput and MFU on the accelerator Keras runs on: the same as
`keras-vit benchmark-accelerator` (see `--help`). Needs no TensorFlow, so it runs from a
checkout on a machine with Keras on JAX: `KERAS_BACKEND=jax PYTHONPATH=. python3 scripts/...`."""

import sys

from keras_vit.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark-accelerator", *sys.argv[1:]]))
