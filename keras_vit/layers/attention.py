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
    checkpoints copy in without reshaping. The projections run as 2D matmuls on
    the kernels viewed as `(D, heads * head_dim)`, and on TensorFlow the attention
    as head-major batch matmuls with a float32 softmax (oneDNN fuses the bias adds;
    measured faster than the einsum form). Other backends use the fused
    `keras.ops.dot_product_attention` unless attention weights are asked for,
    attention dropout is active or only the class token asks queries.

    Called with `output_tokens=k`, only the first k tokens (the class token, and DeiT's
    distillation token) ask queries, over the keys and values of every token: the output is
    `(batch, k, D)`, all that the last block of a model with token heads needs
    (`class_token_only=True` is `output_tokens=1`).

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
        self.attention_dropout = keras.layers.Dropout(self.dropout_rate, name="attention_dropout",
                                                      dtype=self.dtype_policy)

    def call(self, x, training=None, return_attention_scores=False, class_token_only=False,
             output_tokens=None):
        # Each projection is one 2D matmul over the (batch * tokens, width) rows and the
        # attention runs head-major, (batch, heads, tokens, head_dim): shapes that oneDNN
        # (TensorFlow graphs) and XLA run as plain (batch) matmuls with fused bias adds, where
        # einsums cost extra transposes and copies. The maths is the reference's, with the
        # 1/sqrt(head_dim) scale folded into the query projection.
        width, heads, head_dim = x.shape[-1], self.num_heads, self.head_dim
        tokens = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
        output_tokens = output_tokens or (1 if class_token_only else None)
        queries = x[:, :output_tokens] if output_tokens else x
        query_tokens = output_tokens or tokens

        def project(inputs, length, kernel, bias, scale=None):  # -> (batch, length, heads, head_dim)
            kernel = ops.reshape(kernel, (width, heads * head_dim))
            bias = ops.reshape(bias, (heads * head_dim,))
            if scale is not None:
                kernel, bias = kernel * scale, bias * scale
            rows = ops.reshape(inputs, (-1, width))
            return ops.reshape(ops.matmul(rows, kernel) + bias, (-1, length, heads, head_dim))

        q = project(queries, query_tokens, self.query_kernel, self.query_bias,
                    1.0 / math.sqrt(head_dim))
        k = project(x, tokens, self.key_kernel, self.key_bias)
        v = project(x, tokens, self.value_kernel, self.value_bias)
        weights = None
        # A few queries (output_tokens) are cheap either way, and some fused kernels (JAX's
        # Splash attention) expect as many queries as keys.
        if (return_attention_scores or (training and self.dropout_rate > 0) or output_tokens
                or keras.backend.backend() == "tensorflow"):
            logits = ops.matmul(ops.transpose(q, (0, 2, 1, 3)), ops.transpose(k, (0, 2, 3, 1)))
            # Softmax in float32: float16 logits overflow for long sequences.
            weights = ops.cast(ops.softmax(ops.cast(logits, "float32"), axis=-1), q.dtype)
            out = ops.matmul(self.attention_dropout(weights, training=training),
                             ops.transpose(v, (0, 2, 1, 3)))
            out = ops.transpose(out, (0, 2, 1, 3))
        else:  # the backend's fused attention (cuDNN / flash kernels on JAX and PyTorch GPUs)
            out = ops.dot_product_attention(q, k, v, scale=1.0)
        out = ops.matmul(ops.reshape(out, (-1, heads * head_dim)),
                         ops.reshape(self.out_kernel, (heads * head_dim, width))) + self.out_bias
        out = ops.reshape(out, (-1, query_tokens, width))
        return (out, weights) if return_attention_scores else out

    def compute_output_spec(self, x, training=None, return_attention_scores=False,
                            class_token_only=False, output_tokens=None):
        return attention_output_spec(x, self.num_heads, self.compute_dtype,
                                     return_attention_scores,
                                     output_tokens or (1 if class_token_only else None))

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "dropout_rate": self.dropout_rate}


def attention_output_spec(x, num_heads, dtype, return_attention_scores, output_tokens):
    """The output (and attention weights') spec of self-attention over `x`, in the layer's
    compute dtype (what `__call__` returns; `call` on float32 symbolic inputs would not say)."""
    batch, tokens, width = x.shape
    queries = output_tokens or tokens
    out = keras.KerasTensor((batch, queries, width), dtype=dtype)
    if not return_attention_scores:
        return out
    return out, keras.KerasTensor((batch, num_heads, queries, tokens), dtype=dtype)
