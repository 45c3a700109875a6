"""The training configuration: one typed, documented field per setting.

Every field says how resuming an unfinished run treats it (`field_policy`):

- `MUST_MATCH`: it shapes the weights or the data stream (variant, sizes, batch, epochs, seed,
  data, split): a resume with another value is refused;
- `MAY_CHANGE`: a training setting (learning rate, regularisation, augmentation): a resume may
  change it, with a warning, and config.json records the change under `changed_on_resume`;
- `FREE`: how the run is carried out or reported (strategy, precision, output folders): never
  compared.

Fields left as None take the defaults of the data (`DATA_DEFAULTS`) and of the preset
(`PRESETS`); `TrainConfig.resolved` fills them. This module imports nothing heavy, so the
command line can show its defaults at once.
"""

import dataclasses
import math
import numbers

MUST_MATCH = "must match"
MAY_CHANGE = "may change"
FREE = "free"
POLICIES = (MUST_MATCH, MAY_CHANGE, FREE)

# Defaults that depend on the data: the embedded digits are 8x8 and few (1,259 to train on),
# so they get the paper's hybrid at a small scale: the ResNet root (7x7/2 convolution and
# 3x3/2 max-pool) turns 16x16 images into a 4x4 map whose positions are the tokens (1x1
# cells), feeding a Ti-width encoder of 6 blocks. The convolution's locality is what a plain
# ViT lacks on so little data (4x4 patches: 97.3% mean test accuracy; this: 98.7-99.0%).
# Everything else gets the paper's 224x224 set-up, unless the data says otherwise
# (`keras_vit.training.defaults.fit_to_data`).
DATA_DEFAULTS = {
    "digits": dict(variant="R+Ti/16", image_size=(16, 16), patch_size=1, depth=6, epochs=50,
                   batch_size=64, learning_rate=1e-3, warmup_epochs=3, crop_area=1.0,
                   flip=False, translate=0.1, rotate=0.0, zoom=0.0, randaugment=0.0, mixup=0.0,
                   cutmix=0.0, label_smoothing=0.1, drop_path=0.1, weight_decay=0.05),
    "other": dict(variant="S/16", image_size=(224, 224), patch_size=None, depth=None,
                  epochs=30, batch_size=128, learning_rate=1e-3, warmup_epochs=5,
                  crop_area=0.05, flip=True, translate=0.0, rotate=0.0, zoom=0.0,
                  randaugment=0.5, mixup=0.2, cutmix=1.0, label_smoothing=0.1, drop_path=0.1,
                  weight_decay=0.1),
}
PRESETS = {  # the paper: Adam(W) for pre-training, SGD with momentum for fine-tuning
    "pretrain": dict(optimizer="adamw"),
    "finetune": dict(optimizer="sgd", learning_rate=0.01, weight_decay=0.0, warmup_epochs=1,
                     mixup=0.0, cutmix=0.0, randaugment=0.0),
}
STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker", "tpu")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
DISTILLATIONS = ("none", "hard", "soft")


def setting(default, resume, help):
    """A field of `TrainConfig`: its default, how a resume treats it and what it does."""
    if resume not in POLICIES:
        raise ValueError(f"resume policy must be one of {POLICIES}, got {resume!r}")
    metadata = {"resume": resume, "help": help}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """What `keras_vit.train` does; every field is also a `keras-vit train` flag (`--name-like-this`).

    None means the default for the data (`DATA_DEFAULTS`) and preset (`PRESETS`).
    """

    # --- data
    data: str = setting("digits", MUST_MATCH,
                        "digits (embedded) | folder:PATH | tfds:NAME")
    data_dir: str = setting(None, FREE, "TFDS data_dir holding the prepared dataset")
    validation_split: float = setting(
        0.1, MUST_MATCH, "share of the training images held out for validation (0: none)")
    test_split: float = setting(
        None, MUST_MATCH, "held-out test fraction when the data has no test split "
        "(default 0.2 on digits, 0.1 otherwise)")
    train_fraction: float = setting(
        1.0, MUST_MATCH, "train on this share of the training split (stratified; for "
        "data-efficiency studies)")
    # --- model
    variant: str = setting(None, MUST_MATCH, "Ti/16, S/16, B/16, DeiT-S/16, ... (default: "
                           "per data: R+Ti/16 on digits, chosen from the images otherwise)")
    image_size: tuple = setting(None, MUST_MATCH, "224 or (height, width) (default: per data)")
    patch_size: int = setting(None, MUST_MATCH, "patch side in pixels; for hybrids the cell "
                              "side on the ResNet stem's output")
    depth: int = setting(None, MUST_MATCH, "override the number of encoder blocks")
    pooling: str = setting(None, MUST_MATCH, "token (default) or gap; with weights, what the "
                           "checkpoint has")
    gelu: str = setting(None, MUST_MATCH, "tanh (default) or erf; with weights, what the "
                        "checkpoint has")
    weights: str = setting(None, MUST_MATCH, "initial weights: a checkpoint file or name")
    normalization: str = setting(None, MUST_MATCH, "input scaling: vit ([-1, 1]) | imagenet "
                                 "(mean/std) | none (default: the variant's or checkpoint's; "
                                 "vit, DeiT imagenet)")
    dropout: float = setting(0.0, MAY_CHANGE, "dropout after attention and in the MLP")
    attention_dropout: float = setting(0.0, MAY_CHANGE, "dropout on the attention weights")
    drop_path: float = setting(None, MAY_CHANGE,
                               "stochastic depth rate at the last block (default 0.1)")
    # --- recipe
    preset: str = setting("pretrain", MAY_CHANGE,
                          "pretrain: AdamW; finetune: SGD with momentum (the paper's)")
    optimizer: str = setting(None, MUST_MATCH, "adamw | sgd (default: the preset's)")
    epochs: int = setting(None, MUST_MATCH, "epochs (default: 50 on digits, 30 otherwise)")
    batch_size: int = setting(None, MUST_MATCH, "global batch, split across replicas")
    learning_rate: float = setting(None, MAY_CHANGE, "peak learning rate, after warm-up "
                                   "(default 1e-3; finetune 0.01)")
    weight_decay: float = setting(None, MAY_CHANGE, "decoupled weight decay, not on biases, "
                                  "norms and embeddings (default 0.05 on digits, 0.1 "
                                  "otherwise; finetune 0)")
    momentum: float = setting(0.9, MAY_CHANGE, "SGD momentum")
    warmup_epochs: float = setting(None, MAY_CHANGE, "linear warm-up (default 3 on digits, 5 "
                                   "otherwise; finetune 1)")
    schedule: str = setting("cosine", MAY_CHANGE, "decay to 0 after warm-up: cosine | linear")
    clip_norm: float = setting(1.0, MAY_CHANGE, "global-norm clipping of the whole batch's "
                               "gradient (0: none)")
    label_smoothing: float = setting(None, MAY_CHANGE, "label smoothing (default 0.1)")
    crop_area: float = setting(None, MAY_CHANGE, "random resized (inception) crop: a box of "
                               "CROP_AREA..1 of each training image's area (1: off)")
    flip: bool = setting(None, MAY_CHANGE, "random horizontal flips (default on; off on digits)")
    translate: float = setting(None, MAY_CHANGE, "random shift, fraction of the size")
    rotate: float = setting(None, MAY_CHANGE, "random rotation, fraction of a full turn")
    zoom: float = setting(None, MAY_CHANGE, "random zoom in/out, fraction of the size")
    randaugment: float = setting(None, MAY_CHANGE,
                                 "RandAugment magnitude 0..1, the paper's M / 10 (0: off)")
    mixup: float = setting(None, MAY_CHANGE, "MixUp alpha (0: off)")
    cutmix: float = setting(None, MAY_CHANGE, "CutMix factor (0: off)")
    augmentation_layers: list = setting(
        [], MAY_CHANGE, "Python only: more Keras (or keras-cv) image augmentation layers, run "
        "in tf.data on float pixels in [0, 255] after the others, never saved in the model "
        "(config.json records their class names)")
    seed: int = setting(0, MUST_MATCH, "draws the split, initial weights, order, crops, "
                        "augmentations and dropout masks: the same seed, the same weights")
    # --- distillation (DeiT)
    teacher: str = setting(None, MUST_MATCH, "teacher for distillation: a .keras file, a run "
                           "folder, or 'resnet' (a small CNN trained first on the same data)")
    distillation: str = setting("none", MUST_MATCH, "none | hard (the teacher's argmax, "
                                "DeiT's) | soft (KL at --distillation-temperature)")
    distillation_alpha: float = setting(0.5, MAY_CHANGE, "weight of the distillation loss "
                                        "(DeiT: 0.5)")
    distillation_temperature: float = setting(3.0, MAY_CHANGE, "soft distillation temperature")
    # --- system
    strategy: str = setting("auto", FREE, "tf.distribute strategy (TensorFlow backend): auto | "
                            "one-device | mirrored | multi-worker | tpu")
    distribution: str = setting("none", FREE, "keras.distribution (JAX backend): none | "
                                "data-parallel (all local devices) | model-parallel (kernels "
                                "sharded)")
    tpu_address: str = setting(None, FREE, "TPU name or grpc:// address for strategy tpu")
    cpu_devices: int = setting(None, FREE, "split the CPU into N logical devices (mirrored)")
    precision: str = setting("auto", FREE, "auto | float32 | mixed_bfloat16 | mixed_float16 "
                             "(auto: mixed_bfloat16 on TPUs and GPUs that have it)")
    jit_compile: str = setting("auto", FREE, "XLA: auto | on | off")
    micro_batches: object = setting("auto", FREE, "compute each replica's batch in N parts "
                                    "(the same update, activations N times smaller): auto | N")
    checkpoint_every: int = setting(50, FREE, "back up at each epoch end and N steps after "
                                    "the last backup")
    # --- output
    out: str = setting(None, FREE, "run folder (default: runs/<data name>)")
    export: bool = setting(True, FREE, "export (SavedModel, TFLite) after training")
    export_dir: str = setting(None, FREE, "where to export (default: exported/<run name>)")
    verbose: int = setting(1, FREE, "Keras progress: 0 silent, 1 bars, 2 one line per epoch")

    def resolved(self):
        """A copy with the data's and the preset's defaults in place of None, checked.

        Raises:
            ConfigError: a value out of range, saying which setting and what is accepted.
        """
        from keras_vit.errors import ConfigError

        defaults = dict(DATA_DEFAULTS["digits" if self.data == "digits" else "other"])
        if self.variant not in (None, defaults["variant"]):  # the variant's own patch and depth
            defaults.update(patch_size=None, depth=None)
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}.")
        defaults.update(optimizer="adamw")
        defaults.update(PRESETS[self.preset])
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in defaults.items():
            if values[key] is None:
                values[key] = value
        if values["test_split"] is None:
            values["test_split"] = 0.2 if self.data == "digits" else 0.1
        values["image_size"] = parse_image_size(values["image_size"])
        config = TrainConfig(**values)
        config.check()
        return config

    def check(self):
        """Raises ConfigError for a value no run can use (the message names the setting)."""
        from keras_vit.errors import ConfigError

        def fail(message):
            raise ConfigError(message)

        def number(name, low=None, high=None, *, low_open=False, high_open=False, integer=False):
            value = getattr(self, name)
            if value is None:
                return
            what = f" ({field_help(name)})"
            kind = numbers.Integral if integer else numbers.Real
            if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
                fail(f"{flag(name)} must be a finite {'whole ' if integer else ''}number, got "
                     f"{value!r}{what}.")
            if low is not None and (value < low or (low_open and value == low)):
                fail(f"{flag(name)} must be {'>' if low_open else '>='} {low}, got "
                     f"{value}{what}.")
            if high is not None and (value > high or (high_open and value == high)):
                fail(f"{flag(name)} must be {'<' if high_open else '<='} {high}, got "
                     f"{value}{what}.")

        for name in ("epochs", "batch_size", "checkpoint_every"):
            number(name, 1, integer=True)
        for name in ("patch_size", "depth", "cpu_devices"):
            number(name, 1, integer=True)
        number("seed", integer=True)
        number("learning_rate", 0, low_open=True)
        for name in ("weight_decay", "warmup_epochs", "clip_norm", "translate", "rotate", "zoom",
                     "mixup", "cutmix", "distillation_temperature"):
            number(name, 0)
        number("distillation_temperature", 0, low_open=True)
        for name in ("momentum", "label_smoothing", "dropout", "attention_dropout", "drop_path",
                     "distillation_alpha"):
            number(name, 0, 1, high_open=name not in ("label_smoothing", "distillation_alpha"))
        number("randaugment", 0, 1)
        number("validation_split", 0, 1, high_open=True)
        number("test_split", 0, 1, low_open=True, high_open=True)
        number("train_fraction", 0, 1, low_open=True)
        number("crop_area", 0, 1, low_open=True)
        if (self.validation_split or 0) + (self.test_split or 0) >= 1:
            fail(f"--validation-split {self.validation_split} and --test-split "
                 f"{self.test_split} leave no training images: their sum must be below 1.")
        for name, choices in (("schedule", ("cosine", "linear")),
                              ("optimizer", ("adamw", "sgd", None)),
                              ("pooling", ("token", "gap", None)), ("gelu", ("tanh", "erf", None)),
                              ("normalization", ("vit", "imagenet", "none", None)),
                              ("strategy", STRATEGIES), ("precision", PRECISIONS),
                              ("jit_compile", ("auto", "on", "off")),
                              ("distillation", DISTILLATIONS),
                              ("distribution", ("none", "data-parallel", "model-parallel"))):
            if getattr(self, name) not in choices:
                shown = [c for c in choices if c is not None]
                fail(f"{flag(name)} must be one of {', '.join(shown)}, got "
                     f"{getattr(self, name)!r}.")
        if self.micro_batches != "auto" and (isinstance(self.micro_batches, bool) or not isinstance(
                self.micro_batches, numbers.Integral) or self.micro_batches < 1):
            fail(f"--micro-batches must be auto or a whole number >= 1, got "
                 f"{self.micro_batches!r}.")
        if self.distillation != "none" and not self.teacher:
            fail(f"--distillation {self.distillation} needs a --teacher: a .keras file, a run "
                 "folder, or resnet (a small CNN trained first on the same data).")
        if self.teacher and self.distillation == "none":
            fail("--teacher is given but --distillation is none: add --distillation hard "
                 "(DeiT's) or soft.")
        if not isinstance(self.augmentation_layers, (list, tuple)):
            fail("augmentation_layers must be a list of Keras image augmentation layers.")

    def to_json(self):
        """The fields as config.json holds them (augmentation layers by class name)."""
        values = dataclasses.asdict(self)
        values["image_size"] = None if self.image_size is None else list(self.image_size)
        values["augmentation_layers"] = [type(layer).__name__
                                         for layer in self.augmentation_layers]
        return values


def field_policy(name):
    """How a resume treats the field `name`: MUST_MATCH, MAY_CHANGE or FREE."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return f.metadata["resume"]
    raise KeyError(name)


def field_help(name):
    """What the field `name` does (its help text)."""
    return next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == name)


def fields_with(policy):
    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resume"] == policy]


def flag(name):
    """The command-line flag of a field: "learning_rate" -> "--learning-rate"."""
    return "--" + name.replace("_", "-")


def parse_image_size(value):
    """224, "224", "224x320", (224, 320) -> (height, width); a ConfigError otherwise."""
    from keras_vit.errors import ConfigError

    if isinstance(value, str):
        height, sep, width = value.lower().partition("x")
        try:
            size = (int(height), int(width if sep else height))
        except ValueError:
            size = None
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        size = (int(value), int(value))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        size = (int(value[0]), int(value[1]))
    else:
        size = None
    if size is None or min(size) < 1:
        raise ConfigError(f"--image-size {value!r} is not a size: give one number (224) or "
                          "HEIGHTxWIDTH (224x320).")
    return size
