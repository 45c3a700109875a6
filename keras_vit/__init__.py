"""keras-vit: the Vision Transformer of "An Image is Worth 16x16 Words" for Keras 3.

    import keras_vit
    model = keras_vit.build("B/16")
"""

import os

# TensorFlow's C++ start-up chatter hides the output users came for (set before
# keras imports TensorFlow; an explicit setting by the user wins).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_vit import checkpoints, layers  # noqa: E402
from keras_vit.attention_map import attention_map, save_attention_overlay  # noqa: E402
from keras_vit.model import build, feature_model  # noqa: E402
from keras_vit.preprocessing import preprocess  # noqa: E402
from keras_vit import optimizers, schedules  # noqa: E402,F401  (registered for .keras loading)
from keras_vit.variants import count_parameters, parse_variant, variant_names, variants

__version__ = "0.1.0"
__all__ = ["attention_map", "build", "checkpoints", "count_parameters", "feature_model",
           "layers", "parse_variant", "save_attention_overlay",
           "preprocess", "variant_names", "variants"]
