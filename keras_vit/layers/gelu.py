import math

from keras import ops

GELU_FORMS = ("tanh", "erf")


def gelu(x, form="tanh"):
    """GELU in the form a checkpoint was trained with.

    "tanh" is the tanh approximation (Flax/JAX's default, so the original ViT
    checkpoints); "erf" is the exact form PyTorch, timm and Hugging Face use.
    The exact form is written with `erf` rather than `erfc` (which
    `tf.nn.gelu(approximate=False)` uses) because `erfc` has no ONNX op.
    """
    if form == "tanh":
        return ops.gelu(x, approximate=True)
    if form == "erf":
        return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))
    raise ValueError(f"gelu must be one of {GELU_FORMS}, got {form!r}.")
