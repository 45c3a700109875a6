#!/usr/bin/env python3
"""Same as `keras-vit export ...`: SavedModel (TF Serving) + TFLite (+ ONNX) files of a run.

    python scripts/export.py runs/digits --out exported/digits
"""

import sys

from keras_vit.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
