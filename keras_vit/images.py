"""The one image path: decode, convert to RGB, resize and normalise.

Training's `tf.data` pipeline, the SavedModel's serving signatures, export verification and
`predict` all call these functions, so a deployed model sees exactly the pixels training saw:
images are resized bilinearly with antialiasing and rounded to whole pixel values (as uint8),
then normalised by the model's `Normalization` ([-1, 1] for Google's ViT weights).

`preprocess` is the same maths in `keras.ops` for any Keras backend (notebooks, JAX); the
functions below it use TensorFlow, imported when they are first called.
"""

import dataclasses
import numbers

from keras_vit.errors import NotAnImageError

IMAGE_FORMATS = "JPEG, PNG, BMP or GIF"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# First bytes of each format tf.io.decode_image reads.
_MAGIC = ((b"\xff\xd8\xff", 3), (b"\x89PNG", 4), (b"GIF8", 4), (b"BM", 2))
NOT_AN_IMAGE = "is not a decodable image: expected " + IMAGE_FORMATS + " bytes"


@dataclasses.dataclass(frozen=True)
class Normalization:
    """How a model's inputs are scaled from RGB pixels in [0, 255]: `(pixel - mean) / std`.

    `mean` and `std` are per channel, in pixel units. Google's ViT weights take [-1, 1]
    ("vit": mean = std = 127.5); DeiT's and most PyTorch weights ImageNet's statistics
    ("imagenet"); "none" leaves the pixels as they are (a model that scales its own input).
    """

    name: str
    mean: tuple
    std: tuple

    @property
    def uniform(self):
        """Whether every channel has the same mean and std (what MediaPipe's metadata takes)."""
        return len(set(self.mean)) == 1 and len(set(self.std)) == 1

    def to_config(self):
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}

    def apply(self, pixels):
        """float pixels in [0, 255] (any array type) -> normalised. Written as
        `x / std - mean / std` so that "vit" is exactly `x / 127.5 - 1`."""
        if self.uniform:
            return pixels / self.std[0] - self.mean[0] / self.std[0]
        import numpy as np

        std = np.asarray(self.std, np.float32)
        return pixels / std - np.asarray(self.mean, np.float32) / std


NORMALIZATIONS = {
    "vit": Normalization("vit", (127.5,) * 3, (127.5,) * 3),
    "imagenet": Normalization("imagenet", tuple(255.0 * m for m in (0.485, 0.456, 0.406)),
                              tuple(255.0 * s for s in (0.229, 0.224, 0.225))),
    "none": Normalization("none", (0.0,) * 3, (1.0,) * 3),
}


def as_normalization(spec="vit"):
    """A `Normalization` from a name ("vit", "imagenet", "none"), a dict with "mean" and
    "std" (pixel units, one value or one per channel), or a `Normalization`."""
    if spec is None:
        return NORMALIZATIONS["vit"]
    if isinstance(spec, Normalization):
        return spec
    if isinstance(spec, str):
        if spec not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)} or a dict "
                             f"with 'mean' and 'std' in pixel units, got {spec!r}.")
        return NORMALIZATIONS[spec]
    if isinstance(spec, dict) and {"mean", "std"} <= set(spec):
        mean, std = (_channels(spec[key], key) for key in ("mean", "std"))
        if len(mean) != len(std):
            raise ValueError(f"normalization mean {mean} and std {std} differ in length.")
        if any(s <= 0 for s in std):
            raise ValueError(f"normalization std must be positive, got {std}.")
        for name, known in NORMALIZATIONS.items():
            if (known.mean, known.std) == (mean, std):
                return known
        return Normalization(spec.get("name", "custom"), mean, std)
    raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)} or a dict with "
                     f"'mean' and 'std' in pixel units, got {spec!r}.")


def _channels(value, key):
    values = (value,) * 3 if isinstance(value, numbers.Real) else tuple(value)
    if not values or not all(isinstance(v, numbers.Real) for v in values):
        raise ValueError(f"normalization {key} must be a number or one number per channel, "
                         f"got {value!r}.")
    return tuple(float(v) for v in values)


def image_size_pair(image_size):
    """An int or (height, width) -> (height, width) of positive ints, or a ValueError."""
    sides = (image_size, image_size) if isinstance(image_size, numbers.Integral) else image_size
    try:
        height, width = sides
    except (TypeError, ValueError):
        height = width = None
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1
               for s in (height, width)):
        raise ValueError(f"image_size must be a positive int or (height, width) of positive "
                         f"ints, got {image_size!r}.")
    return int(height), int(width)


def preprocess(images, image_size=None, normalization="vit"):
    """RGB images in [0, 255] -> the model's input: optionally resized, then normalised.

    Any Keras backend (`keras.ops`). The resize is the training pipeline's: bilinear with
    antialiasing, rounded to whole pixel values.

    Args:
        images: `(batch, H, W, C)` or `(H, W, C)` uint8 or float images in [0, 255].
        image_size: optional int or (height, width) to resize to.
        normalization: "vit" ([-1, 1], Google's ViT weights; the default), "imagenet",
            "none", a dict with "mean" and "std" in pixel units, or a `Normalization`
            (a model's own: `model.normalization`).

    Returns:
        float32 images.

    Raises:
        ValueError: `images` is not one image `(H, W, C)` or a batch of them.
    """
    from keras import ops

    rank = len(getattr(images, "shape", ()))
    if rank not in (3, 4):
        shape = getattr(images, "shape", None)
        raise ValueError(f"preprocess takes images shaped (height, width, channels) or "
                         f"(batch, height, width, channels), got shape {shape}.")
    x = ops.cast(images, "float32")
    if image_size is not None:
        x = ops.image.resize(x, image_size_pair(image_size), interpolation="bilinear",
                             antialias=True)
        # Rounded back to whole pixel values, as the training pipeline and the serving graph
        # do (they hold resized images as uint8).
        x = ops.clip(ops.round(x), 0.0, 255.0)
    return as_normalization(normalization).apply(x)


# --- TensorFlow: the pipelines, the serving graph, verification and predict ----------------

def is_image_bytes(data):
    """Whether `data` starts like a JPEG, PNG, GIF or BMP file (what decode_image reads)."""
    return any(data[:n] == magic for magic, n in _MAGIC)


def decode_image(contents):
    """Encoded JPEG/PNG/BMP/GIF bytes (a scalar string tensor) -> uint8 `(H, W, 3)`:
    grayscale, palette and RGBA images become RGB; a GIF gives its first frame."""
    import tensorflow as tf

    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_image_checked(contents, index=None):
    """`decode_image` in a serving graph: bytes that are not JPEG/PNG/GIF/BMP raise
    InvalidArgumentError saying the input is not a decodable image (and its index)."""
    import tensorflow as tf

    ok = tf.reduce_any([tf.equal(tf.strings.substr(contents, 0, n), magic)
                        for magic, n in _MAGIC])
    where = "input" if index is None else tf.strings.format("image_bytes[{}]", index)
    check = tf.debugging.Assert(ok, [tf.strings.join([where, " " + NOT_AN_IMAGE])])
    with tf.control_dependencies([check]):
        return decode_image(contents)


def to_rgb(image):
    """uint8 `(H, W, 1|3|4)` -> `(H, W, 3)` (TFDS images keep their own channels)."""
    import tensorflow as tf

    channels = image.shape[-1]
    if channels == 1:
        return tf.image.grayscale_to_rgb(image)
    if channels == 4:
        return image[..., :3]
    return image


def resize_pixels(images, image_size):
    """Pixels (uint8 or float, `(..., H, W, C)`, any size) -> float32 pixels at `image_size`:
    bilinear, antialiased, rounded to whole values in [0, 255]."""
    import tensorflow as tf

    resized = tf.image.resize(tf.cast(images, tf.float32), image_size_pair(image_size),
                              method="bilinear", antialias=True)
    return tf.clip_by_value(tf.round(resized), 0.0, 255.0)


def resize_image(image, image_size):
    """`resize_pixels` kept as uint8, as the training pipeline caches images."""
    import tensorflow as tf

    return tf.cast(resize_pixels(image, image_size), tf.uint8)


def normalize(pixels, normalization="vit"):
    """uint8 or float pixels in [0, 255] -> float32 model inputs (TensorFlow)."""
    import tensorflow as tf

    return as_normalization(normalization).apply(tf.cast(pixels, tf.float32))


def read_image_file(path):
    """(encoded bytes, uint8 RGB `(h, w, 3)` array) of one image file, decoded by
    `decode_image`; raises NotAnImageError (in the project's words: the file, what is wrong)
    for an empty, damaged, truncated or non-image file, and OSError if it cannot be read."""
    from pathlib import Path

    data = Path(path).read_bytes()
    image, problem = decode_bytes(data)
    if problem:
        raise NotAnImageError(f"{path}: {problem}")
    return data, image


def decode_bytes(data):
    """(uint8 RGB `(h, w, 3)` array, None) for encoded image bytes, or (None, what is wrong
    with them: not an image, damaged or truncated, empty)."""
    import tensorflow as tf

    if not is_image_bytes(data):
        return None, ("an empty file" if not data else "not an image") + \
            f" (expected a {IMAGE_FORMATS} file)"
    try:
        image = decode_image(tf.constant(data)).numpy()
    except tf.errors.OpError:
        return None, f"damaged or truncated {image_kind(data)} data (it does not decode)"
    if image.shape[0] == 0 or image.shape[1] == 0:
        return None, "an empty image (0 pixels)"
    return image, None


def image_kind(data):
    """"JPEG", "PNG", "GIF" or "BMP" from a file's first bytes, else "image"."""
    for (magic, n), kind in zip(_MAGIC, ("JPEG", "PNG", "GIF", "BMP")):
        if data[:n] == magic:
            return kind
    return "image"
