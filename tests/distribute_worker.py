"""One training process for tests/test_distribute.py (it must be a fresh process: logical CPU
devices and multi-worker collectives can only be configured before TensorFlow starts).

    python tests/distribute_worker.py mirrored --out DIR
    TF_CONFIG=... python tests/distribute_worker.py multi-worker --out RUN_DIR --report DIR \
        [--reproduce]

Each writes a JSON report (DIR/report.json, or DIR/<task_type>-<index>.json and .npz of the
final weights for multi-worker) that the tests read.
"""

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GLOBAL_BATCH = 16
NUM_CLASSES = 3
MULTI_WORKER_SEED = 1  # worker i seeds with MULTI_WORKER_SEED + i
START = time.monotonic()


def log(message):
    """Progress with elapsed seconds; the tests show it when a run fails or hangs."""
    print(f"[{time.monotonic() - START:6.1f}s] {message}", flush=True)


def tiny_vit():
    import keras_vit
    from keras_vit.variants import Variant

    # One block: under MultiWorkerMirroredStrategy on 2 busy cores each block adds ~8 s of
    # first-step tracing.
    tiny = Variant("tiny", width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4)
    return keras_vit.build(tiny, image_size=16, num_classes=NUM_CLASSES)


def dataset(n=96, seed=0):
    """Learnable 16x16 images: class k is brighter in colour channel k."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n).astype("int32")
    images = rng.normal(0.0, 0.3, (n, 16, 16, 3)).astype("float32")
    images[np.arange(n), :, :, labels] += 0.8
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def compile_model(model):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])


def task_name():
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    return f"{task['type']}-{task['index']}"


def run_mirrored(args):
    import keras

    from keras_vit.training import distribute

    report = {}
    strategy = distribute.make_strategy("mirrored", cpu_devices=2)
    report["strategy"] = distribute.describe(strategy)
    report["replicas"] = strategy.num_replicas_in_sync
    report["devices"] = list(strategy.extended.worker_devices)
    report["per_replica_batch"] = distribute.per_replica_batch_size(GLOBAL_BATCH, strategy)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = tiny_vit()
        compile_model(model)
    log(f"{report['strategy']}; fit")
    history = model.fit(dataset(), epochs=4, verbose=0, shuffle=False)
    report["loss"] = [float(v) for v in history.history["loss"]]
    report["accuracy"] = [float(v) for v in history.history["accuracy"]]
    # Asking again for the same split is fine; a different split is too late now.
    report["again"] = distribute.make_strategy("mirrored", cpu_devices=2).num_replicas_in_sync
    try:
        distribute.make_strategy("mirrored", cpu_devices=3)
        report["too_late_error"] = None
    except RuntimeError as e:
        report["too_late_error"] = str(e)
    (Path(args.out) / "report.json").write_text(json.dumps(report))
    log("done")


def run_multi_worker(args):
    import keras
    import numpy as np

    from keras_vit.training import distribute

    strategy = distribute.make_strategy("multi-worker")
    report = {"strategy": distribute.describe(strategy),
              "replicas": strategy.num_replicas_in_sync,
              "is_chief": distribute.is_chief(strategy),
              "should_checkpoint": bool(strategy.extended.should_checkpoint)}
    log(report["strategy"])
    if args.reproduce:
        with strategy.scope():
            report["reproduce"] = reproduce_keras_20585()
        log("reproduced keras-team/keras#20585: "
            + ", ".join(f"{k}: {(v['error'] or 'no error')[:60]!r}"
                        for k, v in report["reproduce"].items()))
    # A different seed on each worker: MWMS must start every worker from worker 0's weights.
    task_index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    keras.utils.set_random_seed(MULTI_WORKER_SEED + task_index)
    with strategy.scope():
        model = tiny_vit()
        compile_model(model)
    out = distribute.worker_dir(args.out, strategy)
    backup = keras.callbacks.BackupAndRestore(out / "backup")
    log("fit")
    # The logs of each epoch's last step (reduced across workers in the step function).
    last_step, report["last_step_logs"] = {}, []

    def on_epoch_end(epoch, logs):
        report["last_step_logs"].append(dict(last_step))
        log(f"epoch {epoch}: {logs}")

    progress = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: last_step.update(
            {k: float(v) for k, v in logs.items()}),
        on_epoch_end=on_epoch_end)
    history = model.fit(dataset(), epochs=3, verbose=0, shuffle=False,
                        callbacks=[backup, progress])
    report["loss"] = [float(v) for v in history.history["loss"]]
    report["accuracy"] = [float(v) for v in history.history["accuracy"]]
    # What `keras-vit train` compares after restoring each worker's own backup.
    report["gathered"] = distribute.values_across_workers(100 + task_index, strategy)
    log(f"loss {report['loss']}; evaluate")
    report["evaluate"] = [float(v) for v in model.evaluate(dataset(), verbose=0)]
    log("save")
    path = out / "model.weights.h5"
    model.save_weights(path)  # every worker saves; only the chief's lands in the run folder
    report["saved_to"] = str(path)
    report["saved_exists"] = path.is_file()
    np.savez(Path(args.report) / f"{task_name()}.npz", *model.get_weights())
    removed = distribute.remove_worker_dir(args.out, strategy)
    report["removed"] = None if removed is None else str(removed)
    (Path(args.report) / f"{task_name()}.json").write_text(json.dumps(report))
    log("done")


def reproduce_keras_20585():
    """model.fit under the current MWMS scope with Keras' own functions, then with part 1 of
    the fix only; returns {"none": {...}, "build": {...}}, each with the error it raised.

    Runs with the originals the fix wrapped (`__wrapped__`), then puts the fix back. Both
    failures happen before any collective op runs (eagerly in Python, or while tracing), the
    same on every worker, so training can go on afterwards.
    """
    import keras
    import numpy as np
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    cls = tf_trainer.TensorFlowTrainer
    fixed_build, fixed_reduce = cls._maybe_symbolic_build, tf_trainer.reduce_per_replica
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    results = {}
    keras.config.disable_traceback_filtering()  # keep Keras' frames in the traceback
    try:
        for stage, build in (("none", fixed_build.__wrapped__), ("build", fixed_build)):
            cls._maybe_symbolic_build = build
            tf_trainer.reduce_per_replica = fixed_reduce.__wrapped__
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            compile_model(model)
            try:
                model.fit(ds, epochs=1, verbose=0, shuffle=False)
                results[stage] = {"error": None}
            except Exception as e:  # the reproduction: which error, raised where
                frames = [f.name for f in traceback.extract_tb(e.__traceback__)
                          if "/keras/src/" in f.filename.replace(os.sep, "/")]
                message = f"{type(e).__name__}: {e}"
                if len(message) > 2000:  # drops the middle of a printed batch
                    message = message[:500] + " [...] " + message[-1500:]
                results[stage] = {"error": message, "keras_frames": frames}
    finally:
        cls._maybe_symbolic_build, tf_trainer.reduce_per_replica = fixed_build, fixed_reduce
        keras.config.enable_traceback_filtering()
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["mirrored", "multi-worker"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--report")
    parser.add_argument("--reproduce", action="store_true",
                        help="multi-worker: first reproduce keras-team/keras#20585 unpatched")
    args = parser.parse_args()
    {"mirrored": run_mirrored, "multi-worker": run_multi_worker}[args.mode](args)


if __name__ == "__main__":
    main()
