"""`keras-vit attention-map IMAGE... --model MODEL`: attention-rollout pictures, one sheet.

    keras-vit attention-map tulip.jpg --model runs/flowers            # a run folder
    keras-vit attention-map a.png b.png --model runs/flowers/model.keras --out sheet.png
    keras-vit attention-map cat.jpg --model augreg_in21k_ft_in1k --variant B/16   # a checkpoint

Each row of the sheet shows the image (titled with the predicted class and probability) and
the attention overlay with a colour bar; coarse patch grids are drawn.
"""

import os
from pathlib import Path

from keras_vit.cli._common import describe_failure, error, positive_int


def add_arguments(parser):
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, BMP or GIF)")
    parser.add_argument("--model", default=None,
                        help="a run folder (runs/NAME), a .keras file, or a checkpoint file or "
                             "name (e.g. augreg_in21k_ft_in1k, with --variant)")
    parser.add_argument("--weights", default=None,
                        help="a checkpoint file or name to build --variant from (as --model)")
    parser.add_argument("--variant", default="B/16",
                        help="ViT variant when building from a checkpoint (default B/16)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="model input size when building from a checkpoint (default: "
                             "the checkpoint's)")
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument("--labels", help="class names, one a line (default: the run's, or "
                                         "labels.txt beside the model)")
    parser.add_argument("--out", default=None,
                        help="output PNG (default: the first image's name + _attention.png)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity (0..1)")


def run(args):
    from keras_vit.errors import KerasViTError

    source = args.model or args.weights
    if source is None:
        error("attention-map", "pass --model (a run folder, a .keras file or a checkpoint); "
                               "a model with random weights has no meaningful attention.")
        return 2
    if not 0 <= args.alpha <= 1:
        error("attention-map", f"--alpha must be between 0 and 1, got {args.alpha}.")
        return 2
    try:
        return _run(args, source)
    except (KerasViTError, OSError, ValueError, ImportError) as e:
        error("attention-map", e)
        return 2
    except Exception as e:  # noqa: BLE001 - TensorFlow's own errors: one line, not a trace
        import tensorflow as tf

        if not isinstance(e, tf.errors.OpError):
            raise
        error("attention-map", describe_failure(e))
        return 2


def _run(args, source):
    import numpy as np

    import keras_vit
    from keras_vit.images import read_image_file
    from keras_vit.model import class_probabilities, load_model
    from keras_vit.predict import read_labels

    images = [read_image_file(path)[1] for path in args.images]  # before the model loads
    model, names = _load(source, args, keras_vit, load_model)
    if args.labels:
        names = read_labels(args.labels)
    heats, captions = [], []
    for image in images:
        heats.append(keras_vit.attention_map(model, image))
        if model.head is not None:
            probabilities = np.asarray(class_probabilities(
                model, model(model.preprocess(image[None]), training=False)))[0]
            best = int(probabilities.argmax())
            name = names[best] if names and best < len(names) else f"class {best}"
            captions.append(f"{name}  {100 * probabilities[best]:.1f}%")
        else:
            captions.append("features only (no head)")
    out = args.out or os.path.splitext(args.images[0])[0] + "_attention.png"
    keras_vit.save_attention_figure(images, heats, out, labels=captions, grid=model.grid,
                                    alpha=args.alpha)
    print(out)
    return 0


def _load(source, args, keras_vit, load_model):
    """(model, class names or None) from a run folder, a .keras file or a checkpoint."""
    import json

    path = Path(source)
    if path.is_dir() and (path / "model.keras").is_file():
        config = path / "config.json"
        names = json.loads(config.read_text()).get("class_names") if config.is_file() else None
        return load_model(path / "model.keras", compile=False), names
    if path.suffix == ".keras":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file.")
        labels = path.parent / "labels.txt"
        names = labels.read_text().split("\n") if labels.is_file() else None
        return load_model(path, compile=False), names
    if path.is_dir():
        raise ValueError(f"{path} is a folder but not a finished run (no model.keras in it).")
    model = keras_vit.build(args.variant, image_size=args.image_size,
                            num_classes=args.num_classes, weights=source)
    return model, None
