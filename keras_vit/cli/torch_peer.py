"""The PyTorch peer of `keras-vit benchmark-accelerator` as a process of its own:
`python -m keras_vit.cli.torch_peer --image-size ...` prints one JSON line
(`keras_vit.benchmarks.torch_peer.measure`)."""

import argparse
import json
import sys

from keras_vit.benchmarks import torch_peer


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=torch_peer.__doc__.splitlines()[0])
    for name in ("image-size", "patch-size", "width", "depth", "heads", "mlp-dim",
                 "num-classes", "batch-size", "steps", "repeats", "warmup"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--precision", required=True,
                        choices=["mixed_bfloat16", "mixed_float16", "float32"])
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(torch_peer.measure(arguments())))
    sys.stdout.flush()
