#!/usr/bin/env python3
"""Export a run or a .keras model: the same as `keras-vit export` (see `--help`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_vit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]], as_program=True))
