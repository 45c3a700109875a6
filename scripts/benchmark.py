#!/usr/bin/env python3
"""Benchmark keras-vit against the peers installed here: the same as `keras-vit benchmark`
(see `--help`; `--quick` for a short run)."""

import sys

from keras_vit.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
