#!/usr/bin/env python3
"""Same as `keras-vit predict ...`: top-5 classes from a SavedModel, .tflite, .keras or .onnx.

    python scripts/predict.py exported/digits/1 photo.jpg another.png
"""

import sys

from keras_vit.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
