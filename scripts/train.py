#!/usr/bin/env python3
"""Train a ViT: the same as `keras-vit train` (see `--help`)."""

import sys

from keras_vit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
