"""`keras-vit train`: the flags of `keras_vit.TrainConfig`, then `keras_vit.train`.

    keras-vit train                                    # embedded digits, CPU, ~2-4 minutes
    keras-vit train --data folder:/data/flowers --variant S/16 --image-size 224 --epochs 30
    keras-vit train --data tfds:cifar10 --data-dir ~/tensorflow_datasets --strategy mirrored

Exit status: 0 trained (and exported); 2 settings, data or a resume that cannot run (nothing
trained); 3 the loss became NaN (the last good backup is kept); 4 trained, but the export
failed its checks (the model is safe in the run folder).
"""

import argparse
import dataclasses

from keras_vit.cli._common import describe_failure, error, finite_float, positive_int
from keras_vit.training.config import (DATA_DEFAULTS, DISTILLATIONS, PRECISIONS, PRESETS,
                                       STRATEGIES, TrainConfig)

GROUPS = {
    "data": ("data", "data_dir", "validation_split", "test_split", "train_fraction"),
    "model": ("variant", "image_size", "patch_size", "depth", "pooling", "gelu", "normalization",
              "weights", "dropout", "attention_dropout", "drop_path"),
    "recipe": ("preset", "optimizer", "epochs", "batch_size", "learning_rate", "weight_decay",
               "momentum", "warmup_epochs", "schedule", "clip_norm", "label_smoothing",
               "crop_area", "flip", "translate", "rotate", "zoom", "randaugment", "mixup",
               "cutmix", "seed"),
    "distillation (DeiT)": ("teacher", "distillation", "distillation_alpha",
                            "distillation_temperature"),
    "system": ("strategy", "distribution", "tpu_address", "cpu_devices", "precision",
               "jit_compile", "micro_batches", "checkpoint_every"),
    "output": ("out", "export", "export_dir", "verbose"),
}
CHOICES = {"pooling": ("token", "gap"), "gelu": ("tanh", "erf"),
           "normalization": ("vit", "imagenet", "none"), "preset": sorted(PRESETS),
           "optimizer": ("adamw", "sgd"), "schedule": ("cosine", "linear"),
           "strategy": STRATEGIES, "precision": PRECISIONS, "jit_compile": ("auto", "on", "off"),
           "distillation": DISTILLATIONS,
           "distribution": ("none", "data-parallel", "model-parallel")}
COUNTS = ("epochs", "batch_size", "patch_size", "depth", "cpu_devices", "checkpoint_every")


def _micro_batches(text):
    return text if text == "auto" else positive_int(text)


def _per_data_default(name):
    digits, other = DATA_DEFAULTS["digits"].get(name), DATA_DEFAULTS["other"].get(name)
    if name in DATA_DEFAULTS["digits"]:
        shown = [f"{digits} on digits", f"{other} on other data" if other is not None else
                 "the variant's otherwise"]
        if name in PRESETS["finetune"]:
            shown.append(f"{PRESETS['finetune'][name]} with --preset finetune")
        return "; ".join(shown)
    return None


def add_arguments(parser):
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for title, names in GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            field = fields[name]
            help_ = field.metadata["help"]
            per_data = _per_data_default(name)
            if field.default not in (None, dataclasses.MISSING) and name != "export":
                help_ += f" (default: {field.default})"
            elif per_data and "default" not in help_:
                help_ += f" (default: {per_data})"
            flag = "--" + name.replace("_", "-")
            if name == "export":
                group.add_argument("--no-export", dest="export", action="store_false",
                                   help="skip the SavedModel/TFLite export")
            elif name == "flip":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
            elif name == "verbose":
                group.add_argument(flag, type=int, nargs="?", const=1, default=1,
                                   choices=[0, 1, 2],
                                   help="Keras progress: 0 silent, 1 bars (default), 2 one "
                                        "line per epoch; a bare --verbose also shows "
                                        "TensorFlow's start-up messages")
            elif name == "micro_batches":
                group.add_argument(flag, type=_micro_batches, default="auto", help=help_)
            elif name in CHOICES:
                group.add_argument(flag, choices=CHOICES[name], default=field.default,
                                   help=help_)
            elif name in COUNTS:
                group.add_argument(flag, type=positive_int, default=field.default, help=help_)
            elif name == "seed":
                group.add_argument(flag, type=int, default=field.default, help=help_)
            elif field.type is float:
                group.add_argument(flag, type=finite_float, default=field.default, help=help_)
            else:  # strings: data, paths, variant, image size
                group.add_argument(flag, default=field.default, help=help_)


def run(args):
    from keras_vit import errors
    from keras_vit.training.trainer import train

    values = {k: v for k, v in vars(args).items()
              if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    try:
        result = train(TrainConfig(**values))
    except errors.TrainingDiverged as err:
        error("train", err)
        return 3
    except errors.ExportVerificationError as err:
        error("train", err)
        return 4
    except (errors.KerasViTError, ValueError, OSError, ImportError) as err:
        error("train", err)
        return 2
    except Exception as err:  # noqa: BLE001 - TensorFlow's own errors: one line, not a trace
        import tensorflow as tf

        if not isinstance(err, tf.errors.OpError):
            raise
        error("train", describe_failure(err))
        return 2
    print(f"\nrun: {result.run_dir}")
    print(f"time: {result.train_seconds:.0f} s")
    # The same on every worker of a multi-worker run (they train one model in lockstep).
    print(f"weights fingerprint: {result.weights_fingerprint}")
    if "teacher_test_accuracy" in result.config:
        print(f"teacher test accuracy: {result.config['teacher_test_accuracy']:.4f}")
    print(f"test loss: {result.test_loss:.4f}")
    print(f"test accuracy: {result.test_accuracy:.4f}")
    return 0
