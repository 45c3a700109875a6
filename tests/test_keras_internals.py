"""keras_vit.keras_internals: every use of Keras' private code is checked against what it expects,
and each check fails with the Keras version and the workaround when Keras changed it."""

import random

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_vit import keras_internals
from keras_vit.errors import KerasInternalsChanged


def test_every_internal_is_what_keras_vit_expects():
    assert keras_internals.check_all() == [
        "check_gradient_clipping", "check_stateless_seeds", "check_global_seed",
        "check_build_before_first_trace", "check_keras_20585"]
    assert keras.__version__.startswith(keras_internals.CHECKED_WITH.rsplit(".", 1)[0])


@pytest.mark.parametrize("check, target, attribute", [
    ("check_gradient_clipping", "keras.src.optimizers.base_optimizer.BaseOptimizer",
     "_backend_apply_gradients"),
    ("check_stateless_seeds", "keras.src.random.seed_generator", "draw_seed"),
    ("check_global_seed", "keras.src.utils.rng_utils", "set_random_seed"),
    ("check_build_before_first_trace", "keras.src.trainers.trainer.Trainer", "_symbolic_build"),
])
def test_a_changed_internal_stops_with_the_version_and_the_workaround(
        check, target, attribute, monkeypatch):
    import importlib

    module_name, _, last = target.rpartition(".")
    owner = (getattr(importlib.import_module(module_name), last) if last[0].isupper()
             else importlib.import_module(target))

    def rewritten(*args, **kwargs):  # as if a Keras release had rewritten it
        return None

    monkeypatch.setattr(owner, attribute, rewritten)
    guard = getattr(keras_internals, check)
    guard.cache_clear()
    try:
        with pytest.raises(KerasInternalsChanged) as err:
            guard()
    finally:
        guard.cache_clear()
    message = str(err.value)
    assert f"Keras {keras.__version__} changed it" in message
    assert "keras==3.15" in message  # the workaround


def test_a_notebook_fit_traces_its_step_once_and_trains_as_keras_does():
    # A ViT made outside any tf.distribute scope: its metrics, loss and optimizer are built
    # before the first trace (Keras would build them inside it, and trace again). The same
    # layers as a plain Keras functional model, as Keras trains it, end with the same weights
    # (measured: the same losses, weights within 1.2e-7).
    import keras_vit

    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, (24, 16, 16, 3)).astype("float32"), rng.integers(0, 3, 24)
    runs = []
    for plain in (False, True):
        keras.utils.set_random_seed(1)
        vit = keras_vit.build("Ti/16", image_size=16, patch_size=8, depth=1, num_classes=3)
        model = keras.Model(vit.inputs, vit.outputs) if plain else vit
        traced = []
        step = model.train_step
        model.train_step = lambda data: traced.append(1) or step(data)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        runs.append((len(traced), history.history, [w.numpy() for w in model.weights]))
    (traces, history, weights), (keras_traces, keras_history, keras_weights) = runs
    assert (traces, keras_traces) == (1, 2)
    np.testing.assert_allclose(history["loss"], keras_history["loss"], rtol=1e-6)
    for ours, theirs in zip(weights, keras_weights):  # float32 rounding of another graph
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_seeded_restores_the_callers_random_state():
    keras.utils.set_random_seed(7)
    expected = (random.random(), np.random.rand(), float(keras.random.uniform(())))
    keras.utils.set_random_seed(7)
    with keras_internals.seeded(123):
        inside = (random.random(), np.random.rand(), float(keras.random.uniform(())))
    after = (random.random(), np.random.rand(), float(keras.random.uniform(())))
    assert after == expected and inside != expected
    with keras_internals.seeded(123):  # the same seed, the same draws
        assert (random.random(), np.random.rand(), float(keras.random.uniform(()))) == inside


# ------------------------------------------------------------------ the Keras #20585 fix

def test_keras_20585_fix_targets_are_unchanged():
    """The Keras functions the fix wraps are byte-for-byte those of Keras 3.15.1.

    If this fails after a Keras upgrade: re-read keras/src/backend/tensorflow/trainer.py,
    check the fix still applies (and whether the bug is still there, see the reproduction
    test), then update KERAS_20585_SOURCES.
    """
    assert keras_internals.keras_20585_sources() == keras_internals.KERAS_20585_SOURCES, (
        f"Keras {keras.__version__} changed the functions fix_keras_20585 wraps.")


@pytest.fixture
def restore_keras_trainer(monkeypatch):
    """Keras unpatched during the test, and as it was before the test afterwards."""
    import inspect

    from keras.src.backend.tensorflow import trainer as tf_trainer

    cls = tf_trainer.TensorFlowTrainer
    monkeypatch.setattr(cls, "_maybe_symbolic_build", inspect.unwrap(cls._maybe_symbolic_build))
    monkeypatch.setattr(tf_trainer, "reduce_per_replica",
                        inspect.unwrap(tf_trainer.reduce_per_replica))
    return tf_trainer


def test_fix_keras_20585_is_idempotent_and_wraps_once(restore_keras_trainer):
    tf_trainer = restore_keras_trainer
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica
    assert not hasattr(original_build, keras_internals._FIX_MARK), "patched before the test"

    assert keras_internals.fix_keras_20585() is True
    patched_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    patched_reduce = tf_trainer.reduce_per_replica
    assert patched_build is not original_build and patched_reduce is not original_reduce
    assert patched_build.__wrapped__ is original_build
    assert patched_reduce.__wrapped__ is original_reduce

    assert keras_internals.fix_keras_20585() is False
    assert tf_trainer.TensorFlowTrainer._maybe_symbolic_build is patched_build
    assert tf_trainer.reduce_per_replica is patched_reduce
    # The fingerprints are of the originals, patched or not.
    assert keras_internals.keras_20585_sources() == keras_internals.KERAS_20585_SOURCES


def test_fix_keras_20585_leaves_single_worker_strategies_alone(restore_keras_trainer):
    """Patched, Mirrored and the default strategy train exactly as with Keras unpatched."""
    tf_trainer = restore_keras_trainer
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("int32")

    def train(strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=["accuracy"])
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
        return history.history["loss"] + history.history["accuracy"]

    strategies = (lambda: tf.distribute.MirroredStrategy(["/cpu:0"]), tf.distribute.get_strategy)
    unpatched = [train(make()) for make in strategies]
    assert keras_internals.fix_keras_20585() is True
    assert tf_trainer.reduce_per_replica is not tf_trainer.reduce_per_replica.__wrapped__
    patched = [train(make()) for make in strategies]
    np.testing.assert_array_equal(patched, unpatched)


def test_fix_keras_20585_refuses_changed_keras():
    def reduce_per_replica(values, strategy, reduction):  # as if Keras had fixed it
        return strategy.reduce("MEAN", values, axis=None)

    with pytest.raises(KerasInternalsChanged,
                       match=rf"Keras {keras.__version__}.*keras-team/keras#20585.*update or drop"):
        keras_internals._check_keras_20585_target("reduce_per_replica", reduce_per_replica)


