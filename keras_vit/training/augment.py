"""Batch augmentation in tf.data with Keras core layers (TensorFlow only).

Augmentation runs in the input pipeline, never inside the model, so the model
that is saved and exported contains no random layers. Every random draw of a batch comes
from that batch's own seed (`BatchSeeds`), not from the layers' seed state, which the
parallel calls of a `tf.data` map would take in whatever order threads run: so a run is
reproducible, and a resumed run augments each batch as the uninterrupted run did.
"""

import dataclasses

import keras
import tensorflow as tf

from keras_vit.images import normalize
from keras_vit.training.data import as_written
from keras_vit.keras_internals import StatelessSeeds, apply_seeded, layer_seed_generator


class BatchSeeds(StatelessSeeds):
    """Seeds for Keras' random ops derived from one seed tensor, without state.

    Given as `seed=` to a layer's `get_random_transformation` (or to `keras.random`), each
    draw gets the next seed of a sequence folded from `seed`: the draws depend on `seed` and
    on the order of the draws in the traced function alone. A `keras.random.SeedGenerator`
    keeps its seed in a variable, which parallel calls of a `tf.data` map advance in
    whatever order their threads run. Create one inside the traced function, per call.

    Args:
        seed: an integer tensor of shape (2,), e.g. a batch's (run seed, batch number).
    """

    def __init__(self, seed):
        super().__init__()
        self.seed = tf.convert_to_tensor(seed)
        self.draws = 0

    def next(self, ordered=True):
        self.draws += 1
        # Both halves random (fold_in's own result is (hash, draw number), and Keras keeps
        # the hash mod 2^31: batches would share all their draws once in ~2^31 pairs).
        return tf.random.stateless_uniform(
            [2], seed=tf.random.experimental.stateless_fold_in(
                self.seed, tf.constant(self.draws, self.seed.dtype)),
            minval=None, maxval=None, dtype=tf.int32)


class _Solarization(keras.layers.Solarization):
    """Keras' Solarization with the threshold drawn from its whole `threshold_factor` range
    (Keras draws from [factor[0], factor[1] * 255], the low end unscaled, so every range
    solarizes from near 0)."""

    def get_random_transformation(self, data, training=True, seed=None):
        transformation = super().get_random_transformation(data, training, seed)
        if transformation is not None:
            low, high = self.threshold_factor
            transformation["thresholds"] = self.backend.random.uniform(
                self.backend.shape(transformation["thresholds"]), low * 255, high * 255,
                seed=seed or layer_seed_generator(self),
                dtype=self.compute_dtype)
        return transformation


class _PerImageEqualization(keras.layers.Equalization):
    """Keras' Equalization with each image equalized by its own histogram, as PIL's
    ImageOps.equalize (Keras' takes one histogram over the whole batch)."""

    def transform_images(self, images, transformation, training=True):
        one_image = super().transform_images
        if len(images.shape) == 3:
            return one_image(images, transformation, training)
        return tf.map_fn(lambda image: one_image(image, transformation, training), images)


class PerImageRandAugment(keras.layers.RandAugment):
    """RandAugment (Cubuk et al., 2020) with each image's operations drawn for that image.

    Keras' `RandAugment` draws its `num_ops` operations once per batch, so every image of a
    batch gets the same ones, and it computes all 11 operations on the whole batch in each of
    the `num_ops` rounds to keep the drawn one (22 image transforms per image at the default
    2 ops). Here every image draws its own operation in each round and the batch is
    partitioned by operation, so each image goes through its `num_ops` transforms only
    (about 15x faster at 224x224, batch 128).

    The operations are Keras' layers with the paper's (and timm's) ranges at magnitude
    M = 10 * factor, both directions where the paper has a random sign, each image's
    strength drawn uniformly up to M: rotation +-30 deg * factor, shear +-0.3 * factor,
    translation +-0.45 * factor of the size, brightness +-0.45 * factor of the range (PIL's
    enhance factor 1 +- 0.9 * factor at mid-grey), contrast and sharpness 1 +- 0.9 * factor,
    colour desaturated by up to 0.9 * factor, posterize to 8 - 4 * factor bits, solarize
    (invert) above a threshold in the top `factor` of the range; autocontrast and equalize
    (each image by its own histogram). Geometric operations fill with mid-grey. Keras' own
    layer at factor 0.5 rotates by 0 to 180 deg one way, shifts by up to half the size one
    way, only brightens and solarizes from near 0.

    TensorFlow only (it partitions with `tf.dynamic_partition`); meant for `tf.data`.

    Args:
        value_range: (low, high) of the input pixels, (0, 255) for raw images.
        num_ops: operations applied to each image, in turn.
        factor: magnitude in [0, 1] (the paper's M / 10).
        interpolation: "bilinear" or "nearest", for the geometric operations.
        seed: int, seeds every random draw.
    """

    def __init__(self, value_range=(0, 255), num_ops=2, factor=0.5, interpolation="bilinear",
                 seed=None, **kwargs):
        super().__init__(value_range=value_range, num_ops=num_ops, factor=factor,
                         interpolation=interpolation, seed=seed, **kwargs)
        m = float(factor[1] if isinstance(factor, (tuple, list)) else factor)
        low, high = value_range
        geometric = dict(interpolation=interpolation, fill_mode="constant",
                         fill_value=(low + high) / 2, seed=seed, **kwargs)
        colour = dict(value_range=value_range, seed=seed, **kwargs)
        self.random_shear = keras.layers.RandomShear(0.3 * m, 0.3 * m, **geometric)
        self.random_translation = keras.layers.RandomTranslation(
            (-0.45 * m, 0.45 * m), (-0.45 * m, 0.45 * m), **geometric)
        self.random_rotation = keras.layers.RandomRotation(
            (-30 / 360 * m, 30 / 360 * m), **geometric)
        self.random_brightness = keras.layers.RandomBrightness((-0.45 * m, 0.45 * m), **colour)
        self.random_color_degeneration = keras.layers.RandomColorDegeneration(
            (0.0, 0.9 * m), **colour)
        # A pair (a, a) is Keras' factor range 1 - a .. 1 + a (a float a gives 1 .. 1 + a).
        self.random_contrast = keras.layers.RandomContrast((0.9 * m, 0.9 * m), **colour)
        # Keras' sharpness: 0 blurred, 0.5 unchanged, 1 sharper (PIL's enhance factor / 2).
        self.random_sharpness = keras.layers.RandomSharpness(
            (0.5 - 0.45 * m, 0.5 + 0.45 * m), **colour)
        self.random_posterization = keras.layers.RandomPosterization(
            (min(8, max(1, round(8 - 4 * m))), 8), **colour)
        self.solarization = _Solarization(threshold_factor=(1.0 - m, 1.0), **colour)
        self.equalization = _PerImageEqualization(value_range=value_range, **kwargs)

    def get_random_transformation(self, data, training=True, seed=None):
        if not training:
            return None
        images = data["images"] if isinstance(data, dict) else data
        batch = tf.shape(images)[0] if len(images.shape) == 4 else 1
        # The operations draw their strengths from the same seed (in transform_images).
        seed = seed or layer_seed_generator(self)
        return {"layer_idxes": self.backend.random.randint(
            (self.num_ops, batch), 0, len(self._AUGMENT_LAYERS), seed=seed), "seed": seed}

    def transform_images(self, images, transformation, training=True):
        images = tf.cast(images, self.compute_dtype)
        if not training:
            return images
        unbatched = len(images.shape) == 3
        if unbatched:
            images = images[None]
        seed = transformation.get("seed") or layer_seed_generator(self)
        positions = tf.range(tf.shape(images)[0])
        count = len(self._AUGMENT_LAYERS)
        for choice in tf.unstack(transformation["layer_idxes"], self.num_ops):
            parts = tf.dynamic_partition(images, choice, count)
            where = tf.dynamic_partition(positions, choice, count)
            done = []
            for name, part in zip(self._AUGMENT_LAYERS, parts):
                # Some operations fail on no images (the min of an empty batch).
                done.append(tf.cond(tf.shape(part)[0] > 0,
                                    lambda n=name, p=part: self._apply(n, p, seed),
                                    lambda p=part: p))
            images = tf.ensure_shape(tf.dynamic_stitch(where, done), images.shape)
        return images[0] if unbatched else images

    def _apply(self, name, images, seed):
        return tf.cast(apply_seeded(getattr(self, name), images, seed), self.compute_dtype)

    def transform_bounding_boxes(self, bounding_boxes, transformation, training=True):
        raise NotImplementedError("PerImageRandAugment transforms images only.")

    def transform_segmentation_masks(self, segmentation_masks, transformation, training=True):
        raise NotImplementedError("PerImageRandAugment transforms images only.")


class AreaCutMix(keras.layers.CutMix):
    """CutMix whose label weights are the share of pixels each image really shows.

    Keras' `CutMix` weighs the labels by the box size it drew, in fractional pixels, while
    the pasted mask covers whole pixels; on small images the two differ (a mean 1.8% and up
    to 6% of the label at 32x32, 4% and 12% at 16x16). Here the weight is the pasted mask's
    own share, as timm's `correct_lam`. Args as `keras.layers.CutMix`.
    """

    def get_random_transformation(self, data, training=True, seed=None):
        transformation = super().get_random_transformation(data, training, seed)
        if transformation is not None:
            # In float32: a float16 mean over 224x224x3 pixels rounds to 0.
            pasted = tf.reduce_mean(tf.cast(transformation["batch_masks"], tf.float32),
                                    axis=[1, 2, 3])
            transformation["mix_weight"] = tf.cast(1.0 - pasted, self.compute_dtype)
        return transformation


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What to apply to training batches.

    Args:
        flip: random horizontal flips (off for data where mirroring changes the
            class, such as digits).
        translate: fraction of the image size for random shifts (pad-and-crop style).
        rotate: largest random rotation, as a fraction of a full turn (0.05 = 18 degrees).
        zoom: largest random zoom in or out, as a fraction of the size.
        randaugment: RandAugment magnitude in [0, 1], the paper's M / 10; 0 turns it off.
            Two operations per image, drawn for each image (`PerImageRandAugment`).
        mixup: MixUp alpha; 0 turns it off.
        cutmix: CutMix factor; 0 turns it off (`AreaCutMix`: labels weighed by the pixels
            pasted). With both, each batch gets one of the two.
    """

    flip: bool = True
    translate: float = 0.0
    rotate: float = 0.0
    zoom: float = 0.0
    randaugment: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0


def make_augmenter(config, num_classes, normalization="vit", extra_layers=()):
    """Returns fn(uint8 images, int labels, seed) -> (float32 model inputs, one-hot labels),
    every random draw taken from `seed`, an integer tensor of shape (2,) (the batch's own:
    `keras_vit.training.data.training_batches` gives (run seed, batch number)); the same
    images and seed give the same output.

    `extra_layers`: more Keras image augmentation layers (keras-cv's too), run on float
    pixels in [0, 255] after the configured ones and before MixUp/CutMix; Keras core layers
    draw from `seed` as the others do, layers without Keras' seeded protocol from their own
    state. `normalization`: how the model's inputs are scaled (`keras_vit.images`).

    The layers compute in float32 whatever the global precision policy: pixel arithmetic
    in bfloat16 or float16 is coarse, and Keras' MixUp and CutMix fail under those policies.
    """
    f32 = dict(dtype="float32")
    pixel_layers = []
    if config.flip:
        pixel_layers.append(keras.layers.RandomFlip("horizontal", **f32))
    if config.translate:
        pixel_layers.append(keras.layers.RandomTranslation(
            config.translate, config.translate, fill_mode="constant", **f32))
    if config.rotate:
        pixel_layers.append(keras.layers.RandomRotation(config.rotate, fill_mode="constant",
                                                        **f32))
    if config.zoom:
        pixel_layers.append(keras.layers.RandomZoom(config.zoom, config.zoom,
                                                    fill_mode="constant", **f32))
    if config.randaugment:
        pixel_layers.append(PerImageRandAugment(value_range=(0, 255), factor=config.randaugment,
                                                **f32))
    pixel_layers += list(extra_layers)
    mixers = []
    if config.mixup:
        mixers.append(keras.layers.MixUp(alpha=config.mixup, **f32))
    if config.cutmix:
        mixers.append(AreaCutMix(factor=config.cutmix, **f32))

    def augment(images, labels, seed):
        seeds = BatchSeeds(seed)
        images = tf.cast(images, tf.float32)
        for layer in pixel_layers:
            images = apply_seeded(layer, images, seeds)
        labels = tf.one_hot(labels, num_classes)
        if mixers:
            batch = {"images": images, "labels": labels}
            if len(mixers) == 1:
                batch = apply_seeded(mixers[0], batch, seeds)
            else:
                use_mixup = tf.random.stateless_uniform((), seed=seeds.next()) < 0.5
                batch = tf.cond(use_mixup, lambda: apply_seeded(mixers[0], batch, seeds),
                                lambda: apply_seeded(mixers[1], batch, seeds))
            images, labels = batch["images"], batch["labels"]
        images = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 255.0)
        return normalize(images, normalization), labels

    return as_written(augment)


def prepare_evaluation(num_classes, normalization="vit"):
    """fn(uint8 images, int labels) -> (float32 model inputs, one-hot labels)."""

    def prepare(images, labels):
        return normalize(images, normalization), tf.one_hot(labels, num_classes)

    return as_written(prepare)
