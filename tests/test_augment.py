"""Augmentation layers of keras_vit.augment: per-image RandAugment, CutMix weighed by area."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from keras_vit.training.augment import AreaCutMix, PerImageRandAugment  # noqa: E402


def _images(count, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.integers(0, 256, (count, size, size, 3)).astype("uint8"))


def test_operations_are_drawn_for_each_image():
    # Keras' RandAugment draws (num_ops,) operations for the whole batch.
    layer = PerImageRandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=1)
    choices = layer.get_random_transformation(_images(64))["layer_idxes"].numpy()
    assert choices.shape == (2, 64)
    for round_choices in choices:
        assert len(set(round_choices)) >= 6  # of 11 operations; all-equal under per-batch draws
        assert round_choices.min() >= 0 and round_choices.max() < 11


def test_each_image_goes_through_its_own_operations_in_order():
    # Posterize to 2 bits (made deterministic here), autocontrast and equalize do not
    # commute, so the expected images are exact only if image i gets its two drawn
    # operations, in order, and equalize sees that image's histogram alone.
    layer = PerImageRandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=1)
    layer.random_posterization = keras.layers.RandomPosterization((2, 2), value_range=(0, 255))
    names = PerImageRandAugment._AUGMENT_LAYERS
    post, contrast, equalize = (names.index(n) for n in
                                ("random_posterization", "auto_contrast", "equalization"))
    plans = [(post, contrast), (contrast, post), (equalize, post), (post, equalize),
             (post, post), (equalize, contrast), (contrast, equalize)]
    images = tf.cast(_images(len(plans)), tf.float32) * 0.5 + 40  # not the full range
    layer.build(images.shape)
    out = layer.transform_images(
        images, {"layer_idxes": tf.constant(np.array(plans).T, tf.int32)})

    single = {post: layer.random_posterization,
              contrast: keras.layers.AutoContrast(value_range=(0, 255)),
              equalize: keras.layers.Equalization(value_range=(0, 255))}
    for i, plan in enumerate(plans):
        expected = images[i:i + 1]
        for op in plan:
            expected = single[op](expected, training=True)
        np.testing.assert_allclose(out[i], expected[0], atol=1e-3, err_msg=f"image {i}")
    reversed_first = single[post](single[contrast](images[:1], training=True), training=True)
    assert not np.allclose(out[0], reversed_first[0])  # the order matters for these images


def _forced(layer, name, images):
    """The images after the named operation alone (one op per image)."""
    index = PerImageRandAugment._AUGMENT_LAYERS.index(name)
    choice = tf.fill((1, images.shape[0]), index)
    return layer.transform_images(images, {"layer_idxes": choice}).numpy()


def test_strengths_are_the_papers_both_ways():
    # factor 0.5 = the paper's magnitude 5: rotation up to 15 degrees and shifts up to 22.5%
    # of the size, either way; brightness and contrast both down and up (Keras' RandAugment
    # rotates 0-180 degrees one way, shifts one way and only brightens).
    layer = PerImageRandAugment(value_range=(0, 255), num_ops=1, factor=0.5, seed=0)
    count, size = 300, 33
    blob = np.zeros((count, size, size, 3), np.float32)
    blob[:, 14:19, 26:31] = 255  # right of the centre
    rotated = _forced(layer, "random_rotation", tf.constant(blob))[..., 0]
    weights = np.clip(rotated - 127.5, 0, None)  # geometric operations fill with mid-grey
    rows, cols = np.indices((size, size))
    cy = (weights * rows).sum((1, 2)) / weights.sum((1, 2))
    cx = (weights * cols).sum((1, 2)) / weights.sum((1, 2))
    angles = np.degrees(np.arctan2(16 - cy, cx - 16))
    assert np.abs(angles).max() <= 16 and angles.min() < -8 and angles.max() > 8

    square = np.zeros((count, size, size, 3), np.float32)
    square[:, 15:18, 15:18] = 255  # at the centre
    shifted = _forced(layer, "random_translation", tf.constant(square))[..., 0]
    weights = np.clip(shifted - 127.5, 0, None)
    for d in ((weights * rows).sum((1, 2)) / weights.sum((1, 2)) - 16,
              (weights * cols).sum((1, 2)) / weights.sum((1, 2)) - 16):
        assert np.abs(d).max() <= 0.225 * size + 0.5 and d.min() < -3 and d.max() > 3

    images = tf.constant(np.random.default_rng(0).uniform(64, 192, (count, 8, 8, 3)),
                         tf.float32)
    shift = _forced(layer, "random_brightness", images).mean((1, 2, 3)) - images.numpy().mean(
        (1, 2, 3))
    assert shift.min() < -30 and shift.max() > 30 and np.abs(shift).max() <= 0.225 * 255 + 1
    ratio = _forced(layer, "random_contrast", images).std((1, 2, 3)) / images.numpy().std(
        (1, 2, 3))
    assert ratio.min() < 0.7 and ratio.max() > 1.3 and 0.54 <= ratio.min() and ratio.max() <= 1.46

    # Solarize inverts the pixels above a threshold in the top half of the range.
    ramp = tf.constant(np.broadcast_to(np.arange(256, dtype=np.float32).reshape(1, 16, 16, 1),
                                       (count, 16, 16, 3)))
    out = _forced(layer, "solarization", ramp)[..., 0].reshape(count, 256)
    inverted = out != np.arange(256)
    np.testing.assert_array_equal(out[inverted], (255 - np.arange(256)[None].repeat(count, 0))[
        inverted])
    first = np.where(inverted.any(1), inverted.argmax(1), 256)
    assert first.min() >= 127 and first.max() > 200 and first.min() < 150
    assert all(inverted[i, first[i]:].all() for i in range(count))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_augmenter_runs_in_float32_under_mixed_precision(policy):
    from keras_vit.training.augment import AugmentConfig, make_augmenter

    keras.mixed_precision.set_global_policy(policy)
    try:
        augment = make_augmenter(AugmentConfig(flip=True, translate=0.1, randaugment=0.5,
                                               cutmix=1.0), num_classes=4)
        images = _images(8, size=32)
        x, y = tf.function(augment)(images, tf.range(8) % 4, tf.constant([0, 0]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert x.dtype == tf.float32 and y.dtype == tf.float32
    np.testing.assert_allclose(tf.reduce_sum(y, -1), 1.0, atol=1e-6)
    assert float(tf.reduce_min(tf.reduce_max(y, -1))) < 1.0  # CutMix mixed the labels
    mixup = make_augmenter(AugmentConfig(flip=False, mixup=0.2), num_classes=4)
    keras.mixed_precision.set_global_policy(policy)
    try:
        mixup = make_augmenter(AugmentConfig(flip=False, mixup=0.2), num_classes=4)
        x, y = tf.function(mixup)(images, tf.range(8) % 4, tf.constant([0, 0]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert x.dtype == tf.float32 and float(tf.reduce_min(tf.reduce_max(y, -1))) < 1.0


def test_runs_in_tf_data_on_any_batch_size_seeded():
    # Batches of 16, then 1 (most operations get no image: empty partitions), in a graph.
    def augmented(seed):
        layer = PerImageRandAugment(value_range=(0, 255), factor=0.5, seed=seed)
        dataset = (tf.data.Dataset.from_tensor_slices(_images(17, size=24)).batch(16)
                   .map(lambda x: layer(x, training=True)))
        return [batch.numpy() for batch in dataset]

    first, again, other = augmented(7), augmented(7), augmented(8)
    assert [b.shape for b in first] == [(16, 24, 24, 3), (1, 24, 24, 3)]
    for batch in first:
        assert batch.dtype == np.float32 and batch.min() >= 0 and batch.max() <= 255
    changed = np.abs(first[0] - _images(16, size=24).numpy()).reshape(16, -1).max(axis=1) > 0
    assert changed.sum() >= 12  # a few operations can leave an image as it was
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)  # same seed, same augmentation
    assert not np.array_equal(first[0], other[0])


def test_one_image_without_batch_axis():
    layer = PerImageRandAugment(value_range=(0, 255), factor=0.5, seed=3)
    out = layer(_images(1)[0], training=True)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(layer(_images(1)[0], training=False), _images(1)[0])


@pytest.mark.parametrize("size", [16, 32])
def test_cutmix_labels_weigh_the_pixels_each_image_shows(size):
    # Image i is filled with the value i and labelled i, so each output's label weights must
    # equal the share of its pixels holding each value (Keras' CutMix weighs by the box it
    # drew in fractional pixels: several per cent off at these sizes).
    count = 32
    images = tf.broadcast_to(tf.range(count, dtype=tf.float32)[:, None, None, None],
                             (count, size, size, 3))
    labels = tf.one_hot(tf.range(count), count)
    out = AreaCutMix(factor=1.0, seed=0)({"images": images, "labels": labels}, training=True)
    values = np.rint(out["images"].numpy()).astype(int)
    shown = np.stack([np.bincount(v.ravel(), minlength=count) / v.size for v in values])
    np.testing.assert_allclose(out["labels"].numpy(), shown, atol=1e-6)
    assert (shown.max(axis=1) < 1).sum() >= count // 2  # most images did get a patch


@pytest.mark.slow
def test_augmented_batches_are_the_same_in_every_run_and_when_resumed():
    # Each batch's draws come from (seed, batch number), not from the layers' seed state that
    # tf.data's parallel calls advance in any order: a second pipeline gives the same batches,
    # and one resumed at batch 6 gives the uninterrupted pipeline's batches 6, 7, ... (a
    # fresh augmenter used to start its draws again at batch 6).
    from keras_vit.training.augment import AugmentConfig, make_augmenter
    from keras_vit.training.data import Data, training_batches

    images, labels = _images(40, size=8).numpy(), np.arange(40, dtype=np.int32) % 4
    data = Data({"train": tf.data.Dataset.from_tensor_slices((images, labels))},
                decode=lambda image, label: (image, label), image_size=(8, 8),
                class_names=list("abcd"), sizes={"train": 40})
    config = AugmentConfig(flip=True, translate=0.2, rotate=0.1, zoom=0.2, randaugment=0.5,
                           mixup=0.2, cutmix=1.0)

    def batches(seed=3, skip=0, count=10):
        stream = training_batches(data, 8, seed=seed, skip_batches=skip,
                                  augment=make_augmenter(config, num_classes=4))
        return list(stream.take(count).as_numpy_iterator())

    first, again, resumed = batches(), batches(), batches(skip=6, count=4)
    for (x, y), (x_again, y_again) in zip(first, again):
        np.testing.assert_array_equal(x, x_again)
        np.testing.assert_array_equal(y, y_again)
    for (x, y), (x_resumed, y_resumed) in zip(first[6:], resumed):
        np.testing.assert_array_equal(x, x_resumed)
        np.testing.assert_array_equal(y, y_resumed)
    other_seed = batches(seed=4, count=1)[0][0]
    assert not np.array_equal(first[0][0], other_seed)
    assert first[0][0].dtype == np.float32 and first[0][1].shape == (8, 4)
    mixed = [float(y.max(-1).min()) < 1.0 for _, y in first]  # MixUp or CutMix, per batch
    assert any(mixed)


def test_batch_seeds_give_each_draw_its_own_seed_from_the_batch_seed_alone():
    from keras_vit.training.augment import BatchSeeds

    seeds = BatchSeeds(tf.constant([3, 9], tf.int64))
    draws = [keras.random.uniform((4,), seed=seeds).numpy() for _ in range(3)]
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])
    again = BatchSeeds(tf.constant([3, 9], tf.int64))
    np.testing.assert_array_equal(keras.random.uniform((4,), seed=again).numpy(), draws[0])


def _through_the_pipeline(extra_layers, images, labels):
    """What training does with a user's layers: make_augmenter's function, in tf.data."""
    from keras_vit.training.augment import AugmentConfig, make_augmenter

    augment = make_augmenter(AugmentConfig(flip=False), 4, extra_layers=extra_layers)
    dataset = tf.data.Dataset.from_tensors((images, labels)).map(
        lambda x, y: augment(x, y, tf.constant([0, 0], tf.int64)))
    return [(x.numpy(), y.numpy()) for x, y in dataset][0]


def test_keras_cv_grid_mask_runs_in_the_training_pipeline():
    """keras-cv (retired upstream, an optional plug-in: the `keras-cv` extra) has layers that
    Keras core lacks; GridMask, as users pass it to `TrainConfig(augmentation_layers=...)`."""
    keras_cv = pytest.importorskip("keras_cv")
    grid_mask = keras_cv.layers.GridMask(ratio_factor=(0.5, 0.5), rotation_factor=0.0,
                                         fill_mode="constant", fill_value=0.0, seed=1)
    images, labels = tf.fill((4, 32, 32, 3), tf.constant(200, tf.uint8)), tf.constant([0, 1, 2, 3])
    x, y = _through_the_pipeline([grid_mask], images, labels)
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32
    masked = np.isclose(x, -1.0)  # filled with 0, then scaled to [-1, 1]
    np.testing.assert_allclose(x[~masked], 200 / 127.5 - 1.0, atol=1e-6)  # the rest as it was
    share = masked.mean(axis=(1, 2, 3))
    assert np.all((share > 0.05) & (share < 0.6)), share  # a grid of squares in every image
    np.testing.assert_array_equal(y, np.eye(4))
