import keras
from keras import ops


def patch_grid(height, width, patch_size):
    """Returns the (rows, cols) patch grid of an image, or raises a ValueError saying how to fix it."""
    problems = []
    for side, size in (("height", height), ("width", width)):
        if size is None:
            raise ValueError(
                f"Image {side} must be known when the model is built (got None); "
                "pass image_size=(height, width)."
            )
        if size % patch_size:
            lower = (size // patch_size) * patch_size
            upper = lower + patch_size
            options = f"{lower} or {upper}" if lower else f"{upper}"
            problems.append(f"{side} {size} -> use {options}")
    if problems:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by the patch size {patch_size}: "
            f"{'; '.join(problems)}. Resize or crop the images to a multiple of "
            f"{patch_size}, or choose a patch size that divides both sides."
        )
    return height // patch_size, width // patch_size


@keras.saving.register_keras_serializable(package="keras_vit")
class Patches(keras.layers.Layer):
    """Cuts images into non-overlapping square patches and flattens each one.

    A `(batch, H, W, C)` image becomes `(batch, H/P * W/P, P*P*C)`: patches in
    row-major order, each flattened in (row, column, channel) order, which is
    the order of the original Flax patch-embedding kernel `(P, P, C, D)`.
    Non-square images work; H and W must each be divisible by P.

    Args:
        patch_size: int, the side P of each square patch.
    """

    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self.grid = patch_grid(input_shape[1], input_shape[2], self.patch_size)
        self.num_channels = input_shape[3]

    def call(self, images):
        p = self.patch_size
        rows, cols = self.grid
        x = ops.reshape(images, (-1, rows, p, cols, p, self.num_channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, rows * cols, p * p * self.num_channels))

    def compute_output_shape(self, input_shape):
        rows, cols = patch_grid(input_shape[1], input_shape[2], self.patch_size)
        return (input_shape[0], rows * cols, self.patch_size**2 * input_shape[3])

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}
