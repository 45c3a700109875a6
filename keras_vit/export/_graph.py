"""The inference graph every format is exported from, and the TF Serving SavedModel.

All formats take RGB pixels in [0, 255] and return class probabilities. The preprocessing
is `keras_vit.preprocess`, the function training's pipeline matches, traced into the graph:
the SavedModel resizes any size to the model's (bilinear, antialiased, rounded to whole
pixel values) and scales to [-1, 1]; the fixed-size formats only scale.
"""

from pathlib import Path

import keras
import tensorflow as tf

from keras_vit.model import class_probabilities
from keras_vit.preprocessing import preprocess

IMAGE_FORMATS = "JPEG, PNG, BMP or GIF"
# First bytes of each format tf.io.decode_image reads.
_MAGIC = ((b"\xff\xd8\xff", 3), (b"\x89PNG", 4), (b"GIF8", 4), (b"BM", 2))
NOT_AN_IMAGE = "is not a decodable image: expected " + IMAGE_FORMATS + " bytes"

SERVING_DEFAULT = "serving_default"
FLOAT_SIGNATURE = "predict_images"
UINT8_SIGNATURE = "predict_images_uint8"
OUTPUT_NAMES = ("probabilities", "top_k_scores", "top_k_indices", "top_k_labels")


class InferenceModel(keras.Model):
    """Pixels in [0, 255] at the model size -> class probabilities, always in inference mode.

    Args:
        model: the trained model (inputs in [-1, 1], outputs logits).
        image_size: (height, width) the model takes.
    """

    def __init__(self, model, image_size, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.image_size = tuple(int(s) for s in image_size)

    def call(self, pixels):
        return self.classify(preprocess(pixels))  # [0, 255] -> [-1, 1]

    def classify(self, normalized):
        """[-1, 1] images at the model size -> probabilities (float32)."""
        return class_probabilities(self.model, self.model(normalized, training=False))


def is_image_bytes(data):
    """Whether `data` starts like a JPEG, PNG, GIF or BMP file (what decode_image reads)."""
    return any(data[:n] == magic for magic, n in _MAGIC)


def decode_image_tf(data, index=None):
    """Encoded image bytes (scalar string) -> uint8 RGB `(h, w, 3)`, in-graph.

    Bytes that are not JPEG/PNG/GIF/BMP raise InvalidArgumentError saying the input is
    not a decodable image (and its index in the batch); grey, palette and RGBA images
    become RGB; a GIF gives its first frame.
    """
    ok = tf.reduce_any([tf.equal(tf.strings.substr(data, 0, n), magic) for magic, n in _MAGIC])
    where = "input" if index is None else tf.strings.format("image_bytes[{}]", index)
    check = tf.debugging.Assert(ok, [tf.strings.join([where, " " + NOT_AN_IMAGE])])
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_pixels(images, image_size):
    """Pixels (uint8 or float, any size) -> float32 pixels at `image_size` as training sees
    them: `keras_vit.preprocess`'s bilinear antialiased resize, rounded to whole values."""
    normalized = preprocess(images, image_size)
    return keras.ops.round((normalized + 1.0) * 127.5)  # exact: preprocess rounds, then /127.5


def serving_functions(infer, class_names, top_k=5):
    """The signature functions of the SavedModel: (from_bytes, from_pixels).

    Both preprocess with `keras_vit.preprocess(images, image_size)` (resize to the model
    size, round, scale to [-1, 1]), as training does, and then share one traced function
    for the model, so the model is traced once, not once per signature.
    """
    image_size = infer.image_size
    k = min(int(top_k), len(class_names))
    labels = tf.constant([str(c) for c in class_names], dtype=tf.string)

    @tf.function(input_signature=[tf.TensorSpec([None, *image_size, 3], tf.float32)],
                 autograph=False)
    def classify(normalized):
        probabilities = infer.classify(normalized)
        scores, indices = tf.math.top_k(probabilities, k=k)
        return {"probabilities": probabilities, "top_k_scores": scores,
                "top_k_indices": indices, "top_k_labels": tf.gather(labels, indices)}

    def decode_and_preprocess(args):
        data, index = args
        return preprocess(decode_image_tf(data, index), image_size)

    def from_bytes(image_bytes):
        n = tf.shape(image_bytes)[0]
        normalized = tf.map_fn(decode_and_preprocess, (image_bytes, tf.range(n)),
                               fn_output_signature=tf.TensorSpec((*image_size, 3), tf.float32))
        return classify(normalized)

    def from_pixels(images):
        return classify(preprocess(images, image_size))

    return from_bytes, from_pixels


def write_saved_model(infer, class_names, path, top_k=5):
    """Writes the TF Serving SavedModel of `infer` (an InferenceModel) to `path`.

    Signatures: `serving_default` (image_bytes: string [batch]), `predict_images`
    (images: float32 [batch, H, W, 3] in [0, 255]) and `predict_images_uint8` (uint8),
    each returning probabilities, top_k_scores, top_k_indices and top_k_labels.
    `export_run` writes it into its staging folder and moves it into place once verified.
    """
    path = Path(path)
    from_bytes, from_pixels = serving_functions(infer, class_names, top_k)
    # No archive.track(infer): add_endpoint tracks the variables the functions use, while
    # track() would also save the Keras wrappers of those variables, doubling the size
    # (as keras.Model.export does in Keras 3.15).
    archive = keras.export.ExportArchive()
    archive.add_endpoint(SERVING_DEFAULT, from_bytes, input_signature=[
        tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint(FLOAT_SIGNATURE, from_pixels, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
    archive.add_endpoint(UINT8_SIGNATURE, from_pixels, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    archive.write_out(str(path), verbose=False)
    return path


def write_fixed_size_saved_model(infer, path):
    """A one-signature SavedModel for the converters: float32 pixels [batch, H, W, 3] at the
    model size (no resize, whose antialiased form has no TFLite op) -> probabilities."""
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serve", lambda images: {"probabilities": infer(images)},
                         input_signature=[tf.TensorSpec([None, *infer.image_size, 3], tf.float32,
                                                        name="images")])
    archive.write_out(str(path), verbose=False)
    return path
