#!/usr/bin/env python3
"""Saves an attention-rollout overlay for an image: `python scripts/attention_map.py IMAGE`.

    python scripts/attention_map.py cat.jpg --variant B/16 --weights augreg_in21k_ft_in1k
    python scripts/attention_map.py cat.jpg --model run/model.keras --out cat_attention.png

The same as `keras-vit attention-map IMAGE ...` (see keras_vit/attention_map.py).
"""

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    command = importlib.import_module("keras_vit.attention_map")  # the module, not the function
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    command.add_arguments(parser)
    return command.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
