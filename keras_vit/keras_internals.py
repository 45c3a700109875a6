"""Every use of Keras' private code, in one place, each guarded.

keras-vit uses Keras' public API everywhere else. Where it cannot, the code is here, and each
use first checks that the internal it relies on is what it expects: if a Keras release changed
it, a `KerasInternalsChanged` error names the Keras version, what changed and the
workaround, instead of a wrong result. `check_all()` runs every check (a test does); the code
that needs an internal applies it explicitly.

- `fix_keras_20585()`: `model.fit` under MultiWorkerMirroredStrategy (keras-team/keras#20585);
  applied by `make_strategy("multi-worker")`.
- `SummedGradientClipping`: global-norm clipping of the summed replica gradients, through the
  optimizers' `_clip_gradients` (Keras clips each replica's share); used by
  `keras_vit.optimizers`.
- `StatelessSeeds`: a `keras.random.SeedGenerator` without a state variable, so `tf.data`'s
  parallel map calls can draw seeded augmentations; used by `keras_vit.training.augment`.
- `seeded(seed)`: Keras' global random seed (and Python's and NumPy's) set for a block and
  restored after it, so that training leaves the caller's random state as it was.
- `BuiltBeforeFirstTrace`: a model's metrics, loss and optimizer built from the first batch
  before `fit` traces its step, so the step is traced once, not twice; used by
  `keras_vit.ViT` and `keras_vit.training.distill.Distiller`.
"""

import contextlib
import functools
import hashlib
import inspect
import random

import keras
import numpy as np

from keras_vit.errors import KerasInternalsChanged

# The Keras release these internals were read from.
CHECKED_WITH = "3.15.1"


def _changed(what, missing, workaround):
    return KerasInternalsChanged(
        f"keras-vit relies on Keras {CHECKED_WITH}'s {what}, and Keras {keras.__version__} "
        f"changed it (no longer has {missing}). {workaround}")


def _require_source(what, function, needs, workaround):
    source = inspect.getsource(inspect.unwrap(function))
    missing = [s for s in needs if s not in source]
    if missing:
        raise _changed(what, missing, workaround)


# --------------------------------------------------------------------------------------------
# Global-norm clipping of the summed replica gradients.

_CLIP_WORKAROUND = ("Install keras==3.15.* (pyproject.toml pins it), or pass clip_norm=0 "
                    "(no clipping) until keras_vit.keras_internals is updated.")


@functools.cache
def check_gradient_clipping():
    """Raises KerasInternalsChanged unless optimizers still clip through
    `_clip_gradients(grads)` when they apply gradients, and that method still reads
    `global_clipnorm`."""
    from keras.src.optimizers import base_optimizer

    cls = base_optimizer.BaseOptimizer
    if not callable(getattr(cls, "_clip_gradients", None)):
        raise _changed("BaseOptimizer._clip_gradients", ["_clip_gradients"], _CLIP_WORKAROUND)
    _require_source("BaseOptimizer._backend_apply_gradients", cls._backend_apply_gradients,
                    ["self._clip_gradients(grads)"], _CLIP_WORKAROUND)
    _require_source("BaseOptimizer._clip_gradients", cls._clip_gradients,
                    ["self.global_clipnorm", "clip_by_global_norm"], _CLIP_WORKAROUND)


class SummedGradientClipping:
    """Mixin for a Keras optimizer: `global_clipnorm` clips the gradient of the whole global
    batch, summed over replicas, as one device with the global batch does.

    Keras 3.15's optimizers clip each replica's own gradient and then sum them across replicas,
    so under MirroredStrategy, MultiWorkerMirroredStrategy or a TPU an update could be up to
    `num_replicas` times the clip (two replicas, clip 1.0: measured 1.45)."""

    def __init__(self, *args, **kwargs):
        check_gradient_clipping()
        super().__init__(*args, **kwargs)

    def _clip_gradients(self, grads):
        if self.global_clipnorm and keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            context = tf.distribute.get_replica_context()
            if context is not None and context.num_replicas_in_sync > 1:
                present = [g for g in grads if g is not None]
                # The optimizer sums the replicas' gradients next; clip that sum's norm.
                norm = tf.linalg.global_norm(context.all_reduce(tf.distribute.ReduceOp.SUM,
                                                                present))
                scale = self.global_clipnorm / tf.maximum(norm, self.global_clipnorm)
                return [None if g is None else g * tf.cast(scale, g.dtype) for g in grads]
        return super()._clip_gradients(grads)


# --------------------------------------------------------------------------------------------
# Seeds without state for tf.data.

_SEEDS_WORKAROUND = ("Install keras==3.15.* (pyproject.toml pins it); augmentation needs "
                     "seeds drawn per batch.")


@functools.cache
def check_stateless_seeds():
    """Raises KerasInternalsChanged unless Keras' random ops still draw a SeedGenerator's seed
    by calling its `next()` (all that `StatelessSeeds` provides)."""
    from keras.src.random import seed_generator

    _require_source("keras.random's draw_seed", seed_generator.draw_seed,
                    ["isinstance(seed, SeedGenerator)", "return seed.next()"], _SEEDS_WORKAROUND)


class StatelessSeeds(keras.random.SeedGenerator):
    """A `keras.random.SeedGenerator` whose seeds come from `next()` alone, without the state
    variable `SeedGenerator.__init__` creates (variables cannot be made inside the functions a
    `tf.data` map traces). Subclasses define `next(ordered=True)`; Keras' random ops call it
    (`draw_seed`) for every draw that is given this object as `seed=`."""

    def __init__(self):  # no SeedGenerator.__init__: it creates the state variable
        check_stateless_seeds()

    def next(self, ordered=True):
        raise NotImplementedError


def apply_seeded(layer, data, seed):
    """`layer(data, training=True)` for a Keras image augmentation layer and a batch of
    images (or a dict of images and labels), its random draws taken from `seed` (a
    `StatelessSeeds`), computed with TensorFlow ops whatever the Keras backend (as Keras' own
    layers do when `tf.data` calls them: their `backend` attribute switched to TensorFlow).
    Layers without that protocol (keras-cv's) are called as they are."""
    dynamic = getattr(layer, "backend", None)
    if dynamic is None or not hasattr(dynamic, "set_backend") or not hasattr(
            layer, "get_random_transformation"):
        return layer(data, training=True)
    dynamic.set_backend("tensorflow")
    try:
        change = layer.get_random_transformation(data, training=True, seed=seed)
        if not isinstance(data, dict):
            return layer.transform_images(data, change, training=True)
        return {"images": layer.transform_images(data["images"], change, training=True),
                "labels": layer.transform_labels(data["labels"], change, training=True)}
    finally:
        dynamic.reset()


def layer_seed_generator(layer):
    """The seed generator a Keras preprocessing layer draws from when no seed is given, for
    the backend it runs on now (Keras' `DataLayer._get_seed_generator`)."""
    getter = getattr(layer, "_get_seed_generator", None)
    if getter is None:
        raise _changed("DataLayer._get_seed_generator", ["_get_seed_generator"],
                       _SEEDS_WORKAROUND)
    return getter(layer.backend.name)


# --------------------------------------------------------------------------------------------
# Keras' global random seed, set for a block.

_SEED_WORKAROUND = ("Install keras==3.15.* (pyproject.toml pins it), or call "
                    "keras.utils.set_random_seed yourself (it is then not restored).")


@functools.cache
def check_global_seed():
    """Raises KerasInternalsChanged unless `keras.utils.set_random_seed` still keeps its seed
    in the two global attributes `seeded` saves and restores."""
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    for module, name in ((rng_utils, "GLOBAL_RANDOM_SEED"),
                         (seed_generator, "GLOBAL_SEED_GENERATOR")):
        if not hasattr(module, name):
            raise _changed(f"{module.__name__}.{name}", [name], _SEED_WORKAROUND)
    _require_source("keras.utils.set_random_seed", rng_utils.set_random_seed,
                    ["set_global_attribute(GLOBAL_RANDOM_SEED, seed)",
                     "seed_generator.GLOBAL_SEED_GENERATOR, None"], _SEED_WORKAROUND)


@contextlib.contextmanager
def seeded(seed):
    """Sets Keras' global random seed (which draws initial weights and unseeded layers' seeds)
    and Python's and NumPy's to `seed` inside the block, and restores all three after it.
    TensorFlow's global seed is left alone (keras-vit's pipelines seed every op)."""
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    check_global_seed()
    keys = (rng_utils.GLOBAL_RANDOM_SEED, seed_generator.GLOBAL_SEED_GENERATOR)
    saved = [global_state.get_global_attribute(key) for key in keys]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    global_state.set_global_attribute(keys[0], int(seed))
    global_state.set_global_attribute(keys[1], None)
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        for key, value in zip(keys, saved):
            global_state.set_global_attribute(key, value)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


# --------------------------------------------------------------------------------------------
# A model's training state built before fit traces its step (TensorFlow backend).

_BUILD_WORKAROUND = ("Install keras==3.15.* (pyproject.toml pins it); until "
                     "keras_vit.keras_internals is updated, the first fit of a model made "
                     "outside a tf.distribute scope traces its step twice (slower, not wrong).")


@functools.cache
def check_build_before_first_trace():
    """Raises KerasInternalsChanged unless Keras' TensorFlow trainer still builds a model's
    state from a batch in `_maybe_symbolic_build`, skipped when the model has no
    distribution strategy, and `Trainer._symbolic_build` builds the metrics, the loss and the
    optimizer there."""
    from keras.src.backend.tensorflow import trainer as tf_trainer
    from keras.src.trainers import trainer

    _require_source("TensorFlowTrainer._maybe_symbolic_build",
                    tf_trainer.TensorFlowTrainer._maybe_symbolic_build,
                    ["(self, iterator=None, data_batch=None)",
                     "if self._distribute_strategy is None:",
                     "self._symbolic_build(data_batch=data_batch)"], _BUILD_WORKAROUND)
    _require_source("Trainer._symbolic_build", trainer.Trainer._symbolic_build,
                    ["compile_metrics_unbuilt", "compile_loss_unbuilt",
                     "self.optimizer.build(self.trainable_variables)"], _BUILD_WORKAROUND)


class BuiltBeforeFirstTrace:
    """Mixin for a `keras.Model`: on the TensorFlow backend, `fit`, `evaluate`,
    `train_on_batch` and `test_on_batch` build the metrics', loss's and optimizer's variables
    from the first batch before they trace their step, as Keras does under any
    `tf.distribute` strategy (and on JAX and torch always).

    Keras 3.15 defers that building to the first trace for a model made outside a strategy's
    scope (a notebook's), and a `tf.function` that creates variables is traced twice: the
    first fit of a 2-block ViT took 6.3 s, 3.4 s built first. Models made under a strategy
    (`keras-vit train`'s) are left to Keras."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        import tensorflow as tf  # only Keras' TensorFlow trainer calls this method

        if self._distribute_strategy is None and not tf.distribute.has_strategy():
            check_build_before_first_trace()
            # What Keras does for a model made in a strategy's scope, with the default one.
            self._distribute_strategy = tf.distribute.get_strategy()
            try:
                return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
            finally:
                self._distribute_strategy = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


def check_all():
    """Runs every check of this module; returns the names checked (KerasInternalsChanged on
    the first that fails)."""
    checks = [check_gradient_clipping, check_stateless_seeds, check_global_seed,
              check_build_before_first_trace, check_keras_20585]
    for check in checks:
        check()
    return [check.__name__ for check in checks]


# --------------------------------------------------------------------------------------------
# keras-team/keras#20585 (also tensorflow/tensorflow#72388): model.fit under
# MultiWorkerMirroredStrategy fails in Keras 3.

_FIX_MARK = "_keras_vit_fix_keras_20585"

# sha256 of inspect.getsource() of the two Keras 3.15.1 functions the fix wraps. Checked by
# tests/test_distribute.py, so that a Keras upgrade that touches them fails a test.
KERAS_20585_SOURCES = {
    "TensorFlowTrainer._maybe_symbolic_build":
        "92a504f5eba9b29f81f1bf26180bdd5bf5186b06b7bda426534b90d2d02bc1c2",
    "reduce_per_replica":
        "2e7d54b1e6edc29a8c6a7e6b66cd4c8be3ba7842412c93753ac3afe169fa7fb8",
}

# What the fix relies on in those functions, checked each time it is applied: the two buggy
# calls it replaces, and the paths it delegates to.
_KERAS_20585_NEEDS = {
    "TensorFlowTrainer._maybe_symbolic_build": (
        "(self, iterator=None, data_batch=None)",
        "if iterator is not None:",
        "self.distribute_strategy.reduce(",
        "self._symbolic_build(data_batch=data_batch)",
    ),
    "reduce_per_replica": (
        "(values, strategy, reduction)",
        "if _collective_all_reduce_multi_worker(strategy):",
        'return strategy.reduce("MEAN", v, axis=0)',
    ),
}


def fix_keras_20585():
    """Makes `model.fit`/`evaluate` work under MultiWorkerMirroredStrategy on Keras 3.15.

    (`model.predict` works without it: it reduces with "concat", which Keras handles.)

    keras-team/keras#20585, tensorflow/tensorflow#72388: with two or more workers, Keras 3's
    TensorFlow trainer (keras/src/backend/tensorflow/trainer.py) fails twice:

    1. `TensorFlowTrainer._maybe_symbolic_build` takes the first distributed batch, a nest
       such as `(PerReplica(images), PerReplica(labels))`, and calls
       `strategy.reduce("MEAN", batch, axis=None)` on the whole nest. `Strategy.reduce` takes
       one value, not a nest; single-worker strategies treat the nest as a non-distributed
       value and hand it back unchanged, but MultiWorkerMirroredStrategy with several workers
       (CollectiveAllReduceExtended._reduce_to) passes it to its cross-worker all-reduce, which
       fails: "Attempt to convert a value (PerReplica:{...}) with an unsupported type".
       The batch is only used for its shapes and dtypes (to build the model symbolically), so
       the fix gives Keras this worker's first local replica's batch instead; no cross-worker
       all-reduce of a whole batch of images.
    2. `reduce_per_replica(..., reduction="auto")`, applied inside the train/test step to the
       logs (scalar metric results), takes the multi-worker branch
       `strategy.reduce("MEAN", v, axis=0)`: axis 0 of a scalar does not exist ("Invalid
       reduction dimension 0 for input with 0 dimensions"). The fix reduces with `axis=None`,
       the element-wise mean across replicas, which is what the single-worker branch of the
       same function computes (`tf.reduce_mean(local_results, axis=0)`).

    Only multi-worker MultiWorkerMirroredStrategy (Keras' own
    `_collective_all_reduce_multi_worker(strategy)` test) takes the new paths; every other
    strategy and reduction still runs Keras' code unchanged. Both wrappers delegate to the
    originals. Idempotent: a second call changes nothing.

    Returns:
        True if this call patched Keras, False if the fix was already in place.

    Raises:
        KerasInternalsChanged: Keras changed the code this fix relies on (check whether the
            bug is fixed upstream; tests/test_distribute.py tells).
    """
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    cls = tf_trainer.TensorFlowTrainer
    changed = False
    if not getattr(cls._maybe_symbolic_build, _FIX_MARK, False):
        _check_keras_20585_target("TensorFlowTrainer._maybe_symbolic_build",
                                  cls._maybe_symbolic_build)
        original_build = cls._maybe_symbolic_build

        @functools.wraps(original_build)
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            strategy = self._distribute_strategy
            if (iterator is not None and strategy is not None
                    and tf_trainer._collective_all_reduce_multi_worker(strategy)):
                # Same first batch Keras takes, but one local replica's share of it.
                for _, _, it in iterator:
                    data_batch = tree.map_structure(
                        lambda v: (strategy.experimental_local_results(v)[0]
                                   if isinstance(v, tf.distribute.DistributedValues) else v),
                        next(it))
                    break
                iterator = None
            return original_build(self, iterator=iterator, data_batch=data_batch)

        setattr(_maybe_symbolic_build, _FIX_MARK, True)
        cls._maybe_symbolic_build = _maybe_symbolic_build
        changed = True

    if not getattr(tf_trainer.reduce_per_replica, _FIX_MARK, False):
        _check_keras_20585_target("reduce_per_replica", tf_trainer.reduce_per_replica)
        original_reduce = tf_trainer.reduce_per_replica

        @functools.wraps(original_reduce)
        def reduce_per_replica(values, strategy, reduction):
            if (reduction in ("auto", "mean")
                    and tf_trainer._collective_all_reduce_multi_worker(strategy)):
                return tree.map_structure(
                    lambda v: None if v is None else strategy.reduce("MEAN", v, axis=None),
                    values)
            return original_reduce(values, strategy, reduction)

        setattr(reduce_per_replica, _FIX_MARK, True)
        # The train/test/predict step functions look the name up in the module when traced.
        tf_trainer.reduce_per_replica = reduce_per_replica
        changed = True
    return changed


def keras_20585_sources():
    """{name: sha256} of the Keras functions `fix_keras_20585` wraps (the originals)."""
    from keras.src.backend.tensorflow import trainer as tf_trainer

    cls = tf_trainer.TensorFlowTrainer
    functions = {"TensorFlowTrainer._maybe_symbolic_build": cls._maybe_symbolic_build,
                 "reduce_per_replica": tf_trainer.reduce_per_replica}
    return {name: hashlib.sha256(inspect.getsource(inspect.unwrap(f)).encode()).hexdigest()
            for name, f in functions.items()}


_20585_WORKAROUND = (
    "Check whether keras-team/keras#20585 (model.fit under MultiWorkerMirroredStrategy) is "
    "fixed upstream (tests/test_distribute.py runs the unpatched reproduction), then update or "
    "drop keras_vit.keras_internals.fix_keras_20585; until then install keras==3.15.* or train "
    "without --strategy multi-worker.")


def _check_keras_20585_target(name, function):
    _require_source(name, function, _KERAS_20585_NEEDS[name], _20585_WORKAROUND)


def check_keras_20585():
    """Raises KerasInternalsChanged unless the Keras functions `fix_keras_20585` wraps still
    have the calls it replaces and the paths it delegates to (checked on the originals)."""
    from keras.src.backend.tensorflow import trainer as tf_trainer

    cls = tf_trainer.TensorFlowTrainer
    _check_keras_20585_target("TensorFlowTrainer._maybe_symbolic_build",
                              cls._maybe_symbolic_build)
    _check_keras_20585_target("reduce_per_replica", tf_trainer.reduce_per_replica)
