"""`keras-vit export MODEL --out exported/NAME`: deployable files, each verified.

MODEL is a finished run folder (runs/NAME: it keeps held-out and calibration images) or a
`.keras` file (class names from --labels; images to verify and calibrate on from --images).
Exit status: 0 exported and verified; 1 exported files disagree with the Keras model (nothing
published); 2 could not export (the message says why).
"""

from pathlib import Path

from keras_vit.cli._common import describe_failure, error, positive_int

FORMATS = ("savedmodel", "tflite", "onnx")
TFLITE_VARIANTS = ("float32", "float16", "dynamic_int8", "int8")


def add_arguments(parser):
    parser.add_argument("model", help="a finished run folder (config.json, model.keras, "
                                      "samples.npz), e.g. runs/digits, or a .keras file")
    parser.add_argument("--out", help="output folder, e.g. exported/digits "
                                      "(default: exported/<model name>)")
    parser.add_argument("--labels", help="class names, one a line, in output order (for a "
                                         ".keras file; default class_0, class_1, ...)")
    parser.add_argument("--images", help="a folder of images (or class folders) to verify on "
                                         "and calibrate int8 with (for a .keras file; default: "
                                         "images made here, and no int8 file)")
    parser.add_argument("--normalization", choices=["vit", "imagenet", "none"],
                        help="how a .keras model that is not a keras-vit ViT takes its input: "
                             "vit ([-1, 1], as keras_vit.preprocess; the default), imagenet, "
                             "none (it scales 0..255 pixels itself)")
    parser.add_argument("--name", help="file-name stem of the TFLite/ONNX files "
                                       "(default: the --out folder's name)")
    parser.add_argument("--version", type=positive_int, default=1,
                        help="TF Serving version folder of the SavedModel (default: 1)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS,
                        default=["savedmodel", "tflite"],
                        help="what to write (default: savedmodel tflite)")
    parser.add_argument("--tflite-variants", nargs="+", choices=TFLITE_VARIANTS,
                        default=list(TFLITE_VARIANTS),
                        help="TFLite files to write (default: all four)")
    parser.add_argument("--top-k", type=positive_int, default=5,
                        help="classes in the SavedModel's top_k_* outputs (default: 5)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip comparing the files with the Keras model (not recommended)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the report (table and notes)")


def run(args):
    from keras_vit import errors
    from keras_vit.export import export_model, export_run, format_report

    model_path = Path(args.model)
    out = args.out or str(Path("exported") / (model_path.stem if model_path.suffix == ".keras"
                                               else model_path.resolve().name))
    options = dict(name=args.name, version=args.version, formats=tuple(args.formats),
                   tflite_variants=tuple(args.tflite_variants), top_k=args.top_k,
                   verify=not args.no_verify)
    if Path(out).exists() and not Path(out).is_dir():
        error("export", f"--out {out} is a file: give a folder to export into (it is created "
                        "if missing).")
        return 2
    try:
        if model_path.suffix == ".keras" or model_path.is_file():
            report = export_model(**_keras_file(args, model_path), **options, out_dir=out)
        else:
            for flag in ("labels", "images", "normalization"):
                if getattr(args, flag):
                    raise ValueError(f"--{flag} is for a .keras file; a run folder has its "
                                     "class names and images.")
            report = export_run(args.model, out, **options)
    except errors.ExportVerificationError as err:  # exported, but not the Keras model's answers
        error("export", err)
        return 1
    except (errors.KerasViTError, OSError, ValueError, ImportError, RuntimeError) as err:
        error("export", err)  # could not export
        return 2
    except Exception as err:  # noqa: BLE001 - TensorFlow's own errors: one line, not a trace
        import tensorflow as tf

        if not isinstance(err, tf.errors.OpError):
            raise
        error("export", describe_failure(err))
        return 2
    if args.quiet:
        print(format_report(report))
    return 0


def _keras_file(args, path):
    """export_model's arguments for a .keras file and the flags that go with it."""
    import logging

    import numpy as np

    from keras_vit.model import load_model

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file. Give a .keras file or a run folder "
                                "(runs/NAME).")
    if path.suffix != ".keras":
        raise ValueError(f"{path} is not a .keras file or a run folder: keras-vit export "
                         "takes one of those.")
    model = load_model(path, compile=False)
    classes = model.outputs[0].shape[-1] if len(model.outputs) == 1 else None
    if args.labels:
        from keras_vit.predict import read_labels

        class_names = read_labels(args.labels)
        if classes is not None and len(class_names) != classes:
            raise ValueError(f"--labels {args.labels} names {len(class_names)} classes but the "
                             f"model has {classes}: give one name a line, in output order.")
    else:
        class_names = [f"class_{i}" for i in range(classes or 0)]
        logging.getLogger("keras_vit.export").warning(
            f"no --labels: the classes are named class_0 .. class_{(classes or 1) - 1} in "
            "labels.txt and the SavedModel; pass --labels FILE (one name a line) for real names.")
    test = None
    if args.images:
        from keras_vit.predict import collect_images
        from keras_vit.images import read_image_file, resize_image

        size = tuple(model.inputs[0].shape[1:3])
        test = np.stack([resize_image(read_image_file(p)[1], size).numpy()
                         for p in collect_images([args.images])])
    return dict(model=model, class_names=class_names, test_images=test,
                calibration_images=test, normalization=args.normalization,
                model_file=path)
