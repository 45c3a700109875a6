import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_vit")
class PatchEncoder(keras.layers.Layer):
    """Projects flattened patches to width D, prepends a class token, adds position embeddings.

    One matrix projects every patch (the paper's E). With `class_token=True` a
    learnable token is prepended and `N + 1` learnable 1D position embeddings are
    added after it (the original ViT order); with `class_token=False` there are `N`
    position embeddings and the model pools by global average instead. With
    `distillation_token=True` (DeiT) a second learnable token follows the class token:
    `[cls, dist, patches]`, `N + 2` position embeddings.

    Weights use the reference initialisation: projection LeCun-normal (Flax's
    Conv default), class token zeros, position embeddings normal(0.02); the distillation
    token normal(0.02), as timm's.

    Args:
        width: int, the token width D.
        class_token: bool, whether to prepend a learnable class token.
        distillation_token: bool, whether a DeiT distillation token follows it.
    """

    def __init__(self, width, class_token=True, distillation_token=False, **kwargs):
        super().__init__(**kwargs)
        self.width = int(width)
        self.class_token = bool(class_token)
        self.distillation_token = bool(distillation_token)
        if self.distillation_token and not self.class_token:
            raise ValueError("A distillation token follows the class token: distillation_token "
                             "needs class_token=True.")

    @property
    def num_prefix_tokens(self):
        """Tokens before the patches: the class token and the distillation token, if any."""
        return int(self.class_token) + int(self.distillation_token)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        num_patches, patch_dim = input_shape[1], input_shape[2]
        self.kernel = self.add_weight(
            name="kernel", shape=(patch_dim, self.width),
            initializer=keras.initializers.LecunNormal())
        self.bias = self.add_weight(name="bias", shape=(self.width,), initializer="zeros")
        if self.class_token:
            self.cls = self.add_weight(name="cls", shape=(1, 1, self.width), initializer="zeros")
        if self.distillation_token:
            self.dist = self.add_weight(
                name="dist", shape=(1, 1, self.width),
                initializer=keras.initializers.TruncatedNormal(stddev=0.02))
        num_tokens = num_patches + self.num_prefix_tokens
        self.pos_embedding = self.add_weight(
            name="pos_embedding", shape=(1, num_tokens, self.width),
            initializer=keras.initializers.RandomNormal(stddev=0.02))

    def call(self, patches):
        # One 2D matmul over every patch of the batch (a 3D matmul becomes a tensordot).
        num_patches = patches.shape[1] if patches.shape[1] is not None else ops.shape(patches)[1]
        x = ops.matmul(ops.reshape(patches, (-1, patches.shape[-1])), self.kernel) + self.bias
        x = ops.reshape(x, (-1, num_patches, self.width))
        prefix = [self.cls] if self.class_token else []
        if self.distillation_token:
            prefix.append(self.dist)
        if prefix:
            batch = ops.shape(x)[0]
            x = ops.concatenate([ops.cast(ops.broadcast_to(token, (batch, 1, self.width)), x.dtype)
                                 for token in prefix] + [x], axis=1)
        return x + ops.cast(self.pos_embedding, x.dtype)

    def compute_output_shape(self, input_shape):
        tokens = None if input_shape[1] is None else input_shape[1] + self.num_prefix_tokens
        return (input_shape[0], tokens, self.width)

    def get_config(self):
        config = {**super().get_config(), "width": self.width, "class_token": self.class_token}
        if self.distillation_token:  # (older files have no such key)
            config["distillation_token"] = True
        return config
