"""The paper's training recipe as functions: optimizers, schedule, loss and augmentation.

`keras-vit train` builds its optimizer, loss and augmentation here, so a notebook gets the
same recipe:

    model = keras_vit.build("S/16", image_size=384, num_classes=5, weights="augreg_in21k")
    model.compile(optimizer=keras_vit.recipes.finetune_optimizer(model, total_steps=1000),
                  loss=keras_vit.recipes.loss(sparse=True), metrics=["accuracy"])

- Pre-training (`pretrain_optimizer`): AdamW, beta1 0.9, beta2 0.999, weight decay (0.1 in the
  paper) on the weight matrices only (not on biases, norms, the class and distillation tokens
  or position embeddings), linear warm-up then cosine (or linear) decay to 0, global-norm
  clipping at 1.0 of the summed gradient of the whole global batch.
- Fine-tuning (`finetune_optimizer`): SGD with momentum 0.9, no weight decay, the same
  warm-up, decay and clipping.
"""

import keras

from keras_vit import optimizers
from keras_vit.schedules import WarmupDecay

# Never decayed: biases, LayerNorm/GroupNorm scales and offsets, class and distillation
# tokens, position embeddings (matched in variable names, so a reloaded model matches too).
NO_DECAY = ["bias", "gamma", "beta", "cls", "dist", "pos_embedding"]
# Share of the steps spent warming up when not given.
WARMUP_SHARE = 0.05


def schedule(learning_rate, total_steps, warmup_steps=None, decay="cosine"):
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps` (default 5% of the
    steps), then `decay` ("cosine" or "linear") to 0 at `total_steps`."""
    total_steps = _steps("total_steps", total_steps, minimum=2)
    if warmup_steps is None:
        warmup_steps = round(WARMUP_SHARE * total_steps)
    warmup_steps = min(_steps("warmup_steps", warmup_steps, minimum=0), total_steps - 1)
    return WarmupDecay(_rate(learning_rate), total_steps, warmup_steps, decay=decay)


def pretrain_optimizer(model=None, *, total_steps, learning_rate=1e-3, warmup_steps=None,
                       weight_decay=0.1, decay="cosine", clip_norm=1.0):
    """The paper's pre-training optimizer: AdamW (beta1 0.9, beta2 0.999) with decoupled
    weight decay on the weight matrices only, `schedule(...)` and global-norm clipping.

    Args:
        model: optional; its 1-D weights (biases, norms) join the names in `NO_DECAY` in
            being excluded from weight decay (for models whose names differ from keras-vit's).
        total_steps: optimizer steps of the whole run (epochs x steps per epoch).
        learning_rate: the peak, after warm-up.
        warmup_steps: default 5% of `total_steps`.
        weight_decay: 0.1 in the paper (keras-vit train: 0.05 on the small digits set).
        decay: "cosine" or "linear".
        clip_norm: global-norm clip of the whole global batch's gradient; 0 or None: off.
    """
    if weight_decay is None or weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    optimizer = optimizers.AdamW(schedule(learning_rate, total_steps, warmup_steps, decay),
                                 beta_1=0.9, beta_2=0.999, weight_decay=float(weight_decay),
                                 global_clipnorm=clip_norm or None)
    _exclude_from_decay(optimizer, model)
    return optimizer


def finetune_optimizer(model=None, *, total_steps, learning_rate=0.01, warmup_steps=None,
                       momentum=0.9, weight_decay=0.0, decay="cosine", clip_norm=1.0):
    """The paper's fine-tuning optimizer: SGD with momentum 0.9 and no weight decay,
    `schedule(...)` and global-norm clipping at 1.0. The paper picks the learning rate from
    {0.001, 0.003, 0.01, 0.03}.

    Args: as `pretrain_optimizer`, plus `momentum`.
    """
    optimizer = optimizers.SGD(schedule(learning_rate, total_steps, warmup_steps, decay),
                               momentum=float(momentum), weight_decay=weight_decay or None,
                               global_clipnorm=clip_norm or None)
    if weight_decay:
        _exclude_from_decay(optimizer, model)
    return optimizer


def loss(label_smoothing=0.1, *, sparse=False):
    """Cross-entropy on logits with label smoothing (0.1 in keras-vit's recipe). `sparse`:
    integer labels (Keras' sparse loss has no smoothing, so the labels are one-hot encoded
    inside the loss instead)."""
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
    if not sparse:
        return keras.losses.CategoricalCrossentropy(from_logits=True,
                                                    label_smoothing=label_smoothing)
    return SparseSmoothedCrossentropy(label_smoothing)


def augmentation(preset="pretrain", data="other", **changes):
    """The augmentation `keras-vit train` uses for `preset` on `data` ("digits" or "other"),
    as an `AugmentConfig` (flip, translate, rotate, zoom, randaugment, mixup, cutmix), with
    `changes` applied; `keras_vit.training.augment.make_augmenter(config, num_classes)` turns
    it into a `tf.data` function."""
    from keras_vit.training.augment import AugmentConfig
    from keras_vit.training.config import DATA_DEFAULTS, PRESETS

    values = dict(DATA_DEFAULTS["digits" if data == "digits" else "other"])
    values.update(PRESETS[preset])
    fields = ("flip", "translate", "rotate", "zoom", "randaugment", "mixup", "cutmix")
    config = {k: values[k] for k in fields}
    config.update(changes)
    return AugmentConfig(**config)


def _exclude_from_decay(optimizer, model):
    # One call: each call of exclude_from_weight_decay replaces what the last one set.
    one_dimensional = None if model is None else [
        v for v in model.trainable_variables if len(v.shape) <= 1]
    optimizer.exclude_from_weight_decay(var_list=one_dimensional or None, var_names=NO_DECAY)


def _steps(what, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be a whole number >= {minimum}, got {value!r}.")
    return value


def _rate(value):
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {value!r}.")
    return float(value)


@keras.saving.register_keras_serializable(package="keras_vit")
class SparseSmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy of logits against integer labels, with label smoothing."""

    def __init__(self, label_smoothing=0.1, name="sparse_smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        classes = keras.ops.shape(y_pred)[-1]
        labels = keras.ops.one_hot(
            keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), classes)
        return keras.losses.categorical_crossentropy(
            labels, y_pred, from_logits=True, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
