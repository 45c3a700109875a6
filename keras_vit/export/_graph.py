"""The inference graph every format is exported from, and the TF Serving SavedModel.

All formats take RGB pixels in [0, 255] and return class probabilities. The preprocessing is
`keras_vit.images`' (the training pipeline's), traced into the graph: the SavedModel
decodes, resizes any size to the model's (bilinear, antialiased, rounded to whole pixel
values) and normalises; the fixed-size formats only normalise.
"""

from pathlib import Path

import keras
import tensorflow as tf

from keras_vit import images as image_path
from keras_vit.model import class_probabilities

SERVING_DEFAULT = "serving_default"
FLOAT_SIGNATURE = "predict_images"
UINT8_SIGNATURE = "predict_images_uint8"
OUTPUT_NAMES = ("probabilities", "top_k_scores", "top_k_indices", "top_k_labels")


class InferenceModel(keras.Model):
    """Pixels in [0, 255] at the model size -> class probabilities, always in inference mode.

    Args:
        model: the trained model (normalised inputs, outputs logits or probabilities).
        image_size: (height, width) the model takes.
        normalization: how the model's inputs are scaled (`keras_vit.images.Normalization`).
        outputs_probabilities: whether the model's outputs already are probabilities.
    """

    def __init__(self, model, image_size, normalization="vit", outputs_probabilities=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.image_size = tuple(int(s) for s in image_size)
        self.normalization = image_path.as_normalization(normalization)
        self.outputs_probabilities = outputs_probabilities

    def call(self, pixels):
        return self.classify(image_path.normalize(pixels, self.normalization))

    def classify(self, normalized):
        """Normalised images at the model size -> probabilities (float32)."""
        return class_probabilities(self.model, self.model(normalized, training=False),
                                   self.outputs_probabilities)


def inputs_from_pixels(images, image_size, normalization):
    """What the serving signatures feed the model from pixels (uint8 or float, any size):
    the training pipeline's resize and normalisation (`keras_vit.images`)."""
    return image_path.normalize(image_path.resize_pixels(images, image_size), normalization)


def inputs_from_bytes(image_bytes, image_size, normalization):
    """What `serving_default` feeds the model from a batch of encoded images: each decoded
    (checked: bytes that are not an image name their index), then as `inputs_from_pixels`."""
    def one(args):
        data, index = args
        return inputs_from_pixels(image_path.decode_image_checked(data, index), image_size,
                                  normalization)

    return tf.map_fn(one, (image_bytes, tf.range(tf.shape(image_bytes)[0])),
                     fn_output_signature=tf.TensorSpec((*image_size, 3), tf.float32))


def serving_functions(infer, class_names, top_k=5):
    """The signature functions of the SavedModel: (from_bytes, from_pixels).

    Both preprocess as training does (`inputs_from_bytes`, `inputs_from_pixels`) and then
    share one traced function for the model, so the model is traced once, not once per
    signature.
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

    def from_bytes(image_bytes):
        return classify(inputs_from_bytes(image_bytes, image_size, infer.normalization))

    def from_pixels(images):
        return classify(inputs_from_pixels(images, image_size, infer.normalization))

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
