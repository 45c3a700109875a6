"""`keras-vit predict MODEL IMAGES...`: top-5 classes from any exported or trained model.

MODEL is one of
  exported/NAME/1             a SavedModel (its serving_default signature decodes the files)
  exported/NAME               the newest SavedModel version inside
  exported/NAME/NAME_int8.tflite (or any .tflite), run with the LiteRT runtime
  runs/NAME/model.keras       a Keras model (or the run folder runs/NAME)
  exported/NAME/NAME.onnx     with onnxruntime installed (the `onnx` extra)
IMAGES are JPEG, PNG, BMP or GIF files, or folders of them (searched recursively).
Class names come from the model (SavedModel), labels.txt beside the file, the run's
config.json, or --labels.
"""

import json
import sys
from pathlib import Path

import numpy as np

from keras_vit.cli import positive_int

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# From this many images on, a Keras model runs its full batches compiled (see predict_decoded).
COMPILE_FROM_IMAGES = 256


class NotAnImageError(ValueError):
    """A path given as an image is not a JPEG, PNG, BMP or GIF file that decodes."""


# --- images ------------------------------------------------------------------------------

def collect_images(inputs):
    """Files and folders -> a sorted list of image paths (folders searched recursively for
    .jpg/.jpeg/.png/.bmp/.gif). Raises FileNotFoundError / NotAnImageError saying which."""
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise NotAnImageError(f"{p} is a folder with no JPEG, PNG, BMP or GIF files "
                                      f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return paths


def read_image(path):
    """Returns (encoded bytes, decoded uint8 RGB (h, w, 3)) of one file, decoded with the
    decoder the SavedModel uses; raises NotAnImageError for anything else."""
    import tensorflow as tf

    from keras_vit.export._graph import is_image_bytes

    data = Path(path).read_bytes()
    if not is_image_bytes(data):
        what = "an empty file" if not data else "not an image"
        raise NotAnImageError(f"{path} is {what}: expected a JPEG, PNG, BMP or GIF file")
    try:
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
        raise NotAnImageError(f"{path} is not a decodable image (damaged or truncated?): "
                              f"{e.message.strip().splitlines()[0]}") from None
    return data, image.numpy()


def resize_pixels(image, image_size):
    """uint8 (h, w, 3) -> float32 (H, W, 3) in [0, 255] at the model size, resized as
    `keras_vit.preprocess` (and so training and the SavedModel) does."""
    from keras_vit.export._graph import resize_pixels as resize

    return np.asarray(resize(image, tuple(image_size)))


# --- models ------------------------------------------------------------------------------

def _read_labels(path):
    return [line.rstrip("\n") for line in Path(path).read_text().splitlines() if line.strip()]


def _labels_near(folder):
    """(class names, the file they came from) from labels.txt or a run's config.json in
    `folder`, or (None, None)."""
    if (folder / "labels.txt").is_file():
        return _read_labels(folder / "labels.txt"), str(folder / "labels.txt")
    if (folder / "config.json").is_file():
        names = json.loads((folder / "config.json").read_text()).get("class_names")
        if names:
            return [str(c) for c in names], str(folder / "config.json")
    return None, None


class Predictor:
    """Loads a model file/folder; `predict(paths)` -> per image, a list of (label, score)."""

    def __init__(self, path, labels=None):
        self.path = Path(path)
        self.kind, self.model_path = _resolve(self.path)
        given = _read_labels(labels) if labels is not None else None  # before the model loads
        self._load()
        if given is not None:
            self.class_names, self.class_names_source = given, f"--labels {labels}"
        else:
            self.class_names, self.class_names_source = _labels_near(self.model_path.parent)

    def _load(self):
        if self.kind == "savedmodel":
            import tensorflow as tf

            loaded = tf.saved_model.load(str(self.model_path))
            if "serving_default" not in loaded.signatures:
                raise ValueError(f"{self.model_path} has no serving_default signature; "
                                 "export it with `keras-vit export`")
            self._loaded = loaded  # keeps the variables alive
            self._fn = loaded.signatures["serving_default"]
            self.image_size = None
        elif self.kind == "tflite":
            from keras_vit.export._tflite import LiteRTModel, quiet_stderr

            with quiet_stderr():
                self._model = LiteRTModel(self.model_path)
            self.image_size = self._model.image_size
        elif self.kind == "onnx":
            from keras_vit.export._onnx import OnnxModel, require_onnx

            require_onnx()
            self._model = OnnxModel(self.model_path)
            self.image_size = self._model.image_size
        else:  # keras
            import keras

            import keras_vit  # noqa: F401  registers the layers

            self._model = keras.saving.load_model(self.model_path)
            self.image_size = tuple(int(s) for s in self._model.inputs[0].shape[1:3])

    def describe(self):
        return {"savedmodel": "SavedModel, serving_default signature",
                "tflite": "TFLite, LiteRT runtime", "onnx": "ONNX, onnxruntime",
                "keras": "Keras model"}[self.kind]

    def _label(self, i, baked=None):
        names = self.class_names
        if names and i < len(names):
            return names[i]
        if baked and i in baked:  # a SavedModel's own names for its top classes
            return baked[i]
        return f"class_{i}"

    def probabilities(self, images, compiled=False):
        """Decoded uint8 images (any sizes) -> probabilities [n, classes] (not SavedModel).
        `compiled`: a Keras model runs through its compiled predict function (traced, and
        XLA-compiled if the model was, once per batch shape) instead of an eager call."""
        pixels = np.stack([resize_pixels(im, self.image_size) for im in images])
        if self.kind == "tflite":
            from keras_vit.export._tflite import quiet_stderr

            with quiet_stderr():  # XNNPACK's start-up line
                return self._model(pixels)
        if self.kind == "onnx":
            return self._model(pixels)
        from keras_vit.model import class_probabilities
        from keras_vit.preprocessing import preprocess

        inputs = preprocess(pixels)
        outputs = (self._model.predict_on_batch(inputs) if compiled
                   else self._model(inputs, training=False))
        return np.asarray(class_probabilities(self._model, outputs))

    def predict(self, paths, top_k=5, batch_size=32):
        """Top-k (label, score) per image path, in order. Every path is read and checked
        before any is run, so a bad file fails fast with its name."""
        return self.predict_decoded([read_image(p) for p in paths], top_k, batch_size)

    def predict_decoded(self, decoded, top_k=5, batch_size=32):
        """Like `predict`, for `read_image` results: [(encoded bytes, uint8 image)]."""
        if int(top_k) < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}.")
        # Compiling costs seconds once (3-4 s at Ti/16 224 with XLA) and then runs a batch of
        # 32 1.3-2x faster than an eager call: it pays off over a few hundred images, for full
        # batches (a smaller last batch would compile again).
        compiled = self.kind == "keras" and len(decoded) >= COMPILE_FROM_IMAGES
        results = []
        for start in range(0, len(decoded), batch_size):
            batch = decoded[start:start + batch_size]
            baked = [None] * len(batch)
            if self.kind == "savedmodel":
                import tensorflow as tf

                # All the probabilities, so --top-k is not capped at the k baked into the
                # signature and --labels (or labels.txt) names every class.
                out = self._fn(image_bytes=tf.constant([data for data, _ in batch]))
                probs = out["probabilities"].numpy()
                baked = [{int(i): label.decode("utf-8") for i, label in zip(row_i, row_l)}
                         for row_i, row_l in zip(out["top_k_indices"].numpy(),
                                                 out["top_k_labels"].numpy())]
            else:
                probs = self.probabilities([image for _, image in batch],
                                           compiled=compiled and len(batch) == batch_size)
            if self.class_names is not None and len(self.class_names) != probs.shape[1]:
                fix = ("give one name a line, in class order" if self.class_names_source
                       .startswith("--labels") else "pass --labels with one name a line")
                raise ValueError(
                    f"{self.class_names_source} names {len(self.class_names)} classes but the "
                    f"model has {probs.shape[1]}: {fix}.")
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            results += [[(self._label(int(i), names), float(p[i])) for i in row]
                        for p, row, names in zip(probs, order, baked)]
        return results


def _resolve(path):
    """(kind, path to load) for a model path; raises ValueError saying what is accepted."""
    if path.is_file():
        kind = {".tflite": "tflite", ".keras": "keras", ".onnx": "onnx"}.get(path.suffix.lower())
        if kind:
            return kind, path
    elif path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "savedmodel", path
        versions = [d for d in path.iterdir()
                    if d.is_dir() and d.name.isdigit() and (d / "saved_model.pb").is_file()]
        if versions:
            return "savedmodel", max(versions, key=lambda d: int(d.name))
        if (path / "model.keras").is_file():
            return "keras", path / "model.keras"
    else:
        raise FileNotFoundError(f"{path}: no such model file or folder")
    raise ValueError(f"{path} is not a model keras-vit can run: give a SavedModel folder "
                     "(exported/NAME/1 or exported/NAME), a .tflite, .keras or .onnx file, "
                     "or a run folder (runs/NAME)")


# --- CLI ---------------------------------------------------------------------------------

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
    try:
        paths = collect_images(args.images)
    except (FileNotFoundError, NotAnImageError) as e:  # a wrong argument: nothing runs
        print(f"keras-vit predict: error: {e}", file=sys.stderr)
        return 2
    errors, decoded = {}, {}  # by position in paths: why unreadable / read_image's result
    for i, path in enumerate(paths):
        try:  # every file is read before the model loads
            decoded[i] = read_image(path)
        except (NotAnImageError, OSError) as e:  # one damaged photo spoils no other
            errors[i] = str(e)
    try:
        if not decoded:
            raise NotAnImageError("no image could be read:\n  " + "\n  ".join(errors.values()))
        predictor = Predictor(args.model, labels=args.labels)
        top = dict(zip(decoded, predictor.predict_decoded(
            list(decoded.values()), top_k=args.top_k, batch_size=args.batch_size)))
    except (FileNotFoundError, NotAnImageError, ValueError, ImportError) as e:
        if args.json:  # unreadable files still get their lines
            for i, error in errors.items():
                print(json.dumps({"image": str(paths[i]), "error": error}))
        print(f"keras-vit predict: error: {e}", file=sys.stderr)
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
    for error in errors.values():
        print(f"keras-vit predict: skipped {error}", file=sys.stderr)
    if errors:
        print(f"keras-vit predict: {len(errors)} of {len(paths)} files could not be read "
              "(above); the others were predicted.", file=sys.stderr)
        return 1
    return 0
