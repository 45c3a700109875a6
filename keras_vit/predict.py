"""Predictions from any exported or trained model: `Predictor(path).predict(image_paths)`.

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
from pathlib import Path

import numpy as np

from keras_vit.errors import KerasViTError, NotAnImageError
from keras_vit.images import IMAGE_EXTENSIONS, read_image_file, resize_pixels

# From this many images on, a Keras model runs its full batches compiled (see predict_decoded).
COMPILE_FROM_IMAGES = 256


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


# --- models ------------------------------------------------------------------------------

def read_labels(path):
    """Class names from a file, one a line (blank lines skipped); a ValueError for an empty
    file."""
    names = [line.rstrip("\n") for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} holds no class names: give one name a line, in output order.")
    return names


def _labels_near(folder):
    """(class names, the file they came from) from labels.txt or a run's config.json in
    `folder`, or (None, None)."""
    if (folder / "labels.txt").is_file():
        return read_labels(folder / "labels.txt"), str(folder / "labels.txt")
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
        given = read_labels(labels) if labels is not None else None  # before the model loads
        self._load()
        if given is not None:
            self.class_names, self.class_names_source = given, f"--labels {labels}"
        else:
            self.class_names, self.class_names_source = _labels_near(self.model_path.parent)
        if self.class_names is None and self.kind == "tflite":
            from keras_vit.export._metadata import labels_in

            # The file's own TFLite Metadata (keras-vit 0.2 exports carry the class names).
            self.class_names = labels_in(self.model_path.read_bytes())
            self.class_names_source = f"{self.model_path.name}'s metadata"

    def _load(self):
        try:
            self._load_kind()
        except ImportError:
            raise  # a missing extra: its message says what to install
        except Exception as err:  # noqa: BLE001 - each runtime raises its own kinds
            if isinstance(err, (FileNotFoundError, KerasViTError)) or self.kind == "keras":
                raise  # (keras_vit.load_model says what is wrong with a .keras file)
            what = {"savedmodel": "a SavedModel TensorFlow can load",
                    "tflite": "a TFLite model keras-vit can run",
                    "onnx": "an ONNX model onnxruntime can run",
                    "keras": "a readable .keras file"}[self.kind]
            raise ValueError(f"{self.model_path} is not {what} (damaged, or another kind of "
                             f"file): {str(err).strip().splitlines()[0][:200]}") from None

    def _load_kind(self):
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
            from keras_vit.model import load_model

            self._model = load_model(self.model_path, compile=False)
            self.image_size = tuple(int(s) for s in self._model.inputs[0].shape[1:3])
            self.normalization = getattr(self._model, "normalization", None) or "vit"

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
        pixels = np.stack([np.asarray(resize_pixels(im, self.image_size)) for im in images])
        if self.kind == "tflite":
            from keras_vit.export._tflite import quiet_stderr

            with quiet_stderr():  # XNNPACK's start-up line
                return self._model(pixels)
        if self.kind == "onnx":
            return self._model(pixels)
        from keras_vit.images import normalize
        from keras_vit.model import class_probabilities

        inputs = normalize(pixels, self.normalization)
        outputs = (self._model.predict_on_batch(inputs) if compiled
                   else self._model(inputs, training=False))
        return np.asarray(class_probabilities(self._model, outputs))

    def predict(self, paths, top_k=5, batch_size=32):
        """Top-k (label, score) per image path, in order. Every path is read and checked
        before any is run, so a bad file fails fast with its name."""
        return self.predict_decoded([read_image_file(p) for p in paths], top_k, batch_size)

    def predict_decoded(self, decoded, top_k=5, batch_size=32):
        """Like `predict`, for `keras_vit.images.read_image_file` results: [(encoded bytes, uint8 image)]."""
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
