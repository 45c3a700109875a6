"""`keras-vit COMMAND ...`: one entry point; each command lives in its own module.

A command module provides `add_arguments(parser)` and `run(args) -> int`; it is
imported only when its command runs, so `keras-vit --help` stays fast.
"""

import argparse
import importlib
import sys

COMMANDS = {
    "variants": ("keras_vit.variants_cli", "list the ViT variants with sizes and parameter counts"),
    "train": ("keras_vit.train", "train (and evaluate, export) a ViT under a tf.distribute strategy"),
    "export": ("keras_vit.export", "export a run's model to SavedModel (TF Serving) and TFLite"),
    "predict": ("keras_vit.predict", "top-5 predictions from a SavedModel, .tflite or .keras file"),
    "benchmark": ("keras_vit.benchmark", "images/second against the peers installed here"),
    "benchmark-accelerator": ("keras_vit.benchmark_accelerator",
                              "training img/s and MFU on a GPU/TPU (any backend, e.g. JAX)"),
    "attention-map": ("keras_vit.attention_map", "save an attention-rollout overlay for an image"),
}


def positive_int(text):
    """argparse type for counts (epochs, batch size, top-k, ...): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _usage():
    lines = ["usage: keras-vit COMMAND [options]   (keras-vit COMMAND --help for its options)",
             "", "commands:"]
    lines += [f"  {name:<22} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"keras-vit: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"keras-vit {argv[0]}", description=help_)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv[1:])) or 0


if __name__ == "__main__":
    sys.exit(main())
