"""`keras-vit predict MODEL IMAGES...`: top-5 classes from any exported or trained model.

MODEL is one of
  exported/NAME/1             a SavedModel (its serving_default signature decodes the files)
  exported/NAME               the newest SavedModel version inside
  exported/NAME/NAME_int8.tflite (or any .tflite), run with the LiteRT runtime
  runs/NAME/model.keras       a Keras model (or the run folder runs/NAME)
  exported/NAME/NAME.onnx     with onnxruntime installed (the `onnx` extra)
IMAGES are JPEG, PNG, BMP or GIF files, or folders of them (searched recursively).
Class names come from the model (SavedModel, TFLite metadata), labels.txt beside the file, the
run's config.json, or --labels.
"""

import json
import sys

from keras_vit.cli._common import describe_failure, error, positive_int


def add_arguments(parser):
    parser.add_argument("model", help="SavedModel folder (exported/NAME/1 or exported/NAME), "
                                      ".tflite, .keras or .onnx file, or a run folder")
    parser.add_argument("images", nargs="+",
                        help="JPEG/PNG/BMP/GIF files or folders of them")
    parser.add_argument("--top-k", type=positive_int, default=5, help="classes to print (default: 5)")
    parser.add_argument("--labels", help="class names, one a line (default: labels.txt beside "
                                         "the model, or the run's config.json)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--json", action="store_true", help="print JSON lines instead")
    parser.epilog = ("Files that are not readable images are named on stderr and the others "
                     "predicted. Exit status: 0 all predicted, 1 some files skipped, 2 nothing "
                     "predicted.")


def run(args):
    """Exit status 0: every image predicted; 1: some files could not be read (named on
    stderr; the others were predicted); 2: nothing predicted (bad arguments or model)."""
    from keras_vit.errors import KerasViTError, NotAnImageError
    from keras_vit.images import read_image_file
    from keras_vit.predict import Predictor, collect_images

    try:
        paths = collect_images(args.images)
    except (FileNotFoundError, NotAnImageError) as e:  # a wrong argument: nothing runs
        error("predict", e)
        return 2
    errors, decoded = {}, {}  # by position in paths: why unreadable / read_image's result
    for i, path in enumerate(paths):
        try:  # every file is read before the model loads
            decoded[i] = read_image_file(path)
        except (NotAnImageError, OSError) as e:  # one damaged photo spoils no other
            errors[i] = str(e)
    try:
        if not decoded:
            raise NotAnImageError("no image could be read:\n  " + "\n  ".join(errors.values()))
        predictor = Predictor(args.model, labels=args.labels)
        top = dict(zip(decoded, predictor.predict_decoded(
            list(decoded.values()), top_k=args.top_k, batch_size=args.batch_size)))
    except (KerasViTError, OSError, ValueError, ImportError) as e:
        _print_errors(args, paths, errors)
        error("predict", e)
        return 2
    except Exception as e:  # noqa: BLE001 - TensorFlow's own errors: one line, not a trace
        import tensorflow as tf

        if not isinstance(e, tf.errors.OpError):
            raise
        _print_errors(args, paths, errors)
        error("predict", describe_failure(e))
        return 2
    if not args.json:
        print(f"{predictor.model_path} ({predictor.describe()})")
    for i, path in enumerate(paths):
        if args.json:
            print(json.dumps({"image": str(path), "error": errors[i]} if i in errors else
                             {"image": str(path),
                              "top_k": [{"label": lab, "score": s} for lab, s in top[i]]}))
        elif i in top:
            print(f"\n{path}")
            width = max(len(lab) for lab, _ in top[i])
            for rank, (label, score) in enumerate(top[i], 1):
                print(f"  {rank}. {label:<{width}}  {100 * score:6.2f}%")
    for message in errors.values():
        print(f"keras-vit predict: skipped {message}", file=sys.stderr)
    if errors:
        print(f"keras-vit predict: {len(errors)} of {len(paths)} files could not be read "
              "(above); the others were predicted.", file=sys.stderr)
        return 1
    return 0


def _print_errors(args, paths, errors):
    if args.json:  # unreadable files still get their lines
        for i, message in errors.items():
            print(json.dumps({"image": str(paths[i]), "error": message}))
