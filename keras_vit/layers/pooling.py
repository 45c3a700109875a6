import keras
from keras import ops

POOLING_MODES = ("token", "gap")
# Modes of the layer itself: "distillation" reads DeiT's second token (model pooling stays
# "token").
_MODES = POOLING_MODES + ("distillation",)


@keras.saving.register_keras_serializable(package="keras_vit")
class TokenPooling(keras.layers.Layer):
    """Reduces the token sequence to one vector for the head.

    Args:
        mode: "token" reads the class token (the paper); "gap" averages the patch
            tokens (models built without a class token); "distillation" reads the token
            after the class token (DeiT's distillation token).
    """

    def __init__(self, mode="token", **kwargs):
        super().__init__(**kwargs)
        if mode not in _MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {mode!r}.")
        self.mode = mode

    def call(self, tokens):
        if self.mode == "token":
            return tokens[:, 0]
        if self.mode == "distillation":
            return tokens[:, 1]
        return ops.mean(tokens, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
