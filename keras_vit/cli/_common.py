"""What every command shares: argument types, the terminal's logging, errors as one line, and
TensorFlow's start-up chatter kept off the screen. Imports nothing heavy."""

import argparse
import logging
import os
import re
import subprocess
import sys
import warnings

# Lines TensorFlow and its CUDA stubs print at start-up on every machine, GPU or not. Only these
# are dropped: any other line on stderr, a crash's included, passes.
_CHATTER = (r"failed call to cuInit|Could not find cuda drivers|absl::InitializeLog\(\)|"
            r"oneDNN custom operations are on|This TensorFlow binary is optimized|"
            r"rebuild TensorFlow with the appropriate compiler flags|"
            r"Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|"
            r"TF-TRT Warning: Could not find TensorRT|cuda_executor.*(NUMA|kernel driver)|"
            r"Skipping the delay kernel")
_FILTER = """
import re, sys
chatter = re.compile(sys.argv[1].encode())
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not chatter.search(line):
        out.write(line)
        out.flush()
"""


def positive_int(text):
    """argparse type for counts (epochs, batch size, top-k, ...): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def finite_float(text):
    """argparse type for rates and fractions: a finite number (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def wants_tensorflow_logs(argv):
    """A bare `--verbose` (without a level) anywhere shows TensorFlow's own start-up lines."""
    return any(arg == "--verbose" and (i + 1 >= len(argv) or not argv[i + 1].isdigit())
               for i, arg in enumerate(argv))


def quiet_tensorflow():
    """Keeps TensorFlow's start-up chatter (absl banner, oneDNN notice, CUDA probes on machines
    without a GPU) off the terminal: its C++ info and warning levels are off, and this
    process's stderr goes through a small filter process that drops only the known lines.
    The filter outlives this process, so what a crash prints still shows."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        sys.stderr.flush()
        original = os.dup(2)
        read, write = os.pipe()
        child = subprocess.Popen([sys.executable, "-S", "-c", _FILTER, _CHATTER], stdin=read,
                                 stdout=original, stderr=original, close_fds=True)
    except OSError:
        return  # no filter: the chatter shows, nothing else changes
    os.close(read)
    os.dup2(write, 2)
    os.close(write)

    def restore():
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(original, 2)  # the pipe's last writer closes: the filter drains and ends
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()

    import atexit

    atexit.register(restore)


class _TerminalHandler(logging.Handler):
    """Progress to stdout as it is; warnings and errors to stderr, marked."""

    def emit(self, record):
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                sys.stderr.write(f"Warning: {message}\n")
                sys.stderr.flush()
            else:
                sys.stdout.write(message + "\n")
                sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def show_library_output(quiet=False):
    """Sends keras-vit's log messages to the terminal (INFO to stdout, WARNING+ to stderr) and
    shows keras-vit's Python warnings as one line each, until the returned function is called.
    `quiet`: warnings and errors only."""
    logger = logging.getLogger("keras_vit")
    saved = (list(logger.handlers), logger.level, logger.propagate, warnings.showwarning)
    handler = _TerminalHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "keras_vit" in str(filename) or category.__module__.startswith("keras_vit"):
            sys.stderr.write(f"Warning: {message}\n")
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show

    def restore():
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
        warnings.showwarning = saved[3]

    return restore


def error(command, message):
    """Prints `keras-vit COMMAND: error: MESSAGE` (first paragraph kept whole) to stderr."""
    print(f"keras-vit {command}: error: {str(message).strip()}", file=sys.stderr)


def describe_failure(err):
    """An exception from a library we call (TensorFlow's op errors) in one line of our words."""
    text = getattr(err, "message", None) or str(err)
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    first = re.sub(r"\{\{function_node [^}]*\}\}", "", first).strip()
    return (f"{type(err).__name__}: {first}. This looks like a bug in keras-vit: run the "
            "command again with --verbose and report what it prints.")
