"""One helper that runs Keras' own kinds of layer checks over any layer (as keras-hub's
`run_layer_test`): the symbolic output equals the eager one (shape and dtype) under float32,
mixed_float16 and mixed_bfloat16; the config round-trips and the copy computes the same; a
training step through the layer gives finite gradients that change its weights."""

import keras
import numpy as np

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def run_layer_checks(make_layer, input_shape, *, call_kwargs=None, batch=2, seed=0,
                     trainable=True):
    """Runs the checks on layers made by `make_layer(dtype=policy)`.

    Args:
        make_layer: a function of `dtype` returning a fresh, unbuilt layer.
        input_shape: the input's shape without the batch axis.
        call_kwargs: keyword arguments of the call (e.g. output_tokens=2).
        batch: the batch size of the eager inputs.
        trainable: whether the layer has weights a training step must change.
    """
    call_kwargs = call_kwargs or {}
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *input_shape)).astype("float32")
    for policy in POLICIES:
        layer = make_layer(dtype=policy)
        # What a functional model sees (the symbolic call builds the layer), then eagerly.
        symbolic = layer(keras.KerasTensor((None, *input_shape)), **call_kwargs)
        eager = layer(x, **call_kwargs)
        spec = layer.compute_output_spec(keras.KerasTensor((None, *input_shape)),
                                         **call_kwargs)
        assert len(keras.tree.flatten(symbolic)) == len(keras.tree.flatten(eager))
        pairs = list(zip(keras.tree.flatten(eager), keras.tree.flatten(symbolic)))
        pairs += list(zip(keras.tree.flatten(eager), keras.tree.flatten(spec)))
        for e, spec in pairs:
            name = type(layer).__name__
            eager_dtype = keras.backend.standardize_dtype(e.dtype)
            assert eager_dtype == keras.backend.standardize_dtype(spec.dtype), (
                policy, name, "eager", eager_dtype, "symbolic", spec.dtype)
            assert len(e.shape) == len(spec.shape), (policy, name, e.shape, spec.shape)
            assert all(s is None or s == d for s, d in zip(spec.shape, e.shape)), (
                policy, name, e.shape, spec.shape)
        if keras.backend.is_float_dtype(layer.compute_dtype) and policy != "float32":
            outputs = keras.tree.flatten(eager)
            assert keras.backend.standardize_dtype(outputs[0].dtype) == layer.compute_dtype, (
                policy, type(layer).__name__, outputs[0].dtype)

    layer = make_layer(dtype="float32")
    y = layer(x, **call_kwargs)
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer) and restored.get_config() == layer.get_config()
    clone(x, **call_kwargs)
    clone.set_weights(layer.get_weights())
    for a, b in zip(keras.tree.flatten(clone(x, **call_kwargs)), keras.tree.flatten(y)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
                                   atol=1e-6)
    if trainable:
        _training_step(make_layer, x, call_kwargs)


def _training_step(make_layer, x, call_kwargs):
    layer = make_layer(dtype="float32")
    inputs = keras.Input(x.shape[1:])
    outputs = keras.tree.flatten(layer(inputs, **call_kwargs))[0]
    model = keras.Model(inputs, outputs)
    target = np.random.default_rng(1).normal(size=(len(x), *outputs.shape[1:])).astype("float32")
    for w in layer.trainable_weights:  # no zero weights that hold others' gradients at zero
        w.assign(np.random.default_rng(2).normal(0, 0.1, w.shape).astype("float32"))
    before = [keras.ops.convert_to_numpy(w).copy() for w in layer.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    history = model.fit(x, target, epochs=1, batch_size=len(x), verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [keras.ops.convert_to_numpy(w) for w in layer.trainable_weights]
    assert before, f"{type(layer).__name__} has no trainable weights"
    changed = [not np.array_equal(a, b) for a, b in zip(before, after)]
    assert all(np.isfinite(a).all() for a in after)
    assert any(changed), f"a training step left {type(layer).__name__}'s weights as they were"
