"""`keras-vit benchmark`: images/second and latency of keras-vit against the peers installed
here, interleaved in one process (the rows: keras_vit.benchmarks.cpu)."""

from keras_vit.benchmarks.cpu import PEERS, ROWS, TRAIN  # (no TensorFlow import)
from keras_vit.cli._common import error


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="a short run (Ti/16 inference, training, RandAugment, bf16, TFLite, "
                             "B/16 memory; few repetitions): about 8 minutes on 2 idle cores")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated rows among {','.join(ROWS)} (default: all)")
    parser.add_argument("--variants", default=None,
                        help="inference variants, comma-separated (default Ti/16,S/16,B/16; "
                             "--quick: Ti/16)")
    parser.add_argument("--batch-sizes", default="1,16", help="inference batch sizes (default 1,16)")
    parser.add_argument("--image-size", type=int, default=224, help="inference image size")
    parser.add_argument("--depth", type=int, default=None,
                        help="override the encoder depth of every model (for smoke tests)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"peers to compare with, among {','.join(PEERS)} ('' for none)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed interleaved rounds per row (default 15; --quick 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after compiling")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="steps per timed model.fit call (default 8; --quick 4)")
    parser.add_argument("--train-batch-size", type=int, default=128)
    parser.add_argument("--train-image-size", type=int, default=TRAIN["image_size"])
    parser.add_argument("--bf16-variant", default=None,
                        help="variant of the bfloat16 row (default: the last of --variants)")
    parser.add_argument("--tflite-variant", default=None,
                        help="variant of the TFLite row (default: the last of --variants)")
    parser.add_argument("--memory-variant", default="B/16")
    parser.add_argument("--memory-batch-size", type=int, default=16)
    parser.add_argument("--keras-vit-graph", action="store_true",
                        help="run keras-vit inference as a TensorFlow graph (oneDNN kernels) "
                             "instead of XLA-compiled; the peers always run as the table says")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def run(args):
    from keras_vit.benchmarks.cpu import run_benchmark

    try:
        table, header = run_benchmark(args)
    except (ValueError, ImportError, RuntimeError) as err:
        error("benchmark", err)
        return 2
    print(table.format(header))
    return 0
