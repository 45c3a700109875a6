import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_vit")
class DropPath(keras.layers.Layer):
    """Stochastic depth: drops a whole residual branch per sample while training.

    Kept samples are scaled by 1 / (1 - rate) so the expected value is unchanged;
    at inference the layer is the identity.

    Args:
        rate: float in [0, 1), the probability of dropping the branch.
        seed: optional int for reproducible masks.
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if rate > 0 else None

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        # Drawn in float32: in bfloat16, keep + uniform rounds up to 1 too often (a 1% rate
        # dropped 1.5% of samples).
        draw = keras.random.uniform(shape, seed=self.seed_generator, dtype="float32")
        mask = ops.cast(draw >= self.rate, x.dtype)
        return x / keep * mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
