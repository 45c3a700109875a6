"""`keras-vit train` on the JAX backend: Keras 3's own way to scale, `keras.distribution`.

    KERAS_BACKEND=jax keras-vit train                                   # one device
    KERAS_BACKEND=jax keras-vit train --distribution data-parallel      # all local devices
    KERAS_BACKEND=jax keras-vit train --distribution model-parallel     # kernels sharded

- "data-parallel": `keras.distribution.DataParallel` over every local device: the global batch
  is split across them, the weights replicated.
- "model-parallel": `keras.distribution.ModelParallel` on a mesh of ("batch", "model") axes
  (all devices on "model"): the large kernels are sharded over "model" as Megatron does
  (`layout_map`): the attention's query/key/value and output kernels by head (each device
  runs whole heads), the MLP's first kernel by output feature and second by input feature,
  so each block needs one all-reduce after attention and one after the MLP.

Evaluation batches whose size the devices do not divide (the last of a split) are padded
with rows of sample weight 0 (`pad_for_devices`): accuracy counts only the real images.

Several hosts: call `keras.distribution.initialize()` on each before training (JAX's
coordinator environment); only one host was available to test. The `tf.data` pipelines feed
JAX as they feed TensorFlow (TensorFlow stays installed for them and for the export).
"""

import contextlib

import keras

DISTRIBUTIONS = ("none", "data-parallel", "model-parallel")


def layout_map(device_mesh):
    """The sharding of a ViT's large kernels over the mesh's "model" axis (regexes on the
    variables' paths, e.g. "encoderblock_3/MultiHeadDotProductAttention_1/query_kernel")."""
    layouts = keras.distribution.LayoutMap(device_mesh)
    attention = r".*MultiHeadDotProductAttention_1/"
    # By head, not head_dim: the layer reshapes (D, H, hd) to (D, H * hd), where whole heads
    # stay contiguous tiles; a head_dim split would be regathered at every step.
    layouts[attention + "(query|key|value)_kernel"] = (None, "model", None)  # (D, H, hd)
    layouts[attention + "(query|key|value)_bias"] = ("model", None)
    layouts[attention + "out_kernel"] = ("model", None, None)                # (H, hd, D)
    layouts[r".*MlpBlock_3/Dense_0/kernel"] = (None, "model")               # (D, mlp)
    layouts[r".*MlpBlock_3/Dense_0/bias"] = ("model",)
    layouts[r".*MlpBlock_3/Dense_1/kernel"] = ("model", None)               # (mlp, D)
    return layouts


class JaxDistribution:
    """What training needs of a `tf.distribute` strategy, on JAX with `keras.distribution`:
    `scope()`, `num_replicas_in_sync` (the ways the batch is split) and `describe()`."""

    def __init__(self, name="none"):
        if name not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, got "
                             f"{name!r}.")
        self.name = name
        self.devices = keras.distribution.list_devices()
        count = len(self.devices)
        self.distribution, self.num_replicas_in_sync = None, 1
        if name == "data-parallel":
            self.distribution = keras.distribution.DataParallel(devices=self.devices)
            self.num_replicas_in_sync = count
        elif name == "model-parallel":
            mesh = keras.distribution.DeviceMesh((1, count), ["batch", "model"], self.devices)
            self.distribution = keras.distribution.ModelParallel(
                layout_map=layout_map(mesh), batch_dim_name="batch")

    def check(self, num_heads, mlp_dim, batch_size):
        """Raises ValueError saying what to change when the model or batch cannot be split
        over the devices."""
        count = len(self.devices)
        if self.name == "data-parallel" and batch_size % count:
            raise ValueError(f"--distribution data-parallel splits each batch over {count} "
                             f"devices: --batch-size {batch_size} is not a multiple of {count}.")
        if self.name == "model-parallel" and (num_heads % count or mlp_dim % count):
            raise ValueError(
                f"--distribution model-parallel splits the attention heads and the MLP over "
                f"{count} devices, but this model has {num_heads} heads and an MLP of "
                f"{mlp_dim}: use a variant whose head count {count} divides (S: 6, B: 12, "
                f"L: 16), or fewer devices (CUDA_VISIBLE_DEVICES, XLA_FLAGS).")

    def pad_for_devices(self, dataset):
        """Evaluation batches (images, one-hot labels) as (images, labels, sample weights),
        each batch padded to a multiple of the device count with rows of weight 0; the
        dataset itself where no padding can be needed."""
        if self.name != "data-parallel" or len(self.devices) == 1:
            return dataset
        import tensorflow as tf

        count = len(self.devices)

        def pad(images, labels):
            size = tf.shape(images)[0]
            extra = (count - size % count) % count
            weights = tf.concat([tf.ones([size]), tf.zeros([extra])], 0)

            def padded(x):
                return tf.concat([x, tf.zeros(tf.concat([[extra], tf.shape(x)[1:]], 0),
                                              x.dtype)], 0)

            return padded(images), padded(labels), weights

        return dataset.map(pad)

    def scope(self):
        """Builds, trains and evaluates under the distribution (Keras' global one is restored
        after the block)."""
        return self.distribution.scope() if self.distribution else contextlib.nullcontext()

    def describe(self):
        kinds = sorted({d.split(":")[0] for d in self.devices})
        where = f"{len(self.devices)} {'/'.join(kinds).upper()} device(s)"
        if self.name == "none":
            return f"JAX, one device ({self.devices[0].split(':')[0].upper()})"
        return f"JAX keras.distribution {self.name} over {where}"
