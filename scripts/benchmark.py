#!/usr/bin/env python3
"""Speed against the peers: the same as `keras-vit benchmark` (see `--help`)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_vit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]], as_program=True))
