"""DeiT's distillation (Touvron et al. 2021): a student ViT trained against a teacher's
predictions, and the teacher (in `keras.ops`: any backend `model.fit` runs on).

    student = keras_vit.build("DeiT-Ti/4", image_size=16, num_classes=10)   # distilled
    trainer = Distiller(student, teacher, mode="hard")
    trainer.compile(optimizer=..., metrics=[keras.metrics.CategoricalAccuracy("accuracy")])
    trainer.fit(batches_of_normalised_images_and_one_hot_labels, ...)

- hard: the distillation head learns the teacher's argmax by cross-entropy; the loss is
  `(1 - alpha) * CE(class head, labels) + alpha * CE(distillation head, teacher argmax)`,
  DeiT's with alpha 0.5;
- soft: the distillation head matches the teacher's probabilities at temperature T (KL
  divergence times T^2, Hinton et al.), weighted by alpha the same way.

A student without a distillation token (a plain ViT) distils through its class head (the
`alpha` mix of both losses on the one head). The teacher runs in inference mode on the same
(augmented) images, which it gets as pixels in [0, 255]: a keras-vit `ViT` teacher is
normalised and resized as it expects; any other Keras model must take RGB pixels in [0, 255]
(with its preprocessing inside, as `small_resnet`'s). Metrics and evaluation read the mean of
the two heads, what the student returns at inference.
"""

import keras
import numpy as np
from keras import ops

from keras_vit.images import as_normalization
from keras_vit.keras_internals import BuiltBeforeFirstTrace


def teacher_inputs(teacher, image_size):
    """fn(pixels in [0, 255] at the student's size) -> what `teacher` takes."""
    from keras_vit.model import ViT

    size = tuple(int(s) for s in teacher.inputs[0].shape[1:3])
    normalization = teacher.normalization if isinstance(teacher, ViT) else as_normalization("none")

    def prepare(pixels):
        if size != tuple(image_size):
            pixels = ops.image.resize(pixels, size, interpolation="bilinear", antialias=True)
        return normalization.apply(pixels)

    return prepare


def _replicas():
    """Replicas whose gradients a tf.distribute strategy sums (1 elsewhere: JAX's
    keras.distribution computes the loss of the global batch)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


class Distiller(BuiltBeforeFirstTrace, keras.Model):
    """Trains `student` against `teacher` (see the module doc); its weights are the student's
    and the (frozen) teacher's. Save `student`, not this."""

    def __init__(self, student, teacher, *, mode="hard", alpha=0.5, temperature=3.0,
                 label_smoothing=0.0, **kwargs):
        super().__init__(name=f"{student.name}_distiller", **kwargs)
        from keras_vit.model import distillation_model

        if mode not in ("hard", "soft"):
            raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}.")
        self.student = student
        self.two_heads = distillation_model(student) if student.head_dist is not None else None
        self.teacher = teacher
        self.teacher.trainable = False
        self.mode, self.alpha = mode, float(alpha)
        self.temperature, self.label_smoothing = float(temperature), float(label_smoothing)
        self.dtype_policy = student.dtype_policy  # (a loss-scale optimizer under mixed_float16)
        self._normalization = student.normalization
        self._to_teacher = teacher_inputs(teacher, student.image_size)
        # Its parts are built models: a resumed run loads its backup before the first call.
        self.built = True

    def call(self, images, training=None):
        if self.two_heads is None:
            logits = self.student(images, training=training)
            return {"class": logits, "distillation": logits}
        return self.two_heads(images, training=training)

    def _teacher_logits(self, images):
        norm = self._normalization
        pixels = (ops.cast(images, "float32") * np.asarray(norm.std, np.float32)
                  + np.asarray(norm.mean, np.float32))  # the student's inputs back to pixels
        return ops.cast(self.teacher(self._to_teacher(pixels), training=False), "float32")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        head = ops.cast(y_pred["class"], "float32")
        dist = ops.cast(y_pred["distillation"], "float32")
        y = ops.cast(y, "float32")
        if not training:  # evaluation: the loss of what the student answers
            loss = keras.losses.categorical_crossentropy(
                y, (head + dist) / 2, from_logits=True, label_smoothing=self.label_smoothing)
        else:
            teacher = ops.stop_gradient(self._teacher_logits(x))
            labels = keras.losses.categorical_crossentropy(
                y, head, from_logits=True, label_smoothing=self.label_smoothing)
            if self.mode == "hard":
                target = ops.one_hot(ops.argmax(teacher, axis=-1), ops.shape(teacher)[-1])
                distilled = keras.losses.categorical_crossentropy(target, dist, from_logits=True)
            else:
                t = self.temperature
                distilled = t * t * keras.losses.kl_divergence(
                    ops.softmax(teacher / t), ops.softmax(dist / t))
            loss = (1.0 - self.alpha) * labels + self.alpha * distilled
        if sample_weight is not None:  # (evaluation rows that pad a batch for the devices)
            loss = loss * ops.cast(sample_weight, "float32")
        # As Keras' losses: a mean over the batch, each tf.distribute replica taking its share.
        return ops.mean(loss) / _replicas()

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        average = (ops.cast(y_pred["class"], "float32")
                   + ops.cast(y_pred["distillation"], "float32")) / 2
        return super().compute_metrics(x, y, average, sample_weight)


def small_resnet(image_size, num_classes, blocks_per_stage=2, name="resnet_teacher"):
    """A small ResNet for the data (CIFAR's ResNet-6n+2: three stages of 16, 32 and 64 filters,
    `blocks_per_stage` basic blocks each; 2: ResNet-14), taking RGB pixels in [0, 255]: the
    convolutional teacher `--teacher resnet` trains first. (Keras' applications' ResNets start
    at 32x32 inputs and 23M weights: too big a teacher for small images.)"""
    layers = keras.layers
    # Moving statistics that keep up with a short run: at Keras' default momentum (0.99) a
    # teacher trained for a few hundred steps evaluates on stale statistics (measured on a
    # quarter of digits, 50 epochs: test accuracy 17% at 0.99, 94% at 0.9; PyTorch's 0.1).
    def norm():
        return layers.BatchNormalization(momentum=0.9)

    images = keras.Input((*image_size, 3), name="images")
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(images)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = layers.ReLU()(norm()(x))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
            y = layers.ReLU()(norm()(y))
            y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
            y = norm()(y)
            if stride != 1 or shortcut.shape[-1] != filters:
                shortcut = norm()(layers.Conv2D(
                    filters, 1, strides=stride, use_bias=False)(shortcut))
            x = layers.ReLU()(layers.Add()([shortcut, y]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(images, outputs, name=name)
