"""Input scaling shared by training, inference and export: RGB in [0, 255] -> [-1, 1]."""

from keras import ops


def preprocess(images, image_size=None):
    """Scales RGB images from [0, 255] to [-1, 1], as the ViT checkpoints expect.

    Args:
        images: `(batch, H, W, 3)` or `(H, W, 3)` uint8 or float images in [0, 255].
        image_size: optional int or (height, width) to resize to (bilinear, with
            antialiasing when shrinking, rounded to whole pixel values).

    Returns:
        float32 images in [-1, 1].
    """
    x = ops.cast(images, "float32")
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        x = ops.image.resize(x, size, interpolation="bilinear", antialias=True)
        # Rounded back to whole pixel values, as the training pipeline and the exported
        # serving graph do (they hold resized images as uint8).
        x = ops.clip(ops.round(x), 0.0, 255.0)
    return x / 127.5 - 1.0
