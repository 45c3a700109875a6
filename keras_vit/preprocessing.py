"""Input scaling shared by training, inference and export: RGB in [0, 255] -> [-1, 1]."""

from keras import ops


def preprocess(images, image_size=None):
    """Scales RGB images from [0, 255] to [-1, 1], as the ViT checkpoints expect.

    Args:
        images: `(batch, H, W, 3)` or `(H, W, 3)` uint8 or float images in [0, 255].
        image_size: optional int or (height, width) to resize to (bilinear, with
            antialiasing when shrinking).

    Returns:
        float32 images in [-1, 1].
    """
    x = ops.cast(images, "float32")
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        x = ops.image.resize(x, size, interpolation="bilinear", antialias=True)
    return x / 127.5 - 1.0
