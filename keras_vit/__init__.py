"""keras-vit: the Vision Transformer of "An Image is Worth 16x16 Words" for Keras 3.

    import keras_vit
    model = keras_vit.build("B/16")                        # a keras_vit.ViT
    model = keras_vit.load_model("runs/digits/model.keras")
    result = keras_vit.train(keras_vit.TrainConfig(data="folder:flowers"))
    report = keras_vit.export_model(model, "exported/flowers", class_names=names)

Names are imported when first used, so `import keras_vit` (and the `keras-vit` command's
help) does not start TensorFlow. When Keras is already imported, the model's layers are
registered at once, so `keras.saving.load_model` reads keras-vit's `.keras` files;
`keras_vit.load_model` always does (and converts files of keras-vit 0.1).
"""

import importlib
import os
import sys

# TensorFlow's C++ start-up chatter hides the output users came for (set before
# keras imports TensorFlow; an explicit setting by the user wins).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.2.0"

# public name -> the module that defines it
_API = {
    "ViT": "keras_vit.model",
    "build": "keras_vit.model",
    "load_model": "keras_vit.model",
    "feature_model": "keras_vit.model",
    "distillation_model": "keras_vit.model",
    "preprocess": "keras_vit.images",
    "attention_map": "keras_vit.attention_rollout",
    "save_attention_figure": "keras_vit.attention_rollout",
    "export_model": "keras_vit.export",
    "export_run": "keras_vit.export",
    "train": "keras_vit.training.trainer",
    "TrainConfig": "keras_vit.training.config",
    "TrainResult": "keras_vit.training.trainer",
}
# subpackages and modules reachable as attributes (keras_vit.recipes, keras_vit.checkpoints, ...)
_MODULES = ("checkpoints", "errors", "export", "images", "layers", "recipes", "training",
            "keras_internals", "optimizers", "schedules")

# The variant table is plain Python: imported now, so that `keras_vit.variants` is the
# function (the module keras_vit.variants has the same name).
from keras_vit.variants import (count_parameters, parse_variant, variant_names,  # noqa: E402
                                variants)

__all__ = sorted(_API) + list(_MODULES) + ["count_parameters", "parse_variant",
                                           "variant_names", "variants"]


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"keras_vit.{name}")
    else:
        raise AttributeError(f"module 'keras_vit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _register_serializables():
    """Imports the modules whose classes `.keras` files name (layers, the ViT, optimizers,
    schedules, losses), which registers them with Keras."""
    for module in ("keras_vit.model", "keras_vit.recipes"):
        importlib.import_module(module)


if "keras" in sys.modules:  # Keras is loaded already: registering costs nothing more
    _register_serializables()
