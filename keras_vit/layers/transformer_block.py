import keras
from keras import ops

from keras_vit.layers.attention import MultiHeadSelfAttention, attention_output_spec
from keras_vit.layers.drop_path import DropPath
from keras_vit.layers.gelu import GELU_FORMS, gelu


@keras.saving.register_keras_serializable(package="keras_vit")
class MlpBlock(keras.layers.Layer):
    """Dense(mlp_dim) -> GELU -> dropout -> Dense(width) -> dropout, as the reference MlpBlock.

    Kernels Xavier-uniform, biases normal(1e-6), as the reference.

    Args:
        mlp_dim: int, hidden size (4 * width for the paper's variants).
        dropout_rate: float, dropout after each Dense while training.
        gelu: "tanh" (reference, JAX) or "erf" (exact; PyTorch, timm, HF).
    """

    def __init__(self, mlp_dim, dropout_rate=0.0, gelu="tanh", **kwargs):
        super().__init__(**kwargs)
        if gelu not in GELU_FORMS:
            raise ValueError(f"gelu must be one of {GELU_FORMS}, got {gelu!r}.")
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.gelu = gelu

    def build(self, input_shape):
        dense = dict(kernel_initializer="glorot_uniform",
                     bias_initializer=keras.initializers.RandomNormal(stddev=1e-6),
                     dtype=self.dtype_policy)
        self.dense_0 = keras.layers.Dense(self.mlp_dim, name="Dense_0", **dense)
        self.dense_1 = keras.layers.Dense(input_shape[-1], name="Dense_1", **dense)
        self.dropout = keras.layers.Dropout(self.dropout_rate, dtype=self.dtype_policy)
        self.dense_0.build(input_shape)
        self.dense_1.build(tuple(input_shape[:-1]) + (self.mlp_dim,))

    def call(self, x, training=None):
        # On (batch * tokens, width) rows: 2D matmuls whose bias add and GELU oneDNN fuses
        # (a 3D Dense input becomes a tensordot with reshapes between matmul and bias).
        shape = ops.shape(x)
        x = ops.reshape(x, (-1, x.shape[-1]))
        x = gelu(self.dense_0(x), self.gelu)
        x = self.dropout(x, training=training)
        x = self.dropout(self.dense_1(x), training=training)
        return ops.reshape(x, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mlp_dim": self.mlp_dim,
                "dropout_rate": self.dropout_rate, "gelu": self.gelu}


@keras.saving.register_keras_serializable(package="keras_vit")
class TransformerBlock(keras.layers.Layer):
    """Pre-LayerNorm encoder block: x + MHSA(LN(x)), then x + MLP(LN(x)).

    Sub-layers are named after the reference Flax modules (LayerNorm_0,
    MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3).

    Args:
        num_heads: int, attention heads.
        mlp_dim: int, MLP hidden size.
        dropout_rate: float, dropout after attention and inside the MLP.
        attention_dropout_rate: float, dropout on the attention weights.
        drop_path_rate: float, stochastic-depth rate of this block.
        gelu: "tanh" or "erf", see `MlpBlock`.
        layer_norm_epsilon: float, 1e-6 as the reference.

    Called with `output_tokens=k`, it returns the first k tokens' outputs alone,
    `(batch, k, D)`, the same values as the first k tokens of the full output: the last
    block of a model whose heads read the class token (and DeiT's distillation token) needs
    no more, so its MLP and the query and output projections run on k tokens instead of all
    of them. `class_token_only=True` is `output_tokens=1`.
    """

    def __init__(self, num_heads, mlp_dim, dropout_rate=0.0, attention_dropout_rate=0.0,
                 drop_path_rate=0.0, gelu="tanh", layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout_rate = float(attention_dropout_rate)
        self.drop_path_rate = float(drop_path_rate)
        self.gelu = gelu
        self.layer_norm_epsilon = float(layer_norm_epsilon)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        policy = self.dtype_policy
        self.norm_1 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="LayerNorm_0", dtype=policy)
        self.attention = MultiHeadSelfAttention(
            self.num_heads, self.attention_dropout_rate,
            name="MultiHeadDotProductAttention_1", dtype=policy)
        self.norm_2 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="LayerNorm_2", dtype=policy)
        self.mlp = MlpBlock(self.mlp_dim, self.dropout_rate, self.gelu,
                            name="MlpBlock_3", dtype=policy)
        self.dropout = keras.layers.Dropout(self.dropout_rate, dtype=policy)
        self.drop_path = DropPath(self.drop_path_rate, dtype=policy)
        for layer in (self.norm_1, self.attention, self.norm_2, self.mlp):
            layer.build(input_shape)

    def call(self, x, training=None, return_attention_scores=False, class_token_only=False,
             output_tokens=None):
        output_tokens = output_tokens or (1 if class_token_only else None)
        y = self.attention(self.norm_1(x), training=training,
                           return_attention_scores=return_attention_scores,
                           output_tokens=output_tokens)
        y, scores = y if return_attention_scores else (y, None)
        if output_tokens:
            x = x[:, :output_tokens]
        x = x + self.drop_path(self.dropout(y, training=training), training=training)
        x = x + self.drop_path(self.mlp(self.norm_2(x), training=training), training=training)
        return (x, scores) if return_attention_scores else x

    def compute_output_spec(self, x, training=None, return_attention_scores=False,
                            class_token_only=False, output_tokens=None):
        return attention_output_spec(x, self.num_heads, self.compute_dtype,
                                     return_attention_scores,
                                     output_tokens or (1 if class_token_only else None))

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "mlp_dim": self.mlp_dim,
                "dropout_rate": self.dropout_rate,
                "attention_dropout_rate": self.attention_dropout_rate,
                "drop_path_rate": self.drop_path_rate, "gelu": self.gelu,
                "layer_norm_epsilon": self.layer_norm_epsilon}
