"""Batch augmentation in tf.data with Keras core layers (TensorFlow only).

Augmentation runs in the input pipeline, never inside the model, so the model
that is saved and exported contains no random layers.
"""

import dataclasses

import keras
import tensorflow as tf

from keras_vit.data import normalize


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What to apply to training batches.

    Args:
        flip: random horizontal flips (off for data where mirroring changes the
            class, such as digits).
        translate: fraction of the image size for random shifts (pad-and-crop style).
        rotate: largest random rotation, as a fraction of a full turn (0.05 = 18 degrees).
        zoom: largest random zoom in or out, as a fraction of the size.
        randaugment: RandAugment strength in [0, 1] (Keras `factor`); 0 turns it off.
        mixup: MixUp alpha; 0 turns it off.
        cutmix: CutMix factor; 0 turns it off. With both, each batch gets one of the two.
    """

    flip: bool = True
    translate: float = 0.0
    rotate: float = 0.0
    zoom: float = 0.0
    randaugment: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0


def make_augmenter(config, num_classes, seed=0):
    """Returns fn(uint8 images, int labels) -> (float32 images in [-1, 1], one-hot labels)."""
    pixel_layers = []
    if config.flip:
        pixel_layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if config.translate:
        pixel_layers.append(keras.layers.RandomTranslation(
            config.translate, config.translate, fill_mode="constant", seed=seed + 1))
    if config.rotate:
        pixel_layers.append(keras.layers.RandomRotation(
            config.rotate, fill_mode="constant", seed=seed + 5))
    if config.zoom:
        pixel_layers.append(keras.layers.RandomZoom(
            config.zoom, config.zoom, fill_mode="constant", seed=seed + 6))
    if config.randaugment:
        pixel_layers.append(keras.layers.RandAugment(value_range=(0, 255),
                                                     factor=config.randaugment, seed=seed + 2))
    mixers = []
    if config.mixup:
        mixers.append(keras.layers.MixUp(alpha=config.mixup, seed=seed + 3))
    if config.cutmix:
        mixers.append(keras.layers.CutMix(factor=config.cutmix, seed=seed + 4))

    def augment(images, labels):
        images = tf.cast(images, tf.float32)
        for layer in pixel_layers:
            images = layer(images, training=True)
        labels = tf.one_hot(labels, num_classes)
        if mixers:
            batch = {"images": images, "labels": labels}
            if len(mixers) == 1:
                batch = mixers[0](batch, training=True)
            else:
                use_mixup = tf.random.uniform([]) < 0.5
                batch = tf.cond(use_mixup, lambda: mixers[0](batch, training=True),
                                lambda: mixers[1](batch, training=True))
            images, labels = batch["images"], batch["labels"]
        images = tf.clip_by_value(images, 0.0, 255.0)
        return normalize(images), labels

    return augment


def prepare_evaluation(num_classes):
    """fn(uint8 images, int labels) -> (float32 images in [-1, 1], one-hot labels)."""

    def prepare(images, labels):
        return normalize(images), tf.one_hot(labels, num_classes)

    return prepare
