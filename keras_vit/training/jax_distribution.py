"""`keras-vit train` on the JAX backend: Keras 3's own way to scale, `keras.distribution`.

    KERAS_BACKEND=jax keras-vit train                                   # one device
    KERAS_BACKEND=jax keras-vit train --distribution data-parallel      # all local devices
    KERAS_BACKEND=jax keras-vit train --distribution model-parallel     # kernels sharded

- "data-parallel": `keras.distribution.DataParallel` over every local device: the global batch
  is split across them, the weights replicated.
- "model-parallel": `keras.distribution.ModelParallel` on a mesh of ("batch", "model") axes
  (all devices on "model"): the large kernels are sharded over "model" as Megatron does
  (`layout_map`): the attention's query/key/value kernels by output feature (head_dim), its
  output kernel by input feature, the MLP's first kernel by output and second by input.

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
    layouts[attention + "(query|key|value)_kernel"] = (None, None, "model")  # (D, H, hd)
    layouts[attention + "(query|key|value)_bias"] = (None, "model")
    layouts[attention + "out_kernel"] = (None, "model", None)                # (H, hd, D)
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
