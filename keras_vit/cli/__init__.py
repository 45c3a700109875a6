"""`keras-vit COMMAND ...`: the command line, a thin shell over the library.

Each command is a module of this package with `add_arguments(parser)` and `run(args) -> int`;
it is imported only when its command runs, and imports the library (TensorFlow) only inside
`run`, so `keras-vit --help` and `keras-vit COMMAND --help` answer at once. Library errors
become one line and an exit status here; nothing else in keras-vit prints or exits.
"""

import argparse
import importlib
import sys

from keras_vit.cli._common import positive_int  # noqa: F401  (commands' argument type)

COMMANDS = {
    "train": ("train", "train (and evaluate, export) a ViT under a tf.distribute strategy"),
    "export": ("export", "export a run or a .keras model to SavedModel, TFLite (and ONNX), "
                         "verified"),
    "predict": ("predict", "top-5 predictions from a SavedModel, .tflite, .onnx or .keras file"),
    "attention-map": ("attention_map", "attention-rollout pictures for images"),
    "variants": ("variants", "list the ViT variants with sizes and parameter counts"),
    "benchmark": ("benchmark", "images/second against the peers installed here (CPU)"),
    "benchmark-accelerator": ("benchmark_accelerator",
                              "training img/s and MFU on a GPU/TPU (any backend, e.g. JAX)"),
}


def _usage():
    lines = ["usage: keras-vit [--verbose] COMMAND [options]   "
             "(keras-vit COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<22} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "--verbose (no level) also shows TensorFlow's own start-up messages."]
    return "\n".join(lines)


def main(argv=None, *, as_program=None):
    """Runs a command; returns its exit status. As a program (`argv` None: the `keras-vit`
    command; the scripts say so) it also keeps TensorFlow's start-up chatter off the
    terminal, which in-process callers (tests) keep as it is."""
    from keras_vit.cli import _common

    as_program = argv is None if as_program is None else as_program
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = _common.wants_tensorflow_logs(argv)
    if argv and argv[0] == "--verbose":
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"keras-vit: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[argv[0]]
    command = importlib.import_module(f"keras_vit.cli.{module_name}")
    parser = argparse.ArgumentParser(prog=f"keras-vit {argv[0]}", description=help_)
    command.add_arguments(parser)
    args = parser.parse_args(argv[1:])  # --help and usage errors exit here, before any import
    if as_program and not verbose:
        _common.quiet_tensorflow()
    restore = _common.show_library_output(quiet=getattr(args, "quiet", False))
    try:
        return command.run(args) or 0
    except KeyboardInterrupt:
        print(f"keras-vit {argv[0]}: interrupted.", file=sys.stderr)
        return 130
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
