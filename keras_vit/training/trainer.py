"""`keras_vit.train(config)`: train, evaluate and export a ViT with `model.fit` under a
`tf.distribute` strategy (TensorFlow only).

    result = keras_vit.train(keras_vit.TrainConfig(data="folder:flowers", variant="S/16"))
    result.test_accuracy, result.run_dir, result.export_report

A run folder receives config.json, model.keras, history.csv, curves.png, TensorBoard logs
and backups; a run that is killed resumes from its last backup when the same configuration
is trained again. `train` is a sequence of named steps (below); it logs to the
"keras_vit.train" logger, shows Keras' progress bars (`verbose`), raises the typed errors of
`keras_vit.errors`, and leaves Keras' global dtype policy and random seed as they were.
"""

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

from keras_vit.errors import ConfigError, ResumeError, TrainingDiverged
from keras_vit.run_dir import CONFIG_FILE, write_config
from keras_vit.training.config import (MAY_CHANGE, MUST_MATCH, TrainConfig, fields_with, flag)

logger = logging.getLogger("keras_vit.train")


@dataclasses.dataclass
class TrainResult:
    """What a finished `train` returns.

    run_dir: the run folder. history: per-epoch metrics of the whole run (resumed parts
    included), metric name -> list. test_accuracy, test_loss: on the held-out test split.
    steps: optimizer steps. weights_fingerprint: 16 hex digits of a SHA-256 of the weights
    (equal for equal weights). train_seconds: wall time of this call. export_report: the
    `ExportReport`, None with `export=False`. model: the trained `ViT`. config: the
    configuration as run (defaults filled in), as config.json holds it.
    """

    run_dir: Path
    history: dict
    test_accuracy: float
    test_loss: float
    steps: int
    weights_fingerprint: str
    train_seconds: float
    export_report: object
    model: object
    config: dict


def train(config=None, **changes):
    """Trains as `config` (a `TrainConfig`; `changes` override its fields) says.

    Returns:
        A `TrainResult`.

    Raises:
        ConfigError: a setting no run can use, or that does not fit the data or machine.
        DataError: the data cannot be used (the message says how to fix it).
        ResumeError: the run folder holds an unfinished run with other settings, or a backup
            that does not fit.
        CheckpointError / OSError: `weights` that cannot be read or do not fit.
        TrainingDiverged: the loss became NaN; the last good backup is kept.
        ExportVerificationError: the export after training failed its checks (the trained
            model is safe in the run folder; `.run_dir` on the error says where).
    """
    from keras_vit.keras_internals import seeded

    given = dataclasses.replace(config or TrainConfig(), **changes)
    config = given.resolved()
    start = time.time()
    strategy = _make_strategy(config)
    plan = _plan_model(config)
    data = _load_data(config)
    config, plan = _fit_to_data(given, config, plan, data, strategy)
    run = _open_run_folder(config, strategy)
    try:
        with seeded(config.seed), _distribution_active(strategy):
            teacher = _prepare_teacher(config, data, run, strategy)
            model, trained = _build_model(config, plan, data, strategy, run, teacher)
            step = _restore_backup(trained, run, strategy)
            pipelines = _make_pipelines(config, model, data, run, strategy)
            history = _fit(config, trained, pipelines, run, step)
            summary = _evaluate(trained, model, pipelines, start)
            _save_run(config, model, data, run, summary, strategy)
    except BaseException:
        run.discard_if_empty()
        raise
    report = _export(config, run, model) if run.chief and config.export else None
    if report is not None:
        summary["exported"] = str(_export_dir(config, run))
    return TrainResult(run_dir=run.path, history=history, test_accuracy=summary["test_accuracy"],
                       test_loss=summary["test_loss"], steps=summary["steps"],
                       weights_fingerprint=summary["weights_fingerprint"],
                       train_seconds=round(time.time() - start, 1), export_report=report,
                       model=model, config=run.config)


# --- steps ------------------------------------------------------------------------------------

def _make_strategy(config):
    """A tf.distribute strategy on the TensorFlow backend; keras.distribution on JAX."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        from keras_vit.training.jax_distribution import JaxDistribution

        if config.cpu_devices:
            raise ConfigError("--cpu-devices splits a CPU for TensorFlow's strategies; on the "
                              "JAX backend set XLA_FLAGS=--xla_force_host_platform_device_count"
                              f"={config.cpu_devices} and use --distribution data-parallel.")
        if config.strategy not in ("auto", "one-device"):
            raise ConfigError(f"--strategy {config.strategy} is TensorFlow's tf.distribute; on "
                              "the JAX backend use --distribution data-parallel or "
                              "model-parallel (keras.distribution).")
        return JaxDistribution(config.distribution)
    if backend != "tensorflow":
        raise ConfigError(f"keras-vit train runs on the TensorFlow or JAX backend, not "
                          f"{backend!r}: set KERAS_BACKEND=tensorflow (or jax).")
    if config.distribution != "none":
        raise ConfigError(f"--distribution {config.distribution} is keras.distribution on the "
                          "JAX backend (KERAS_BACKEND=jax); on TensorFlow use --strategy "
                          "mirrored or multi-worker.")
    from keras_vit.training import distribute

    try:
        return distribute.make_strategy(config.strategy, tpu_address=config.tpu_address,
                                        cpu_devices=config.cpu_devices)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(_flags_named(str(err))) from None


def _on_jax():
    import keras

    return keras.backend.backend() == "jax"


def _distribution_active(strategy):
    """On JAX, keras.distribution is read when `fit` and `evaluate` run, not only when the
    model is built: the whole run happens in its scope. (tf.distribute strategies need their
    scope only to build; `fit` finds the strategy on the variables.)"""
    import contextlib

    from keras_vit.training.jax_distribution import JaxDistribution

    return strategy.scope() if isinstance(strategy, JaxDistribution) else \
        contextlib.nullcontext()


def _for_devices(strategy, dataset):
    """Evaluation batches as the devices take them: padded for JAX data parallelism."""
    from keras_vit.training.jax_distribution import JaxDistribution

    return strategy.pad_for_devices(dataset) if isinstance(strategy, JaxDistribution) \
        else dataset


@dataclasses.dataclass
class _ModelPlan:
    variant: object
    grid: tuple
    weights: object  # an opened Checkpoint, a .weights.h5 path, or None


def _plan_model(config):
    """Checks the model settings and opens the weights before the data loads or anything is
    written: a missing file, an unknown name or a failed download stops here."""
    from keras_vit.layers import patch_grid
    from keras_vit.variants import parse_variant

    try:
        variant = parse_variant(config.variant, config.patch_size)
    except (ValueError, TypeError) as err:
        raise ConfigError(_flags_named(str(err))) from None
    height, width = config.image_size
    try:
        grid = patch_grid(height, width, variant.stride)
    except ValueError as err:
        raise ConfigError(f"{err} Here: --image-size HEIGHTxWIDTH (now {height}x{width}), or "
                          "another --patch-size or --variant.") from None
    if grid[0] * grid[1] < 4:  # e.g. --variant Ti/16 on the 16x16 digits
        logger.warning(f"{height}x{width} images in {variant.stride}x{variant.stride} px "
                       f"patches make {grid[0] * grid[1]} token(s): attention has next to "
                       "nothing to relate. Use a smaller --patch-size or a larger --image-size.")
    weights = config.weights
    if weights:
        from keras_vit.checkpoints import open_weights

        weights = open_weights(weights, variant=variant) or weights  # None: .weights.h5
    return _ModelPlan(variant, grid, weights)


def _flags_named(message):
    """A library message about an argument, in the command line's spelling."""
    for name in ("patch_size", "image_size", "num_classes", "depth", "cpu_devices",
                 "tpu_address"):
        message = message.replace(f"{name}=", flag(name) + " ").replace(f"pass {name}", "pass "
                                                                        + flag(name))
    return message


def _load_data(config):
    from keras_vit.training import data as data_lib

    data = data_lib.load_data(config.data, config.image_size, data_dir=config.data_dir,
                              validation_split=config.validation_split,
                              test_split=config.test_split, seed=config.seed,
                              train_fraction=config.train_fraction)
    for split, fix in (("train", "lower --validation-split/--test-split"),
                       ("test", "raise --test-split or put images in test/")):
        if not data.sizes[split]:
            raise ConfigError(f"The {split} split of {config.data} is empty ({data.sizes}); "
                              f"{fix}.")
    if data.skipped:
        shown = "\n  ".join(data.skipped[:20])
        more = f"\n  ... and {len(data.skipped) - 20} more" if len(data.skipped) > 20 else ""
        logger.warning(f"Skipped {len(data.skipped)} unreadable file(s):\n  {shown}{more}")
    return data


def _fit_to_data(given, config, plan, data, strategy):
    """The data's defaults where the user set nothing (`keras_vit.training.defaults`), then the
    checks that depend on the data and the machine (batch against replicas)."""
    from keras_vit.training.defaults import fit_to_data

    fitted, why = fit_to_data(given, config, data)
    if why:
        logger.info(why)
    if fitted.image_size != config.image_size:
        data.image_size = tuple(fitted.image_size)
    if (fitted.variant, fitted.image_size, fitted.patch_size) != (
            config.variant, config.image_size, config.patch_size):
        plan = _plan_model(fitted)
    replicas = strategy.num_replicas_in_sync
    if fitted.batch_size % replicas:
        raise ConfigError(f"--batch-size {fitted.batch_size} is not divisible by the "
                          f"{replicas} replicas; use a multiple of {replicas}.")
    return fitted, plan


class _RunFolder:
    """The run folder: chosen, resumed or created; removed again if this call created it and
    the run failed before its first backup."""

    def __init__(self, path, resuming, config, strategy):
        from keras_vit.training import distribute

        self.path = Path(path)
        self.resuming = resuming
        self.config = config
        self.strategy = strategy
        self.chief = distribute.is_chief(strategy)
        self.created = not self.path.exists()
        self.work = Path(distribute.worker_dir(self.path, strategy))
        self.backup_dir = self.work / "backup"
        self.backup = None  # a RunBackup once the model is built

    def write_config(self):
        if self.chief:
            write_config(self.path, self.config)

    def discard_if_empty(self):
        if self.created and not self.backup_dir.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def data_name(spec):
    return Path(spec.partition(":")[2] or spec).name.replace("/", "_") or "run"


def _open_run_folder(config, strategy):
    path, resuming, changed = choose_run_dir(config)
    as_json = config.to_json()
    if changed:
        as_json["changed_on_resume"] = changed
    return _RunFolder(path, resuming, as_json, strategy)


def choose_run_dir(config):
    """(run folder, resuming, changes on resume). An unfinished run there is resumed from its
    backup (the settings that must match, matching; one that stopped before its first backup
    is started afresh); a finished one is kept and this run goes to a new numbered folder.

    Raises:
        ResumeError: the folder holds an unfinished run whose must-match settings differ.
    """
    base = Path(config.out or Path("runs") / data_name(config.data))
    if base.exists() and not base.is_dir():
        raise ConfigError(f"--out {base} is a file: give a folder for the run (it is "
                          "created if missing).")
    candidate, n = base, 1
    while True:
        config_path = candidate / CONFIG_FILE
        if not config_path.exists():
            if candidate != base:
                logger.info(f"{base} holds a finished run (kept as it is): this run goes to "
                            f"{candidate}.")
            return candidate, False, []
        previous = json.loads(config_path.read_text())
        if not previous.get("finished"):
            if not (candidate / "backup").exists():  # it never trained a step: nothing to keep
                # and nothing to mix into the new run's curves
                (candidate / "history.csv").unlink(missing_ok=True)
                shutil.rmtree(candidate / "logs", ignore_errors=True)
                return candidate, False, []
            then = _as_resolved(previous)
            now = config.to_json()
            mismatched = {k: (then.get(k), now.get(k)) for k in fields_with(MUST_MATCH)
                          if then.get(k) != now.get(k)}
            if mismatched:
                detail = ", ".join(f"{flag(k)}: {a} then, {b} now"
                                   for k, (a, b) in mismatched.items())
                raise ResumeError(
                    f"{candidate} holds an unfinished run with other settings ({detail}). "
                    "Start it again with the same settings to resume, or pass --out "
                    "NEW_FOLDER for a new run.")
            # Training settings may change on resume (a lower --learning-rate after a NaN
            # stop), but not silently: config.json keeps what each resume changed.
            changed = {k: [then[k], now.get(k)] for k in fields_with(MAY_CHANGE)
                       if k in then and then[k] != now.get(k)}
            history = previous.get("changed_on_resume", []) + ([changed] if changed else [])
            if changed:
                detail = ", ".join(f"{flag(k)}: {a} then, {b} now"
                                   for k, (a, b) in changed.items())
                logger.warning(f"Resuming {candidate} with other settings than it was started "
                               f"with ({detail}); the rest of the run uses the new ones "
                               "(config.json lists them under changed_on_resume).")
            return candidate, True, history
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")


def _as_resolved(previous):
    """A run's config.json as this version resolves it (older runs left some defaults None)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    known = {k: v for k, v in previous.items() if k in names and k != "augmentation_layers"}
    if "no_export" in previous:  # keras-vit 0.1's flag
        known["export"] = not previous["no_export"]
    try:
        resolved = TrainConfig(**known).resolved().to_json()
    except ConfigError:
        return previous
    resolved["augmentation_layers"] = previous.get("augmentation_layers", [])
    return resolved


def _build_model(config, plan, data, strategy, run, teacher=None):
    """(the ViT, the model `fit` trains: the ViT itself, or a `Distiller` around it)."""
    import keras

    import keras_vit

    precision = pick_precision(config, strategy)
    jit = pick_jit_compile(config, precision, strategy)
    replicas = strategy.num_replicas_in_sync
    per_replica_batch = config.batch_size // replicas
    tokens = plan.grid[0] * plan.grid[1]
    if hasattr(strategy, "check"):  # keras.distribution on JAX
        try:
            strategy.check(plan.variant.num_heads, plan.variant.mlp_dim, config.batch_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    from keras_vit.training import data as data_lib
    from keras_vit.training.distribute import describe
    from keras_vit.training.micro_batches import part_sizes, use_micro_batches

    spe = data_lib.steps_per_epoch(data.sizes["train"], config.batch_size)
    micro_batches = pick_micro_batches(config, per_replica_batch, tokens + 1, strategy,
                                       total_steps=spe * config.epochs)
    run.config.update(num_classes=len(data.class_names), class_names=data.class_names,
                      precision=precision, steps_per_epoch=spe, replicas=replicas,
                      micro_batches=micro_batches, finished=False)
    run.write_config()
    height, width = config.image_size
    stride = plan.variant.stride
    logger.info(
        f"{'Resuming' if run.resuming else 'Starting'} run {run.path}: {config.variant} "
        f"({height}x{width} images, {tokens} tokens of {stride}x{stride} px) on {config.data} "
        f"({data.sizes['train']} train / {data.sizes['validation']} validation / "
        f"{data.sizes['test']} test, {len(data.class_names)} classes), {describe(strategy)}, "
        f"{precision}, XLA {'on' if jit else 'off'}"
        + (", {} micro-batches of {} per replica".format(
            *part_sizes(per_replica_batch, micro_batches)) if micro_batches > 1 else ""))
    with strategy.scope():
        model = keras_vit.build(
            config.variant, image_size=config.image_size, num_classes=len(data.class_names),
            patch_size=config.patch_size, depth=config.depth, pooling=config.pooling,
            gelu=config.gelu, normalization=config.normalization, dropout_rate=config.dropout,
            attention_dropout_rate=config.attention_dropout, drop_path_rate=config.drop_path,
            weights=plan.weights, dtype=precision)
        plan.weights = None  # the model holds the checkpoint's values now: free its arrays
        trained = model
        if teacher is not None:  # DeiT: the student trains against the teacher's answers
            from keras_vit.training.distill import Distiller

            trained = Distiller(model, teacher, mode=config.distillation,
                                alpha=config.distillation_alpha,
                                temperature=config.distillation_temperature,
                                label_smoothing=config.label_smoothing)
            trained.compile(optimizer=build_optimizer(config, spe, model),
                            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                            jit_compile=jit)
        else:
            model.compile(optimizer=build_optimizer(config, spe, model),
                          loss=keras.losses.CategoricalCrossentropy(
                              from_logits=True, label_smoothing=config.label_smoothing),
                          metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                          jit_compile=jit)
        trained.optimizer.build(model.trainable_variables)
    use_micro_batches(trained, micro_batches)
    return model, trained


TEACHER_ACCURACY = "teacher_accuracy.json"  # beside teacher.keras: its test accuracy


def _prepare_teacher(config, data, run, strategy):
    """The teacher of a distillation run: a `.keras` file or a run folder's model, or for
    "resnet" a small ResNet trained here first on the same data (kept in the run folder as
    teacher.keras, so a resumed run does not train it again); None without distillation."""
    if config.distillation == "none":
        return None
    from keras_vit.keras_internals import seeded

    # The teacher draws its random numbers apart from the student's: the student starts the
    # same whether the teacher was trained here, read back on resume or given as a file.
    with seeded(config.seed + 1):
        return _read_or_train_teacher(config, data, run, strategy)


def _read_or_train_teacher(config, data, run, strategy):
    from keras_vit.model import load_model

    classes = len(data.class_names)
    if config.teacher == "resnet":
        path = run.path / "teacher.keras"
        if not path.is_file():
            return _train_teacher(config, data, run, strategy)
        measured = run.path / TEACHER_ACCURACY  # (a resumed run: the teacher trained before)
        if measured.is_file():
            run.config["teacher_test_accuracy"] = json.loads(measured.read_text())["test_accuracy"]
    else:
        path = Path(config.teacher)
        if path.is_dir():
            path = path / "model.keras"
        if not path.is_file():
            raise ConfigError(f"--teacher {config.teacher}: no such .keras file or run folder. "
                              "Give a trained classifier's .keras file, a run folder, or "
                              "resnet (a small CNN trained first on the same data).")
    with strategy.scope():
        teacher = load_model(path, compile=False)
    outputs = teacher.outputs[0].shape[-1] if len(teacher.outputs) == 1 else None
    if outputs != classes:
        raise ConfigError(f"--teacher {path} has {outputs} outputs but {config.data} has "
                          f"{classes} classes: a teacher must classify the same classes.")
    run.config["teacher_model"] = str(path)
    return teacher


def _train_teacher(config, data, run, strategy):
    """Trains `small_resnet` on the run's data with its augmentation (as pixels), the same
    epochs and an AdamW recipe; saves it as the run folder's teacher.keras."""
    import keras
    import tensorflow as tf

    from keras_vit import recipes
    from keras_vit.training import augment
    from keras_vit.training import data as data_lib
    from keras_vit.model import load_model
    from keras_vit.training.distill import small_resnet

    classes = len(data.class_names)
    spe = data_lib.steps_per_epoch(data.sizes["train"], config.batch_size)
    logger.info(f"Training the teacher first: a small ResNet on {config.data} "
                f"({config.epochs} epochs of {spe} steps).")
    cache = data_lib.estimated_cache_bytes(data, config.image_size) < 4 * 2**30
    augment_config = augment.AugmentConfig(
        flip=config.flip, translate=config.translate, rotate=config.rotate, zoom=config.zoom,
        randaugment=config.randaugment, mixup=config.mixup, cutmix=config.cutmix)
    batches = data_lib.training_batches(
        data, config.batch_size, seed=config.seed + 1, cache=cache, crop_area=config.crop_area,
        augment=augment.make_augmenter(augment_config, classes, "none")).prefetch(
        tf.data.AUTOTUNE)
    test = _for_devices(strategy, data_lib.evaluation_batches(
        data.test, config.batch_size, cache).map(augment.prepare_evaluation(classes, "none")))
    with strategy.scope():
        teacher = small_resnet(tuple(config.image_size), classes)
        total = config.epochs * spe
        teacher.compile(optimizer=recipes.pretrain_optimizer(
                            total_steps=max(total, 2), learning_rate=1e-3,
                            warmup_steps=min(spe, total - 1), weight_decay=1e-4),
                        loss=keras.losses.CategoricalCrossentropy(
                            from_logits=True, label_smoothing=config.label_smoothing),
                        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    teacher.fit(batches, epochs=config.epochs, steps_per_epoch=spe, verbose=config.verbose,
                shuffle=False)
    path = run.path / "teacher.keras"
    run.path.mkdir(parents=True, exist_ok=True)
    partial = run.path / "teacher.partial.keras"  # a kill before the end leaves no teacher.keras
    teacher.save(partial)
    # The student learns from the teacher read back from its file: under MirroredStrategy each
    # replica keeps its own batch-norm moving statistics (Keras' default) and the file holds
    # the first replica's, so this is the teacher a resumed run reads too (same weights).
    with strategy.scope():
        teacher = load_model(partial, compile=False)
        teacher.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    _, accuracy = teacher.evaluate(test, verbose=0)
    logger.info(f"Teacher test accuracy: {accuracy:.4f}")
    (run.path / TEACHER_ACCURACY).write_text(json.dumps({"test_accuracy": float(accuracy)}))
    os.replace(partial, path)
    run.config.update(teacher_model=str(path), teacher_test_accuracy=float(accuracy))
    return teacher


def _restore_backup(model, run, strategy):
    from keras_vit.training.callbacks import RunBackup

    run.backup = RunBackup(run.backup_dir, save_freq=run.config["checkpoint_every"])
    step = restore_on_every_worker(run.backup, model, strategy)
    spe, epochs = run.config["steps_per_epoch"], run.config["epochs"]
    if step:
        logger.info(f"Restored the backup at step {step} of {epochs * spe} "
                    f"(epoch {step // spe + 1}, batch {step % spe}).")
    return step


@dataclasses.dataclass
class _Pipelines:
    train: object  # skip -> the training batches from batch `skip` on
    validation: object
    test: object


def _make_pipelines(config, model, data, run, strategy):
    import tensorflow as tf

    from keras_vit.training import augment
    from keras_vit.training import data as data_lib

    num_classes = len(data.class_names)
    cache = data_lib.estimated_cache_bytes(data, config.image_size) < 4 * 2**30
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = \
        tf.data.experimental.AutoShardPolicy.DATA
    augment_config = augment.AugmentConfig(
        flip=config.flip, translate=config.translate, rotate=config.rotate, zoom=config.zoom,
        randaugment=config.randaugment, mixup=config.mixup, cutmix=config.cutmix)
    augmenter = augment.make_augmenter(augment_config, num_classes, model.normalization,
                                       config.augmentation_layers)

    def train_batches(skip):
        return (data_lib.training_batches(
                    data, config.batch_size, seed=config.seed, cache=cache,
                    crop_area=config.crop_area, skip_batches=skip, augment=augmenter)
                .prefetch(tf.data.AUTOTUNE).with_options(options))

    prepare = augment.prepare_evaluation(num_classes, model.normalization)

    def evaluation(split):
        return _for_devices(strategy, data_lib.evaluation_batches(
            split, config.batch_size, cache).map(prepare)).prefetch(
                tf.data.AUTOTUNE).with_options(options)

    # --validation-split 0: every labelled example trains, no validation curves.
    validation = evaluation(data.validation) if data.sizes["validation"] else None
    return _Pipelines(train_batches, validation, evaluation(data.test))


def _fit(config, model, pipelines, run, step):
    import keras

    from keras_vit.training.callbacks import StopOnNaN

    nan_guard = StopOnNaN()
    callbacks = [nan_guard, run.backup,
                 keras.callbacks.CSVLogger(str(run.work / "history.csv"), append=True),
                 keras.callbacks.TensorBoard(str(run.work / "logs"), update_freq="epoch")]
    spe = run.config["steps_per_epoch"]
    for first_epoch, end_epoch, steps, skip in fit_segments(step, spe, config.epochs):
        if nan_guard.stopped_at is None:
            model.fit(pipelines.train(skip), initial_epoch=first_epoch, epochs=end_epoch,
                      steps_per_epoch=steps, validation_data=pipelines.validation,
                      callbacks=callbacks, verbose=config.verbose, shuffle=False)
    if nan_guard.stopped_at is not None:
        epoch, batch = nan_guard.stopped_at
        raise TrainingDiverged(
            f"Training stopped: the loss became NaN at epoch {epoch}, step {batch}. The last "
            f"good backup is kept in {run.backup_dir}; lower --learning-rate and start the "
            "same command again to resume from it (or start a new run with --out NEW_FOLDER "
            "--precision float32).", epoch=epoch, step=batch, backup_dir=run.backup_dir)
    return read_history(run.work / "history.csv")


def _evaluate(trained, model, pipelines, start):
    loss, accuracy = trained.evaluate(pipelines.test, verbose=0)
    return {"test_accuracy": float(accuracy), "test_loss": float(loss),
            "steps": int(trained.optimizer.iterations.numpy()),
            "weights_fingerprint": weights_fingerprint(model),
            "train_seconds": round(time.time() - start, 1)}


def _save_run(config, model, data, run, summary, strategy):
    from keras_vit.training import distribute
    from keras_vit.run_dir import save_run
    from keras_vit.training.plots import save_curves

    # Every worker saves (saving may need all of them); only the chief's copy is the run's.
    # The model goes without its optimizer state (a third of the file; resuming uses the
    # backups), so model.keras is the size of the weights.
    run.config.update(finished=True, result=summary)
    trained = type(model).from_config(model.get_config())
    trained.set_weights(model.get_weights())
    save_run(run.work, trained, run.config, _samples(data))
    shutil.rmtree(run.backup_dir, ignore_errors=True)
    distribute.remove_worker_dir(run.path, strategy)
    if run.chief:
        save_curves(run.path / "history.csv", run.path / "curves.png",
                    test_accuracy=summary["test_accuracy"],
                    schedule=learning_rate_schedule(config, run.config["steps_per_epoch"]),
                    steps_per_epoch=run.config["steps_per_epoch"],
                    label_smoothing=config.label_smoothing, num_classes=len(data.class_names))


def _export_dir(config, run):
    return Path(config.export_dir or Path("exported") / run.path.name)


def _export(config, run, model):
    from keras_vit.errors import ExportVerificationError
    from keras_vit.export import export_run

    export_dir = _export_dir(config, run)
    try:
        if _on_jax():
            return _export_with_tensorflow(run.path, export_dir)
        return export_run(run.path, export_dir)
    except ExportVerificationError as err:
        failed = ExportVerificationError(
            f"{err}\nThe trained model is safe in {run.path}; export it again with "
            f"`keras-vit export {run.path} --out {export_dir}`.")
        failed.run_dir = run.path
        raise failed from err


def _export_with_tensorflow(run_dir, export_dir):
    """The export of a run trained on another backend: SavedModel and TFLite need TensorFlow's,
    so `keras-vit export` runs in a process on it, from the saved model.keras."""
    import os
    import subprocess
    import sys

    from keras_vit.errors import ExportVerificationError
    from keras_vit.export import ExportReport

    logger.info("Exporting on the TensorFlow backend, in a process of its own ...")
    # On CPUs: this process's backend still holds the accelerator's memory, and export and
    # verification need none.
    result = subprocess.run([sys.executable, "-m", "keras_vit.cli", "export", str(run_dir),
                             "--out", str(export_dir), "--quiet"],
                            env={**os.environ, "KERAS_BACKEND": "tensorflow",
                                 "CUDA_VISIBLE_DEVICES": ""},
                            capture_output=True, text=True)
    if result.returncode:
        lines = result.stderr.strip().splitlines()
        said = [line for line in lines if line.startswith("keras-vit export:")]
        raise ExportVerificationError(
            "\n".join(said) if said else
            f"keras-vit export crashed (exit status {result.returncode}):\n"
            + "\n".join(lines[-20:]))
    report = ExportReport.read_json(Path(export_dir) / "report.json")
    logger.info(result.stdout.strip())
    return report


# --- helpers ----------------------------------------------------------------------------------

def fit_segments(step, steps_per_epoch, epochs):
    """The `fit` calls that take a run from optimizer step `step` to its end, as
    (initial_epoch, epochs, steps_per_epoch, batches to skip): a run killed mid-epoch first
    finishes that epoch, then goes on. Each call gets a new pipeline that skips what was
    trained: a second iterator over the same dataset would reshuffle into another stream."""
    segments = []
    epoch = step // steps_per_epoch
    if step % steps_per_epoch and epoch < epochs:
        segments.append((epoch, epoch + 1, steps_per_epoch - step % steps_per_epoch, step))
        epoch += 1
    if epoch < epochs:
        segments.append((epoch, epochs, steps_per_epoch, epoch * steps_per_epoch))
    return segments


def _steps(config, steps_per_epoch):
    """(total steps, warm-up steps) of a run."""
    total = config.epochs * steps_per_epoch
    if total < 2:
        raise ConfigError(f"{config.epochs} epoch(s) of {steps_per_epoch} step(s) is "
                          f"{total} step: train for at least 2 (more --epochs, or a smaller "
                          "--batch-size).")
    return total, min(int(config.warmup_epochs * steps_per_epoch), total - 1)


def learning_rate_schedule(config, steps_per_epoch):
    """The run's learning rate per step (`keras_vit.recipes.schedule`)."""
    from keras_vit import recipes

    total, warmup = _steps(config, steps_per_epoch)
    return recipes.schedule(config.learning_rate, total, warmup, config.schedule)


def build_optimizer(config, steps_per_epoch, model=None):
    """The run's optimizer from `keras_vit.recipes`: the preset's, with its settings."""
    from keras_vit import recipes

    total, warmup = _steps(config, steps_per_epoch)
    common = dict(total_steps=total, learning_rate=config.learning_rate, warmup_steps=warmup,
                  weight_decay=config.weight_decay, decay=config.schedule,
                  clip_norm=config.clip_norm)
    if config.optimizer == "sgd":
        return recipes.finetune_optimizer(model, momentum=config.momentum, **common)
    return recipes.pretrain_optimizer(model, **common)


def pick_precision(config, strategy):
    if config.precision != "auto":
        return config.precision
    if _on_jax():  # bfloat16 on TPUs and GPUs that have it (compute capability 8+), as below
        import jax

        device = jax.devices()[0]
        if device.platform == "tpu":
            return "mixed_bfloat16"
        capability = getattr(device, "compute_capability", None)
        if device.platform == "gpu" and capability and float(capability) >= 8:
            return "mixed_bfloat16"
        return "float32"
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "mixed_bfloat16"
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability and capability >= (8, 0):
            return "mixed_bfloat16"
    return "float32"


def pick_jit_compile(config, precision, strategy):
    """XLA on, unless asked otherwise, or under a strategy of several replicas or a TPU, or
    training bfloat16 on CPUs alone.

    Keras 3.15 compiles a replica's step for one device: with two replicas the step reads the
    other replica's variables and fails (MirroredStrategy), or finds no XLA collectives on CPU
    (MultiWorkerMirroredStrategy); Keras' own "auto" turns XLA off under tf.distribute for
    that reason, and a TPU compiles the step with XLA anyway. On CPUs alone TensorFlow's graph
    runs oneDNN's bfloat16 matmuls (avx512_bf16 / AMX) while XLA's CPU backend computes them
    slowly (measured, `fit` of the benchmark's training config: bfloat16 graph 1.19x float32
    XLA, bfloat16 XLA 0.84x). On JAX, XLA is how everything runs (off: eager, for debugging)."""
    if _on_jax():
        return config.jit_compile != "off"
    import tensorflow as tf

    several = strategy.num_replicas_in_sync > 1
    if config.jit_compile == "on" and several and not tf.config.list_physical_devices("GPU"):
        raise ConfigError(f"--jit-compile on does not run with {strategy.num_replicas_in_sync} "
                          "replicas on CPUs (Keras compiles each replica's step for one "
                          "device); leave --jit-compile at auto.")
    if config.jit_compile != "auto":
        return config.jit_compile == "on"
    if several or isinstance(strategy, tf.distribute.TPUStrategy):
        return False
    return bool(tf.config.list_physical_devices("GPU")) or "bfloat16" not in precision


def pick_micro_batches(config, per_replica_batch, tokens, strategy, total_steps=None):
    """--micro-batches: the count given, or for auto `auto_micro_batches` on what the replicas
    run on and how long the run is."""
    if _on_jax():
        if config.micro_batches not in ("auto", 1):
            raise ConfigError("--micro-batches N is TensorFlow's (it replaces its train step); "
                              "on JAX, shard a batch that does not fit with --distribution.")
        return 1
    import tensorflow as tf

    from keras_vit.training.micro_batches import auto_micro_batches

    if config.micro_batches != "auto":
        return config.micro_batches
    device_type = ("TPU" if isinstance(strategy, tf.distribute.TPUStrategy)
                   else "GPU" if tf.config.list_physical_devices("GPU") else "CPU")
    return auto_micro_batches(per_replica_batch, tokens, device_type, total_steps)


def restore_on_every_worker(backup, model, strategy):
    """`backup.restore(model)`, then a check that every worker of a multi-worker run restored
    a backup of the same step (each keeps its own); returns the batches trained.

    Raises:
        ResumeError: this worker's backup does not fit, another's could not be restored, or
            the workers restored different steps (the message says how to make them agree).
    """
    from keras_vit.training import distribute

    try:
        step, problem = backup.restore(model), None
    except (ValueError, OSError) as err:  # every worker still takes part in the gather below
        step, problem = -1, err
    steps = distribute.values_across_workers(step, strategy)
    if problem is not None:
        raise ResumeError(str(problem)) from problem
    if min(steps) < 0:
        raise ResumeError("Another worker could not restore its backup; its output says why.")
    if len(set(steps)) > 1:
        # Training on would hang in the collectives or train replicas apart.
        raise ResumeError(
            f"The workers restored different backups (batches trained, one per replica: "
            f"{steps}; this is {distribute.describe(strategy)}, at {step}); the job was "
            "stopped while some were writing one. Each worker's backup folder (backup/ in the "
            "run folder on the chief, .worker_temp/*/backup/ on the others) keeps the one "
            "before as latest.weights.h5.bkp and training_metadata.json.bkp: on the workers "
            "ahead, move those over latest.weights.h5 and training_metadata.json, then start "
            "the same command again.")
    return step


def read_history(history_csv):
    """history.csv (every epoch of the run, resumed parts included) as metric -> list."""
    import csv

    history = {}
    try:
        with open(history_csv) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key == "epoch":
                        continue
                    try:
                        history.setdefault(key, []).append(float(value))
                    except (TypeError, ValueError):
                        history.setdefault(key, []).append(None)
    except OSError:
        pass
    return history


def weights_fingerprint(model):
    """The first 16 hex digits of a SHA-256 over the model's weights (dtypes, shapes and
    values, in `model.get_weights()` order): equal for equal weights, e.g. on every worker of
    a multi-worker run, and for the run's model.keras loaded again."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for weight in model.get_weights():
        weight = np.ascontiguousarray(weight)
        digest.update(f"{weight.dtype.str}{weight.shape}".encode())
        digest.update(weight.tobytes())
    return digest.hexdigest()[:16]


def _samples(data, calibration=256, test_cap=2000):
    """uint8 images for export: training images to calibrate int8, held-out ones to verify."""
    import numpy as np

    calibration_images = np.stack([x for x, _ in data.train.take(calibration).as_numpy_iterator()])
    test = list(data.test.take(test_cap).as_numpy_iterator())
    return {"calibration_images": calibration_images,
            "test_images": np.stack([x for x, _ in test]),
            "test_labels": np.asarray([y for _, y in test], dtype=np.int32)}
