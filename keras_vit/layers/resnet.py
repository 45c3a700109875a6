"""The ResNetV2 stem of the hybrid ViTs ("R50+B/16", "R26+S/32", "R+Ti/16").

Follows the reference (vit_jax/models_vit.py and models_resnet.py): a 7x7/2
weight-standardised convolution, GroupNorm, ReLU and a 3x3/2 max-pool (the root
block, stride 4), then stages of bottleneck units (1x1, 3x3 carrying the stride,
1x1 with 4x the width; GroupNorm after every convolution, ReLU after the sum).
Every convolution is bias-free with weight standardisation; every padding is
TensorFlow "SAME". Layer names mirror the checkpoint keys (conv_root, gn_root,
block{s}/unit{u}/conv{1,2,3}, gn{1,2,3}, conv_proj, gn_proj).
"""

import keras
from keras import ops

from keras_vit.layers.patches import patch_grid


def standardize_kernel(kernel, epsilon=1e-5):
    """Weight standardisation of a HWIO kernel as the reference StdConv does it.

    `(w - mean) / (std + epsilon)` over the spatial and input axes, per output
    channel, with the population standard deviation. (PyTorch ports such as
    timm and Hugging Face BiT use `(w - mean) / sqrt(var + 1e-8)` instead.)
    """
    mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
    centered = kernel - mean
    std = ops.sqrt(ops.mean(ops.square(centered), axis=(0, 1, 2), keepdims=True))
    return centered / (std + epsilon)


@keras.saving.register_keras_serializable(package="keras_vit")
class StdConv2D(keras.layers.Layer):
    """Bias-free 2D convolution whose kernel is weight-standardised on every call.

    The kernel `(kh, kw, in, out)` is stored raw (as in the checkpoints) and
    standardised in float32 before it is cast to the compute dtype, so mixed
    precision does not change the standardisation.

    Args:
        filters: int, output channels.
        kernel_size: int, square kernel side.
        strides: int, stride in both directions.
        epsilon: float added to the standard deviation (1e-5, the reference).
    """

    def __init__(self, filters, kernel_size, strides=1, epsilon=1e-5, **kwargs):
        kwargs.setdefault("autocast", False)  # read the float32 kernel, cast after standardising
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        k = self.kernel_size
        self.kernel = self.add_weight(
            name="kernel", shape=(k, k, int(input_shape[-1]), self.filters),
            initializer=keras.initializers.HeNormal())

    def call(self, x):
        kernel = standardize_kernel(ops.cast(self.kernel, "float32"), self.epsilon)
        x = ops.cast(x, self.compute_dtype)
        return ops.conv(x, ops.cast(kernel, self.compute_dtype), strides=self.strides,
                        padding="same")

    def compute_output_shape(self, input_shape):
        def out(size):
            return None if size is None else -(-size // self.strides)
        return (input_shape[0], out(input_shape[1]), out(input_shape[2]), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": self.kernel_size, "strides": self.strides,
                "epsilon": self.epsilon}


def _group_norm(name, dtype):
    # Flax nn.GroupNorm defaults: 32 groups, epsilon 1e-6, scale and bias.
    return keras.layers.GroupNormalization(groups=32, epsilon=1e-6, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_vit")
class BottleneckUnit(keras.layers.Layer):
    """ResNetV2 bottleneck unit of the hybrids (the reference `ResidualUnit`).

    `relu(shortcut + gn3(conv3(relu(gn2(conv2(relu(gn1(conv1(x)))))))))`; the
    shortcut is `gn_proj(conv_proj(x))` when the width or stride changes.

    Args:
        features: int, the bottleneck width; the unit outputs `4 * features`.
        strides: int, stride of the 3x3 convolution (and of the projection).
    """

    def __init__(self, features, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.features = int(features)
        self.strides = int(strides)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        f, policy = self.features, self.dtype_policy
        self.needs_projection = input_shape[-1] != 4 * f or self.strides != 1
        if self.needs_projection:
            self.conv_proj = StdConv2D(4 * f, 1, self.strides, name="conv_proj", dtype=policy)
            self.gn_proj = _group_norm("gn_proj", policy)
            self.conv_proj.build(input_shape)
            self.gn_proj.build(self.conv_proj.compute_output_shape(input_shape))
        self.conv1 = StdConv2D(f, 1, name="conv1", dtype=policy)
        self.gn1 = _group_norm("gn1", policy)
        self.conv2 = StdConv2D(f, 3, self.strides, name="conv2", dtype=policy)
        self.gn2 = _group_norm("gn2", policy)
        self.conv3 = StdConv2D(4 * f, 1, name="conv3", dtype=policy)
        # The reference zero-initialises gn3's scale: each unit starts as its shortcut.
        self.gn3 = keras.layers.GroupNormalization(
            groups=32, epsilon=1e-6, gamma_initializer="zeros", name="gn3", dtype=policy)
        shape = input_shape
        for conv, norm in ((self.conv1, self.gn1), (self.conv2, self.gn2),
                           (self.conv3, self.gn3)):
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            norm.build(shape)

    def call(self, x):
        shortcut = self.gn_proj(self.conv_proj(x)) if self.needs_projection else x
        y = ops.relu(self.gn1(self.conv1(x)))
        y = ops.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return ops.relu(shortcut + y)

    def compute_output_shape(self, input_shape):
        def out(size):
            return None if size is None else -(-size // self.strides)
        return (input_shape[0], out(input_shape[1]), out(input_shape[2]), 4 * self.features)

    def get_config(self):
        return {**super().get_config(), "features": self.features, "strides": self.strides}


@keras.saving.register_keras_serializable(package="keras_vit")
class ResNetStem(keras.layers.Layer):
    """The hybrid ViT's ResNetV2 stem, in place of `Patches`: images -> patch sequence.

    `(batch, H, W, C)` images go through the root block and the stages, and the
    feature map `(batch, h, w, C')` is cut into `patch_size` x `patch_size` cells
    flattened in (row, column, channel) order: `(batch, N, patch_size**2 * C')`,
    which `PatchEncoder` projects exactly as the reference's `embedding`
    convolution with kernel and stride `patch_size` does.

    Args:
        stage_depths: tuple of ints, bottleneck units per stage; `()` is the root
            block alone. (3, 4, 9) for R50+B/16, (2, 2, 2, 2) for R26, (3, 4, 6, 3)
            for R50+L/32.
        width: int, root width (64); stage s has bottleneck width `width * 2**s`.
        patch_size: int, cell size on the stem output (1 for R50+B/16, 8 for R+Ti/16).
    """

    def __init__(self, stage_depths=(3, 4, 9), width=64, patch_size=1, **kwargs):
        super().__init__(**kwargs)
        self.stage_depths = tuple(int(d) for d in stage_depths)
        self.width = int(width)
        self.patch_size = int(patch_size)
        if any(d < 1 for d in self.stage_depths):
            raise ValueError(f"stage_depths must be positive, got {self.stage_depths}.")

    @property
    def stride(self):
        return self.patch_size * 4 * 2 ** max(len(self.stage_depths) - 1, 0)

    @property
    def output_channels(self):
        if not self.stage_depths:
            return self.width
        return 4 * self.width * 2 ** (len(self.stage_depths) - 1)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        patch_grid(input_shape[1], input_shape[2], self.stride)
        policy = self.dtype_policy
        self.conv_root = StdConv2D(self.width, 7, 2, name="conv_root", dtype=policy)
        self.gn_root = _group_norm("gn_root", policy)
        self.conv_root.build(input_shape)
        shape = self.conv_root.compute_output_shape(input_shape)
        self.gn_root.build(shape)
        shape = (shape[0], -(-shape[1] // 2), -(-shape[2] // 2), shape[3])  # max-pool
        # One flat list (Keras tracks it); unit_names[i] is its checkpoint prefix.
        self.units, self.unit_names = [], []
        for s, depth in enumerate(self.stage_depths):
            for u in range(depth):
                unit = BottleneckUnit(self.width * 2 ** s, 2 if (s > 0 and u == 0) else 1,
                                      name=f"block{s + 1}_unit{u + 1}", dtype=policy)
                unit.build(shape)
                shape = unit.compute_output_shape(shape)
                self.units.append(unit)
                self.unit_names.append(f"block{s + 1}/unit{u + 1}")
        self.feature_shape = shape
        self.grid = (shape[1] // self.patch_size, shape[2] // self.patch_size)

    def call(self, images):
        x = ops.relu(self.gn_root(self.conv_root(images)))
        x = ops.max_pool(x, pool_size=3, strides=2, padding="same")
        for unit in self.units:
            x = unit(x)
        p, (rows, cols), c = self.patch_size, self.grid, self.output_channels
        x = ops.reshape(x, (-1, rows, p, cols, p, c))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, rows * cols, p * p * c))

    def compute_output_shape(self, input_shape):
        rows, cols = patch_grid(input_shape[1], input_shape[2], self.stride)
        return (input_shape[0], rows * cols, self.patch_size ** 2 * self.output_channels)

    def get_config(self):
        return {**super().get_config(), "stage_depths": list(self.stage_depths),
                "width": self.width, "patch_size": self.patch_size}
