import math

import keras
from keras import ops


def glorot_uniform_for(num_input_axes):
    """Xavier-uniform over a multi-axis kernel, counting fans as Flax's DenseGeneral does.

    Keras' GlorotUniform treats leading axes of a 3D kernel as a receptive field;
    for a (D, heads, head_dim) projection the fans are D and heads * head_dim.
    """

    def initializer(shape, dtype=None):
        fan_in = math.prod(shape[:num_input_axes])
        fan_out = math.prod(shape[num_input_axes:])
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return keras.random.uniform(shape, -limit, limit, dtype=dtype)

    return initializer


@keras.saving.register_keras_serializable(package="keras_vit")
class MultiHeadSelfAttention(keras.layers.Layer):
    """Multi-head self-attention with the weight layout of the Flax ViT checkpoints.

    Query, key and value kernels are `(D, heads, head_dim)` with biases
    `(heads, head_dim)`; the output kernel is `(heads, head_dim, D)`. Original
    checkpoints copy in without reshaping. Inference uses the fused
    `keras.ops.dot_product_attention`; the explicit softmax path runs only when
    attention weights are asked for or attention dropout is active.

    Args:
        num_heads: int, number of attention heads; must divide the input width.
        dropout_rate: float, dropout on the attention weights while training.
    """

    def __init__(self, num_heads, dropout_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.dropout_rate = float(dropout_rate)

    def build(self, input_shape):
        width = input_shape[-1]
        if width % self.num_heads:
            raise ValueError(
                f"Width {width} is not divisible by num_heads {self.num_heads}; "
                "choose a head count that divides the width.")
        self.head_dim = width // self.num_heads
        qkv_shape = (width, self.num_heads, self.head_dim)
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_kernel", self.add_weight(
                name=f"{name}_kernel", shape=qkv_shape, initializer=glorot_uniform_for(1)))
            setattr(self, f"{name}_bias", self.add_weight(
                name=f"{name}_bias", shape=qkv_shape[1:], initializer="zeros"))
        self.out_kernel = self.add_weight(
            name="out_kernel", shape=(self.num_heads, self.head_dim, width),
            initializer=glorot_uniform_for(2))
        self.out_bias = self.add_weight(name="out_bias", shape=(width,), initializer="zeros")
        self.attention_dropout = keras.layers.Dropout(self.dropout_rate, name="attention_dropout")

    def call(self, x, training=None, return_attention_scores=False):
        q = ops.einsum("btd,dhk->bthk", x, self.query_kernel) + self.query_bias
        k = ops.einsum("btd,dhk->bthk", x, self.key_kernel) + self.key_bias
        v = ops.einsum("btd,dhk->bthk", x, self.value_kernel) + self.value_bias
        weights = None
        if return_attention_scores or (training and self.dropout_rate > 0):
            logits = ops.einsum("bqhk,bthk->bhqt", q * (1.0 / math.sqrt(self.head_dim)), k)
            # Softmax in float32: float16 logits overflow for long sequences.
            weights = ops.cast(ops.softmax(ops.cast(logits, "float32"), axis=-1), q.dtype)
            out = ops.einsum("bhqt,bthk->bqhk", self.attention_dropout(weights, training=training), v)
        else:
            out = ops.dot_product_attention(q, k, v)
        out = ops.einsum("bqhk,hkd->bqd", out, self.out_kernel) + self.out_bias
        return (out, weights) if return_attention_scores else out

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "dropout_rate": self.dropout_rate}
