"""Micro-batches must train exactly as whole batches do: same updates, loss and metrics."""

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from keras_vit.training.micro_batches import (auto_micro_batches, micro_batches_of, part_sizes,
                                     use_micro_batches)
from tests import processes
from tests.conftest import randomize_weights

ROOT = Path(__file__).resolve().parents[1]


def _data(n=12, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 16, 16, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, classes, n), classes)
    w = rng.uniform(0.2, 2.0, n).astype("float32")
    return x, y, w


def _train(parts, dataset, *, jit=False, optimizer=None):
    keras.utils.set_random_seed(0)
    model = randomize_weights(keras_vit.build("Ti/16", image_size=16, patch_size=4, depth=2,
                                              num_classes=5))
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.5),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                  jit_compile=jit)
    use_micro_batches(model, parts)
    start = [w.numpy() for w in model.trainable_weights]
    history = model.fit(dataset, epochs=2, verbose=0, shuffle=False)
    weights = [w.numpy() for w in model.trainable_weights]
    # Training moved (almost) every weight array, so equality below means something.
    assert sum(not np.allclose(a, b) for a, b in zip(start, weights)) >= 0.9 * len(weights)
    return weights, history.history


def _assert_same_training(a, b, atol=2e-6):
    (weights_a, history_a), (weights_b, history_b) = a, b
    for wa, wb in zip(weights_a, weights_b):
        np.testing.assert_allclose(wa, wb, atol=atol)
    for key in history_a:
        np.testing.assert_allclose(history_a[key], history_b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_parts_give_the_whole_batch_update(jit):
    x, y, _ = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(12)
    whole = _train(1, dataset, jit=jit)
    # 4 equal parts, and 5 requested of 12 -> parts of 3 (the batch is split in 4: decided
    # before tracing, so XLA needs only the first).
    for parts in (4,) if jit else (4, 5):
        _assert_same_training(whole, _train(parts, dataset, jit=jit))


def test_unequal_and_unknown_batch_sizes_and_sample_weights():
    # Batches of 5, 5, 2 with no static batch size (as any dataset without drop_remainder),
    # per-example weights: parts of 2, 2, 1 and two of 1, weighted by their shares.
    x, y, w = _data(12)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(5)
    _assert_same_training(_train(1, dataset), _train(3, dataset))


@pytest.mark.slow
def test_adamw_and_mixed_precision_loss_scaling():
    x, y, _ = _data(8)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    adamw = lambda: keras.optimizers.AdamW(1e-3, weight_decay=0.1, global_clipnorm=1.0)  # noqa
    _assert_same_training(_train(1, dataset, optimizer=adamw()),
                          _train(2, dataset, optimizer=adamw()))
    keras.mixed_precision.set_global_policy("mixed_float16")
    whole = _train(1, dataset, optimizer=keras.optimizers.SGD(0.5))
    parts = _train(4, dataset, optimizer=keras.optimizers.SGD(0.5))
    _assert_same_training(whole, parts, atol=5e-3)  # float16 activations
    assert all(np.isfinite(w).all() for w in parts[0])


def test_sparse_gradients_of_an_embedding():
    rng = np.random.default_rng(0)
    ids, y = rng.integers(0, 50, (16, 6)), rng.normal(size=(16, 1)).astype("float32")
    runs = []
    for parts in (1, 4):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(50, 4),
                                  keras.layers.Flatten(), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", jit_compile=False)
        use_micro_batches(model, parts)
        model.fit(ids, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        runs.append([w.numpy() for w in model.trainable_weights])
    for whole, parts in zip(*runs):
        np.testing.assert_allclose(parts, whole, atol=1e-6)


def test_part_sizes():
    assert part_sizes(128, 4) == (4, 32) and part_sizes(12, 5) == (4, 3)
    assert part_sizes(3, 8) == (3, 1) and part_sizes(13, 4) == (4, 4) and part_sizes(1, 2) == (1, 1)


def test_parts_one_restores_keras_step_and_bad_counts_are_refused():
    model = keras_vit.build("Ti/16", image_size=16, patch_size=4, depth=1, num_classes=2)
    keras_step = model.train_step
    assert micro_batches_of(model) == 1
    use_micro_batches(model, 4)
    assert micro_batches_of(model) == 4
    assert model.train_step.__func__ is not keras_step.__func__
    use_micro_batches(model, 1)
    assert micro_batches_of(model) == 1
    assert model.train_step.__func__ is keras_step.__func__
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match="positive integer"):
            use_micro_batches(model, bad)


def test_auto_micro_batches():
    # The measured optimum on 2 CPU cores: parts of >= 1536 tokens.
    assert auto_micro_batches(128, 65) == 4      # ViT-Ti 32x32 patch 4: parts of 32 images
    assert auto_micro_batches(32, 197) == 4      # S/16 at 224: parts of 8
    assert auto_micro_batches(64, 17) == 1       # the digits default: already small
    assert auto_micro_batches(80, 65) == 2       # 2 parts of 40 (4 of 20 are too small)
    assert auto_micro_batches(128, 65, "GPU") == 1
    assert auto_micro_batches(128, 65, "TPU") == 1
    # S/16 at 224, batch 128: at most 4 parts (each one more compiles longer), and none for a
    # short run, which the longer first step would cost more than it saves.
    assert auto_micro_batches(128, 197) == 4
    assert auto_micro_batches(128, 197, total_steps=30) == 1
    assert auto_micro_batches(128, 65, total_steps=500) == 4


_MIRRORED_SCRIPT = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from keras_vit.training.micro_batches import use_micro_batches
rng = np.random.default_rng(0)
x, y = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
for name, strategy, parts in [("one", tf.distribute.OneDeviceStrategy("/cpu:0"), 1),
                              ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 4)]:
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, "tanh"),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    use_micro_batches(model, parts)
    loss = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=2, verbose=0,
                     shuffle=False).history["loss"]
    weights = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    print(name, " ".join(map(repr, loss + weights.tolist())))
"""


@pytest.mark.slow
def test_micro_batches_under_mirrored_strategy():
    # Two replicas, each splitting its 16 examples in 4 parts, step as one device does.
    proc = processes.run([sys.executable, "-c", _MIRRORED_SCRIPT], timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {line.split()[0]: np.array(line.split()[1:], float)
            for line in proc.stdout.splitlines() if line.startswith(("one ", "two "))}
    np.testing.assert_allclose(runs["two"], runs["one"], rtol=1e-5, atol=1e-6)
