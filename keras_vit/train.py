"""`keras-vit train`: train a ViT with model.fit under a tf.distribute strategy (TensorFlow only).

    keras-vit train                                    # embedded digits, CPU, ~2 minutes
    keras-vit train --data folder:/data/flowers --variant S/16 --image-size 224 --epochs 30
    keras-vit train --data tfds:cifar10 --data-dir ~/tensorflow_datasets --strategy mirrored
    TF_CONFIG=... keras-vit train --strategy multi-worker ...

A run folder (--out) receives config.json, model.keras, history.csv, curves.png,
TensorBoard logs and backups; a run that is killed resumes from its last backup
when the same command is started again.
"""

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

from keras_vit.cli import positive_int

# Defaults that depend on the data: the embedded digits are 8x8 and few (1,259 to train on),
# so they get the paper's hybrid at a small scale: the ResNet root (7x7/2 convolution and
# 3x3/2 max-pool) turns 16x16 images into a 4x4 map whose positions are the tokens (1x1
# cells), feeding a Ti-width encoder of 6 blocks. The convolution's locality is what a plain
# ViT lacks on so little data (4x4 patches: 97.3% mean test accuracy; this: 98.7-99.0%).
# Everything else gets the paper's 224x224 set-up.
DATA_DEFAULTS = {
    "digits": dict(variant="R+Ti/16", image_size="16", patch_size=1, depth=6, epochs=50,
                   batch_size=64, learning_rate=1e-3, warmup_epochs=3, crop_area=1.0, flip=False,
                   translate=0.1, rotate=0.0, zoom=0.0, randaugment=0.0, mixup=0.0, cutmix=0.0,
                   label_smoothing=0.1, drop_path=0.1, weight_decay=0.05),
    "other": dict(variant="S/16", image_size="224", patch_size=None, depth=None, epochs=30,
                  batch_size=128, learning_rate=1e-3, warmup_epochs=5, crop_area=0.05, flip=True,
                  translate=0.0, rotate=0.0, zoom=0.0, randaugment=0.5, mixup=0.2, cutmix=1.0,
                  label_smoothing=0.1, drop_path=0.1, weight_decay=0.1),
}
PRESETS = {  # the paper: Adam(W) for pre-training, SGD with momentum for fine-tuning
    "pretrain": dict(optimizer="adamw"),
    "finetune": dict(optimizer="sgd", learning_rate=0.01, weight_decay=0.0, warmup_epochs=1,
                     mixup=0.0, cutmix=0.0, randaugment=0.0),
}
# Never decayed: biases, LayerNorm scales/offsets, class token, position embeddings.
NO_DECAY = ["bias", "gamma", "beta", "cls", "pos_embedding"]


def add_arguments(parser):
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="digits",
                      help="digits (embedded, default) | folder:PATH | tfds:NAME")
    data.add_argument("--data-dir", help="TFDS data_dir holding the prepared dataset")
    data.add_argument("--validation-split", type=float, default=0.1,
                      help="share of the training images held out for validation (default "
                           "0.1; 0: none)")
    data.add_argument("--test-split", type=float, default=None,
                      help="held-out test fraction when the data has no test split")
    model = parser.add_argument_group("model")
    model.add_argument("--variant", help="Ti/16, S/16, B/16, ... (default: per data)")
    model.add_argument("--image-size", help="224 or HEIGHTxWIDTH (default: per data)")
    model.add_argument("--patch-size", type=positive_int,
                       help="patch side in pixels; for hybrids (R50+B/16, R+Ti/16, ...) the "
                            "cell side on the ResNet stem's output")
    model.add_argument("--depth", type=positive_int, help="override the number of encoder blocks")
    model.add_argument("--pooling", choices=["token", "gap"],
                       help="token (default) or gap; with --weights, what the checkpoint has")
    model.add_argument("--gelu", choices=["tanh", "erf"],
                       help="tanh (default) or erf; with --weights, what the checkpoint has")
    model.add_argument("--dropout", type=float, default=0.0,
                       help="dropout after attention and in the MLP (default 0)")
    model.add_argument("--attention-dropout", type=float, default=0.0,
                       help="dropout on the attention weights (default 0)")
    model.add_argument("--drop-path", type=float,
                       help="stochastic depth rate at the last block (default 0.1)")
    model.add_argument("--weights", help="initial weights (checkpoint file or name)")
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--preset", choices=sorted(PRESETS), default="pretrain",
                        help="pretrain: AdamW; finetune: SGD with momentum (the paper's)")
    recipe.add_argument("--optimizer", choices=["adamw", "sgd"],
                        help="default: the --preset's (adamw; finetune: sgd)")
    recipe.add_argument("--epochs", type=positive_int,
                        help="default: 50 on digits, 30 on other data")
    recipe.add_argument("--batch-size", type=positive_int, help="global batch, split across replicas")
    recipe.add_argument("--learning-rate", type=float,
                        help="peak learning rate, after warm-up (default 1e-3; finetune: 0.01)")
    recipe.add_argument("--weight-decay", type=float,
                        help="decoupled weight decay, not on biases, norms and embeddings "
                             "(default 0.05 on digits, 0.1 on other data; finetune: 0)")
    recipe.add_argument("--momentum", type=float, default=0.9,
                        help="SGD momentum (default 0.9)")
    recipe.add_argument("--warmup-epochs", type=float,
                        help="linear warm-up (default 3 on digits, 5 on other data; finetune: 1)")
    recipe.add_argument("--schedule", choices=["cosine", "linear"], default="cosine",
                        help="decay to 0 after warm-up (default cosine)")
    recipe.add_argument("--clip-norm", type=float, default=1.0, help="global-norm clipping")
    recipe.add_argument("--label-smoothing", type=float, help="default 0.1")
    recipe.add_argument("--crop-area", type=float,
                        help="random resized (inception) crop: each training image is a random "
                             "box of CROP_AREA..1 of its area, aspect 3/4..4/3, resized "
                             "(the reference's 0.05; 1 off)")
    recipe.add_argument("--flip", action=argparse.BooleanOptionalAction,
                        help="random horizontal flips (default: on; off on digits)")
    recipe.add_argument("--translate", type=float, help="random shift, fraction of the size")
    recipe.add_argument("--rotate", type=float,
                        help="random rotation, fraction of a full turn (0.05 = 18 degrees)")
    recipe.add_argument("--zoom", type=float, help="random zoom in/out, fraction of the size")
    recipe.add_argument("--randaugment", type=float,
                        help="RandAugment magnitude 0..1, the paper's M / 10 (0 off)")
    recipe.add_argument("--mixup", type=float, help="MixUp alpha (0 off)")
    recipe.add_argument("--cutmix", type=float, help="CutMix factor (0 off)")
    recipe.add_argument("--seed", type=int, default=0,
                        help="draws the split, initial weights, order, crops, augmentations "
                             "and dropout masks: the same seed, the same weights (default 0)")
    system = parser.add_argument_group("system")
    system.add_argument("--strategy", default="auto",
                        choices=["auto", "one-device", "mirrored", "multi-worker", "tpu"],
                        help="tf.distribute strategy; auto: TPU when one is evidently there, "
                             "Mirrored over 2+ GPUs, else one device (multi-worker: ask for "
                             "it, with TF_CONFIG set on every machine)")
    system.add_argument("--tpu-address", help="TPU name or grpc:// address for --strategy tpu")
    system.add_argument("--cpu-devices", type=positive_int,
                        help="split the CPU into N logical devices (Mirrored on one machine)")
    system.add_argument("--precision", default="auto",
                        choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"],
                        help="auto: mixed_bfloat16 on TPUs and GPUs that have it, else float32")
    system.add_argument("--jit-compile", default="auto", choices=["auto", "on", "off"],
                        help="XLA; auto: on, except bfloat16 on a CPU-only machine (XLA's CPU "
                             "backend has no fast bfloat16 matmuls; oneDNN's graph kernels do)")
    system.add_argument("--micro-batches", default="auto", type=_micro_batches_arg,
                        help="compute each replica's batch in N parts and sum their gradients "
                             "(the same update; activations N times smaller, for a batch that "
                             "does not fit in memory); auto: on CPUs, parts of at least 1536 "
                             "tokens (faster: they stay in the caches), whole batches on GPUs "
                             "and TPUs")
    system.add_argument("--checkpoint-every", type=positive_int, default=50,
                        help="back up at each epoch end and N steps after the last backup")
    output = parser.add_argument_group("output")
    output.add_argument("--out", help="run folder (default: runs/<data name>)")
    output.add_argument("--export-dir", help="where to export (default: exported/<run name>)")
    output.add_argument("--no-export", action="store_true", help="skip SavedModel/TFLite export")
    output.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2],
                        help="Keras progress: 0 silent, 1 bars, 2 one line per epoch")


def _micro_batches_arg(text):
    return text if text == "auto" else positive_int(text)


def parse_image_size(text):
    """"224" -> [224, 224]; "224x320" -> [224, 320] (height x width)."""
    height, sep, width = str(text).lower().partition("x")
    try:
        size = [int(height), int(width if sep else height)]
    except ValueError:
        size = None
    if size is None or min(size) < 1:
        raise ValueError(f"--image-size {text!r} is not a size: give one number (224) or "
                         "HEIGHTxWIDTH (224x320).")
    return size


def resolve_config(args):
    """The run's full configuration: explicit flags over preset over per-data defaults."""
    config = dict(DATA_DEFAULTS["digits" if args.data == "digits" else "other"])
    if args.variant not in (None, config["variant"]):  # the default patch size and depth
        config.update(patch_size=None, depth=None)
    config.update(optimizer="adamw")
    config.update(PRESETS[args.preset])
    for key, value in vars(args).items():
        if value is not None or key not in config:
            config[key] = value
    config["image_size"] = parse_image_size(config["image_size"])
    if not 0 < config["crop_area"] <= 1:
        raise ValueError(f"--crop-area {config['crop_area']} is not an area fraction: give "
                         "0 < it <= 1 (the reference crops to 0.05..1 of the image; 1: no crop).")
    check_split_fractions(config["validation_split"], config["test_split"])
    return config


def check_split_fractions(validation_split, test_split):
    """Raises ValueError unless the fractions leave images in every split that needs them."""
    if not 0 <= validation_split < 1:
        raise ValueError(f"--validation-split {validation_split} is not a fraction: give "
                         "0 <= it < 1 (0: no validation, every labelled image trains).")
    if test_split is not None and not 0 < test_split < 1:
        raise ValueError(f"--test-split {test_split} is not a fraction: give 0 < it < 1 "
                         "(the test accuracy needs test images).")
    if validation_split + (test_split or 0) >= 1:
        raise ValueError(f"--validation-split {validation_split} and --test-split {test_split} "
                         "leave no training images: their sum must be below 1.")


def data_name(spec):
    return Path(spec.partition(":")[2] or spec).name.replace("/", "_") or "run"


def choose_run_dir(config):
    """The run folder. An unfinished run there is resumed from its backup (same
    configuration required; one that stopped before its first backup is started afresh);
    a finished one is kept and this run goes to a new numbered folder instead."""
    from keras_vit.run_dir import CONFIG_FILE

    base = Path(config["out"] or Path("runs") / data_name(config["data"]))
    candidate, n = base, 1
    while True:
        config_path = candidate / CONFIG_FILE
        if not config_path.exists():
            if candidate != base:
                print(f"{base} holds a finished run (kept as it is): this run goes to "
                      f"{candidate}.", flush=True)
            return candidate, False
        previous = json.loads(config_path.read_text())
        if not previous.get("finished"):
            if not (candidate / "backup").exists():  # it never trained a step: nothing to keep
                # and nothing to mix into the new run's curves
                (candidate / "history.csv").unlink(missing_ok=True)
                shutil.rmtree(candidate / "logs", ignore_errors=True)
                return candidate, False
            mismatched = {k: (previous.get(k), config.get(k)) for k in RESUME_KEYS
                          if previous.get(k) != config.get(k)}
            if mismatched:
                detail = ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in mismatched.items())
                raise SystemExit(
                    f"{candidate} holds an unfinished run with a different configuration "
                    f"({detail}). Start it again with the same flags to resume, or pass "
                    "--out NEW_FOLDER for a new run.")
            # Other settings may change on resume (a lower --learning-rate after a NaN stop),
            # but not silently: config.json keeps what each resume changed.
            changed = {k: [previous[k], config.get(k)] for k in RESUMABLE_CHANGES
                       if k in previous and previous[k] != config.get(k)}
            history = previous.get("changed_on_resume", []) + ([changed] if changed else [])
            if history:
                config["changed_on_resume"] = history
            if changed:
                detail = ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in changed.items())
                print(f"Warning: resuming {candidate} with other settings than it was started "
                      f"with ({detail}); the rest of the run uses the new ones (config.json "
                      "lists them under changed_on_resume).", file=sys.stderr, flush=True)
            return candidate, True
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")


# A resumed run must agree on everything that shapes the weights or the data stream.
RESUME_KEYS = ["data", "validation_split", "test_split", "variant", "image_size", "patch_size",
               "depth", "pooling", "gelu", "batch_size", "epochs", "optimizer", "seed",
               "weights"]
# Settings a resumed run may change, with a warning (the rest are bookkeeping or output).
RESUMABLE_CHANGES = ["preset", "learning_rate", "weight_decay", "warmup_epochs", "schedule",
                     "clip_norm", "momentum", "label_smoothing", "dropout",
                     "attention_dropout", "drop_path", "crop_area", "flip", "translate",
                     "rotate", "zoom", "randaugment", "mixup", "cutmix"]


@contextlib.contextmanager
def stop_on(*errors):
    """Ends the command with `keras-vit train: MESSAGE` (no traceback) on errors the user
    fixes with other flags or data."""
    try:
        yield
    except errors as err:
        raise SystemExit(f"keras-vit train: {err}") from None


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


def build_optimizer(config, steps_per_epoch):
    from keras_vit import optimizers
    from keras_vit.schedules import WarmupDecay

    total = config["epochs"] * steps_per_epoch
    warmup = min(int(config["warmup_epochs"] * steps_per_epoch), total - 1)
    schedule = WarmupDecay(config["learning_rate"], total, warmup, decay=config["schedule"])
    if config["optimizer"] == "sgd":
        optimizer = optimizers.SGD(schedule, momentum=config["momentum"],
                                   weight_decay=config["weight_decay"] or None,
                                   global_clipnorm=config["clip_norm"] or None)
    else:
        optimizer = optimizers.AdamW(schedule, beta_1=0.9, beta_2=0.999,
                                     weight_decay=config["weight_decay"],
                                     global_clipnorm=config["clip_norm"] or None)
    if config["weight_decay"]:
        optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer


def pick_precision(config, strategy):
    import tensorflow as tf

    if config["precision"] != "auto":
        return config["precision"]
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
    XLA, bfloat16 XLA 0.84x)."""
    import tensorflow as tf

    several = strategy.num_replicas_in_sync > 1
    if config["jit_compile"] == "on" and several and not tf.config.list_physical_devices("GPU"):
        raise SystemExit(f"keras-vit train: --jit-compile on does not run with "
                         f"{strategy.num_replicas_in_sync} replicas on CPUs (Keras compiles each "
                         "replica's step for one device); leave --jit-compile at auto.")
    if config["jit_compile"] != "auto":
        return config["jit_compile"] == "on"
    if several or isinstance(strategy, tf.distribute.TPUStrategy):
        return False
    return bool(tf.config.list_physical_devices("GPU")) or "bfloat16" not in precision


def pick_micro_batches(config, per_replica_batch, tokens, strategy):
    """--micro-batches: the count given, or for auto `auto_micro_batches` on what the replicas
    run on."""
    import tensorflow as tf

    from keras_vit.micro_batches import auto_micro_batches

    if config["micro_batches"] != "auto":
        return config["micro_batches"]
    device_type = ("TPU" if isinstance(strategy, tf.distribute.TPUStrategy)
                   else "GPU" if tf.config.list_physical_devices("GPU") else "CPU")
    return auto_micro_batches(per_replica_batch, tokens, device_type)


def restore_on_every_worker(backup, model, strategy):
    """`backup.restore(model)`, then a check that every worker of a multi-worker run restored
    a backup of the same step (each keeps its own); returns the batches trained."""
    from keras_vit import distribute

    try:
        step, problem = backup.restore(model), None
    except (ValueError, OSError) as err:  # every worker still takes part in the gather below
        step, problem = -1, err
    steps = distribute.values_across_workers(step, strategy)
    if problem is not None:
        raise SystemExit(f"keras-vit train: {problem}")
    if min(steps) < 0:
        raise SystemExit("keras-vit train: another worker could not restore its backup; its "
                         "output says why.")
    if len(set(steps)) > 1:
        # Training on would hang in the collectives or train replicas apart.
        raise SystemExit(
            f"keras-vit train: the workers restored different backups (batches trained, one "
            f"per replica: {steps}; this is {distribute.describe(strategy)}, at {step}); the "
            "job was stopped while some were writing one. Each worker's backup folder "
            "(backup/ in the run folder on the chief, .worker_temp/*/backup/ on the others) "
            "keeps the one before as latest.weights.h5.bkp and training_metadata.json.bkp: on "
            "the workers ahead, move those over latest.weights.h5 and training_metadata.json, "
            "then start the same command again.")
    return step


def save_curves(history_csv, path):
    """A PNG of the loss and accuracy curves from history.csv."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            points = [(e, float(r[prefix + metric])) for e, r in zip(epochs, rows)
                      if r.get(prefix + metric) not in (None, "", "NA")]
            if points:
                ax.plot(*zip(*points), style, label=(prefix or "train_") + metric)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def train(config):
    """Runs training as configured; returns (exit code, summary dict)."""
    from keras_vit import distribute

    with stop_on(ValueError, RuntimeError):
        strategy = distribute.make_strategy(config["strategy"],
                                            tpu_address=config.get("tpu_address"),
                                            cpu_devices=config.get("cpu_devices"))
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_vit
    from keras_vit import augment, data as data_lib, run_dir as run_lib
    from keras_vit.callbacks import RunBackup, StopOnNaN
    from keras_vit.layers import patch_grid
    from keras_vit.micro_batches import part_sizes, use_micro_batches
    from keras_vit.variants import parse_variant

    # Model settings are checked before the data loads or the run folder is written.
    with stop_on(ValueError):
        variant = parse_variant(config["variant"], config["patch_size"])
        height, width = config["image_size"]
        try:
            rows, cols = patch_grid(height, width, variant.stride)
        except ValueError as err:
            raise ValueError(f"{err} Here: --image-size HEIGHTxWIDTH (now {height}x{width}), "
                             "or another --patch-size or --variant.") from None
    stride = variant.stride
    weights = config.get("weights")
    if weights:  # a missing file, an unknown name or a failed download: before anything else
        from keras_vit.checkpoints import open_weights

        with stop_on(ValueError, OSError):
            weights = open_weights(weights, variant=variant) or weights  # None: .weights.h5
    tokens = rows * cols
    if tokens < 4:  # e.g. --variant Ti/16 on the 16x16 digits
        print(f"Warning: {height}x{width} images in {stride}x{stride} px patches "
              f"make {tokens} token(s): attention has next to nothing to relate. Use a smaller "
              "--patch-size or a larger --image-size.", file=sys.stderr, flush=True)
    chief = distribute.is_chief(strategy)
    run_dir, resuming = choose_run_dir(config)
    work_dir = Path(distribute.worker_dir(run_dir, strategy))
    replicas = strategy.num_replicas_in_sync
    if config["batch_size"] % replicas:
        raise SystemExit(f"--batch-size {config['batch_size']} is not divisible by the "
                         f"{replicas} replicas; use a multiple of {replicas}.")
    precision = pick_precision(config, strategy)
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(config["seed"])
    start = time.time()

    with stop_on(data_lib.DataError):
        data = data_lib.load_data(config["data"], config["image_size"],
                                  data_dir=config["data_dir"],
                                  validation_split=config["validation_split"],
                                  test_split=config["test_split"], seed=config["seed"])
    for split, fix in (("train", "lower --validation-split/--test-split"),
                       ("test", "raise --test-split or put images in test/")):
        if not data.sizes[split]:
            raise SystemExit(f"keras-vit train: the {split} split of {config['data']} is empty "
                             f"({data.sizes}); {fix}.")
    if data.skipped:
        print(f"Skipped {len(data.skipped)} unreadable file(s) (not decodable as "
              "JPEG/PNG/BMP/GIF):", *data.skipped[:20], sep="\n  ")
        if len(data.skipped) > 20:
            print(f"  ... and {len(data.skipped) - 20} more")
    num_classes = len(data.class_names)
    spe = data_lib.steps_per_epoch(data.sizes["train"], config["batch_size"])
    cache = data_lib.estimated_cache_bytes(data, config["image_size"]) < 4 * 2**30
    jit = pick_jit_compile(config, precision, strategy)
    per_replica_batch = config["batch_size"] // replicas
    micro_batches = pick_micro_batches(config, per_replica_batch, tokens + 1, strategy)

    config.update(num_classes=num_classes, class_names=data.class_names, precision=precision,
                  steps_per_epoch=spe, replicas=replicas, micro_batches=micro_batches,
                  finished=False)
    if chief:
        run_lib.write_config(run_dir, config)
    print(f"{'Resuming' if resuming else 'Starting'} run {run_dir}: {config['variant']} "
          f"({height}x{width} images, {tokens} tokens of {stride}x{stride} px) on "
          f"{config['data']} ({data.sizes['train']} train / {data.sizes['validation']} "
          f"validation / {data.sizes['test']} test, {num_classes} classes), "
          f"{distribute.describe(strategy)}, {precision}, "
          f"XLA {'on' if jit else 'off'}"
          + (", {} micro-batches of {} per replica".format(
              *part_sizes(per_replica_batch, micro_batches)) if micro_batches > 1 else ""),
          flush=True)

    with strategy.scope():
        with stop_on(ValueError):  # a checkpoint that does not fit the model says which keys
            model = keras_vit.build(
                config["variant"], image_size=config["image_size"], num_classes=num_classes,
                patch_size=config["patch_size"], depth=config["depth"],
                pooling=config["pooling"], gelu=config["gelu"], dropout_rate=config["dropout"],
                attention_dropout_rate=config["attention_dropout"],
                drop_path_rate=config["drop_path"], weights=weights)
        weights = None  # the model holds the checkpoint's values now: free its arrays
        model.compile(
            optimizer=build_optimizer(config, spe),
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=config["label_smoothing"]),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=jit)
        model.optimizer.build(model.trainable_variables)
    use_micro_batches(model, micro_batches)

    backup = RunBackup(work_dir / "backup", save_freq=config["checkpoint_every"])
    step = restore_on_every_worker(backup, model, strategy)
    total_steps = config["epochs"] * spe
    if step:
        print(f"Restored the backup at step {step} of {total_steps} "
              f"(epoch {step // spe + 1}, batch {step % spe}).", flush=True)

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = \
        tf.data.experimental.AutoShardPolicy.DATA
    augment_config = augment.AugmentConfig(
        flip=config["flip"], translate=config["translate"], rotate=config["rotate"],
        zoom=config["zoom"], randaugment=config["randaugment"],
        mixup=config["mixup"], cutmix=config["cutmix"])

    def train_batches(skip):
        return (data_lib.training_batches(
                    data, config["batch_size"], seed=config["seed"], cache=cache,
                    crop_area=config["crop_area"], skip_batches=skip,
                    augment=augment.make_augmenter(augment_config, num_classes))
                .prefetch(tf.data.AUTOTUNE).with_options(options))
    prepare = augment.prepare_evaluation(num_classes)
    val_ds = None  # --validation-split 0: every labelled example trains
    if data.sizes["validation"]:
        val_ds = (data_lib.evaluation_batches(data.validation, config["batch_size"], cache)
                  .map(prepare).prefetch(tf.data.AUTOTUNE).with_options(options))
    test_ds = (data_lib.evaluation_batches(data.test, config["batch_size"], cache)
               .map(prepare).prefetch(tf.data.AUTOTUNE).with_options(options))

    nan_guard = StopOnNaN()
    callbacks = [nan_guard, backup,
                 keras.callbacks.CSVLogger(str(work_dir / "history.csv"), append=True),
                 keras.callbacks.TensorBoard(str(work_dir / "logs"), update_freq="epoch")]
    for first_epoch, end_epoch, steps, skip in fit_segments(step, spe, config["epochs"]):
        if nan_guard.stopped_at is None:
            model.fit(train_batches(skip), initial_epoch=first_epoch, epochs=end_epoch,
                      steps_per_epoch=steps, validation_data=val_ds, callbacks=callbacks,
                      verbose=config["verbose"], shuffle=False)
    if nan_guard.stopped_at is not None:
        stopped_epoch, stopped_batch = nan_guard.stopped_at
        print(f"\nTraining stopped: the loss became NaN at epoch {stopped_epoch}, step "
              f"{stopped_batch}. The last good backup is kept in {work_dir / 'backup'}; lower "
              "--learning-rate and start the same command again to resume from it (or start "
              "a new run with --out NEW_FOLDER --precision float32).", file=sys.stderr)
        return 3, {}

    loss, accuracy = model.evaluate(test_ds, verbose=0)
    summary = {"test_accuracy": float(accuracy), "test_loss": float(loss),
               "steps": int(model.optimizer.iterations.numpy()),
               "weights_fingerprint": weights_fingerprint(model),
               "train_seconds": round(time.time() - start, 1)}
    # Every worker saves (saving may need all of them); only the chief's copy is the run's.
    config.update(finished=True, result=summary)
    run_lib.save_run(work_dir, model, config, _samples(data, num_classes))
    shutil.rmtree(work_dir / "backup", ignore_errors=True)
    distribute.remove_worker_dir(run_dir, strategy)
    if chief:
        save_curves(work_dir / "history.csv", run_dir / "curves.png")
        if not config["no_export"]:
            from keras_vit.export import ExportVerificationError, export_run

            export_dir = config["export_dir"] or Path("exported") / run_dir.name
            try:
                export_run(run_dir, export_dir)  # prints its verification table
            except ExportVerificationError as err:
                print(f"\n{err}\nThe trained model is safe in {run_dir}; export it again with "
                      f"`keras-vit export {run_dir} --out {export_dir}`.", file=sys.stderr)
                return 4, summary
            summary["exported"] = str(export_dir)
    print(f"\nrun: {run_dir}")
    print(f"time: {time.time() - start:.0f} s")
    # The same on every worker of a multi-worker run (they train one model in lockstep).
    print(f"weights fingerprint: {summary['weights_fingerprint']}")
    print(f"test loss: {loss:.4f}")
    print(f"test accuracy: {accuracy:.4f}")
    return 0, summary


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


def _samples(data, num_classes, calibration=256, test_cap=2000):
    """uint8 images for export: training images to calibrate int8, held-out ones to verify."""
    import numpy as np

    calibration_images = np.stack([x for x, _ in data.train.take(calibration).as_numpy_iterator()])
    test = list(data.test.take(test_cap).as_numpy_iterator())
    return {"calibration_images": calibration_images,
            "test_images": np.stack([x for x, _ in test]),
            "test_labels": np.asarray([y for _, y in test], dtype=np.int32)}


def run(args):
    with stop_on(ValueError):
        config = resolve_config(args)
    code, _ = train(config)
    return code
