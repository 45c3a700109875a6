"""Augmentation layers of keras_vit.augment: per-image RandAugment, CutMix weighed by area."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from keras_vit.augment import AreaCutMix, PerImageRandAugment  # noqa: E402


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
    # AutoContrast and Equalization have no randomness, so the expected images are exact:
    # image i gets its two drawn operations in order, and nothing else.
    names = PerImageRandAugment._AUGMENT_LAYERS
    contrast, equalize = names.index("auto_contrast"), names.index("equalization")
    plans = [(contrast, equalize), (equalize, contrast), (contrast, contrast),
             (equalize, equalize), (equalize, contrast), (contrast, equalize)]
    images = tf.cast(_images(len(plans)), tf.float32)
    layer = PerImageRandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=1)
    layer.build(images.shape)
    out = layer.transform_images(
        images, {"layer_idxes": tf.constant(np.array(plans).T, tf.int32)})

    single = {contrast: keras.layers.AutoContrast(value_range=(0, 255)),
              equalize: keras.layers.Equalization(value_range=(0, 255))}
    for i, plan in enumerate(plans):
        expected = images[i:i + 1]
        for op in plan:
            expected = single[op](expected)
        np.testing.assert_allclose(out[i], expected[0], atol=1e-4, err_msg=f"image {i}")


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
