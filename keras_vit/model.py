"""The ViT of "An Image is Worth 16x16 Words" as a Keras functional model with named parts.

    model = keras_vit.build("B/16")                      # a `ViT`; weights= loads checkpoints
    model.patches, model.patch_encoder, model.blocks[-1], model.encoder_norm, model.head
"""

import dataclasses
import numbers

import keras

from keras_vit.images import as_normalization
from keras_vit.keras_internals import BuiltBeforeFirstTrace
from keras_vit.layers import (Patches, PatchEncoder, TokenPooling, TransformerBlock,
                              patch_grid)
from keras_vit.layers.gelu import GELU_FORMS
from keras_vit.layers.pooling import POOLING_MODES
from keras_vit.layers.resnet import ResNetStem
from keras_vit.variants import SIZES, Variant, image_hw, parse_variant


@keras.saving.register_keras_serializable(package="keras_vit")
class ViT(BuiltBeforeFirstTrace, keras.Model):
    """A Vision Transformer: patches -> class token + position embeddings -> encoder -> head.

    A Keras functional model (as keras-hub's backbones are) whose parts are attributes:
    `patches` (`Patches`, or the hybrids' `ResNetStem`), `patch_encoder` (projection, class
    token, position embeddings), `embedding_dropout`, `blocks` (the `TransformerBlock`s),
    `encoder_norm`, `pool`, `pre_logits` and `head` (None when absent), and for DeiT
    `head_dist`. It takes images normalised as `normalization` says (`model.preprocess`
    does it: [-1, 1] for Google's weights) and returns logits, float32 under mixed precision
    too (with `include_top=False`, the pooled features). `keras_vit.build` makes one from a
    variant name and loads checkpoints into it.

    Args:
        variant: "B/16", "S/32", "R50+B/16", ... (see `keras_vit.variants()`) or a `Variant`.
        image_size: int or (height, width); each must be divisible by the patch size.
        num_classes: classes of the head.
        patch_size: overrides the variant's patch size.
        depth: overrides the variant's number of encoder blocks.
        num_channels: image channels.
        include_top: False returns the pooled features the head would read.
        pooling: "token" (the class token, the paper) or "gap" (no class token).
        distilled: DeiT: a distillation token after the class token and a second head,
            `head_dist`, on it; the output is the mean of the two heads' logits.
        representation_size: adds the i21k checkpoints' `pre_logits` Dense + tanh layer.
        dropout_rate, attention_dropout_rate, drop_path_rate: regularisation (stochastic
            depth rises linearly from 0 at the first block to `drop_path_rate` at the last).
        gelu: "tanh" (the JAX reference; default) or "erf" (exact; PyTorch weights).
        classifier_activation: None for logits, or e.g. "softmax".
        normalization: how the inputs are scaled from [0, 255] pixels: "vit" ([-1, 1]),
            "imagenet", "none" or {"mean": ..., "std": ...}; kept with the model, used by
            `preprocess`, predict and export.
        dtype: the dtype policy of every layer (e.g. "mixed_bfloat16"); None takes Keras'
            global policy when the model is made. The head computes in float32 under a
            mixed policy.
        name: the model's name; default e.g. "vit_b16".
    """

    def __init__(self, variant="B/16", *, image_size=224, num_classes=1000, patch_size=None,
                 depth=None, num_channels=3, include_top=True, pooling="token", distilled=None,
                 representation_size=None, dropout_rate=0.0, attention_dropout_rate=0.0,
                 drop_path_rate=0.0, gelu=None, classifier_activation=None,
                 normalization=None, dtype=None, name=None, **kwargs):
        v = parse_variant(variant, patch_size)
        # DeiT variants default to their checkpoints' exact GELU and ImageNet normalisation.
        distilled = v.distilled if distilled is None else bool(distilled)
        gelu = gelu or ("erf" if v.distilled else "tanh")
        normalization = normalization or ("imagenet" if v.distilled else "vit")
        if depth is not None:
            v = dataclasses.replace(v, depth=_positive_int("depth", depth))
        height, width = image_hw(image_size)
        grid = patch_grid(height, width, v.stride)
        num_channels = _positive_int("num_channels", num_channels)
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}.")
        if gelu not in GELU_FORMS:
            raise ValueError(f"gelu must be one of {GELU_FORMS}, got {gelu!r}.")
        if distilled and pooling != "token":
            raise ValueError("A distilled (DeiT) model reads its class and distillation tokens: "
                             "use pooling='token'.")
        if include_top:
            num_classes = _positive_int(
                "num_classes", num_classes,
                "; use include_top=False for the features without a head")
        for what, rate in (("dropout_rate", dropout_rate),
                           ("attention_dropout_rate", attention_dropout_rate),
                           ("drop_path_rate", drop_path_rate)):
            if not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
                raise ValueError(f"{what} must be a number in [0, 1), got {rate!r}.")
        if representation_size:  # (0 or None: no pre_logits layer)
            representation_size = _positive_int("representation_size", representation_size)
        else:
            representation_size = None
        if classifier_activation is not None:
            try:
                classifier_activation = keras.activations.get(classifier_activation)
            except (ValueError, TypeError):
                raise ValueError(f"classifier_activation {classifier_activation!r} is not a "
                                 "Keras activation: use None (logits), 'softmax' or "
                                 "'sigmoid'.") from None
        norm = as_normalization(normalization)
        try:
            policy = keras.dtype_policies.get(dtype) if dtype is not None else \
                keras.config.dtype_policy()
        except (ValueError, TypeError):
            raise ValueError(f"dtype {dtype!r} is not a Keras dtype policy: use 'float32', "
                             "'mixed_bfloat16' or 'mixed_float16'.") from None
        # A float32 head keeps logits float32 under a mixed policy.
        head_dtype = "float32" if policy.variable_dtype == "float32" else policy
        prefix_tokens = int(pooling == "token") + int(bool(distilled))

        patches = (ResNetStem(v.resnet, v.resnet_width, v.patch_size, dtype=policy,
                              name="patches") if v.is_hybrid
                   else Patches(v.patch_size, dtype=policy, name="patches"))
        patch_encoder = PatchEncoder(v.width, class_token=pooling == "token",
                                     distillation_token=bool(distilled), dtype=policy,
                                     name="patch_encoder")
        embedding_dropout = keras.layers.Dropout(dropout_rate, dtype=policy,
                                                 name="embedding_dropout")
        blocks = [TransformerBlock(v.num_heads, v.mlp_dim, dropout_rate=dropout_rate,
                                   attention_dropout_rate=attention_dropout_rate,
                                   drop_path_rate=drop_path_rate * i / max(v.depth - 1, 1),
                                   gelu=gelu, dtype=policy, name=f"encoderblock_{i}")
                  for i in range(v.depth)]
        encoder_norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy,
                                                       name="encoder_norm")
        pool = TokenPooling(pooling, dtype=policy, name="pool")
        pre_logits = None
        if representation_size:
            # Flax's nn.Dense default init (lecun_normal), as the reference's pre_logits.
            pre_logits = keras.layers.Dense(representation_size, activation="tanh",
                                            kernel_initializer="lecun_normal", dtype=policy,
                                            name="pre_logits")
        head = head_dist = dist_pool = None
        if include_top:
            head = keras.layers.Dense(num_classes, kernel_initializer="zeros",
                                      activation=classifier_activation, dtype=head_dtype,
                                      name="head")
            if distilled:
                dist_pool = TokenPooling("distillation", dtype=policy, name="pool_dist")
                head_dist = keras.layers.Dense(num_classes, kernel_initializer="zeros",
                                               activation=classifier_activation,
                                               dtype=head_dtype, name="head_dist")

        images = keras.Input((height, width, num_channels), name="images")
        x = embedding_dropout(patch_encoder(patches(images)))
        for i, block in enumerate(blocks):
            # The heads read only the class (and distillation) token, so the last block
            # computes only their outputs (same values; its MLP and projections run on those
            # tokens); `feature_model` gives every token.
            last = i == len(blocks) - 1
            x = block(x, output_tokens=prefix_tokens if last and prefix_tokens else None)
        tokens = encoder_norm(x)
        x = pool(tokens)
        if pre_logits is not None:
            x = pre_logits(x)
        if head is not None:
            x = head(x)
            if head_dist is not None:
                y = dist_pool(tokens)
                y = head_dist(pre_logits(y) if pre_logits is not None else y)
                # Inference reads the mean of both heads (DeiT); training reads them apart
                # through `keras_vit.model.distillation_model`.
                x = keras.layers.Average(dtype=head_dtype, name="heads_average")([x, y])
        super().__init__(inputs=images, outputs=x, name=name or default_name(v), **kwargs)
        self.dtype_policy = policy

        self.variant = v
        self.image_size = (height, width)
        self.grid = grid
        self.num_channels = num_channels
        self.num_classes = num_classes if include_top else None
        self.include_top = bool(include_top)
        self.pooling = pooling
        self.distilled = bool(distilled)
        self.representation_size = representation_size
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout_rate = float(attention_dropout_rate)
        self.drop_path_rate = float(drop_path_rate)
        self.gelu = gelu
        self.classifier_activation = classifier_activation
        self.normalization = norm
        self.patches = patches
        self.patch_encoder = patch_encoder
        self.embedding_dropout = embedding_dropout
        self.blocks = blocks
        self.encoder_norm = encoder_norm
        self.pool = pool
        self.pre_logits = pre_logits
        self.head = head
        self.head_dist = head_dist
        self.pool_dist = dist_pool

    @property
    def num_prefix_tokens(self):
        """Tokens before the patch tokens: the class token and DeiT's distillation token."""
        return self.patch_encoder.num_prefix_tokens

    @property
    def outputs_probabilities(self):
        """Whether the outputs are already scores (a softmax/sigmoid head), not logits."""
        return _is_activation(self.classifier_activation)

    def preprocess(self, images, resize=True):
        """RGB images in [0, 255] -> this model's inputs: resized to its size (unless
        `resize=False`) and normalised as it was trained (`normalization`)."""
        from keras_vit.images import preprocess

        return preprocess(images, self.image_size if resize else None, self.normalization)

    def get_config(self):
        # Not Functional's config (the layer graph): the arguments that rebuild the model.
        activation = self.classifier_activation
        return {
            "variant": self.variant.to_config(),
            "image_size": list(self.image_size),
            "num_classes": self.num_classes,
            "num_channels": self.num_channels,
            "include_top": self.include_top,
            "pooling": self.pooling,
            "distilled": self.distilled,
            "representation_size": self.representation_size,
            "dropout_rate": self.dropout_rate,
            "attention_dropout_rate": self.attention_dropout_rate,
            "drop_path_rate": self.drop_path_rate,
            "gelu": self.gelu,
            "classifier_activation": (None if activation is None
                                      else keras.activations.serialize(activation)),
            "normalization": self.normalization.to_config(),
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        if isinstance(config.get("classifier_activation"), (dict, str)):
            config["classifier_activation"] = keras.activations.deserialize(
                config["classifier_activation"])
        return cls(**config)


def default_name(variant):
    # "R50+B/16" -> "vit_r50_b16": TensorFlow name scopes (as fit opens) reject "+" and "/".
    return "vit_" + variant.name.lower().replace("/", "").replace("+", "_").replace("-", "_")


def _positive_int(what, value, fix=""):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}{fix}.")
    return int(value)


def _is_activation(activation):
    return activation is not None and activation is not keras.activations.linear


def build(variant, *, image_size=None, num_classes=1000, patch_size=None, depth=None,
          num_channels=3, include_top=True, pooling=None, distilled=None,
          representation_size=None, dropout_rate=0.0, attention_dropout_rate=0.0,
          drop_path_rate=0.0, gelu=None, classifier_activation=None, normalization=None,
          weights=None, dtype=None, name=None):
    """Builds a `ViT`, optionally with pretrained weights.

    Args as `ViT`, plus:
        variant: "Ti/16", "S/16", "B/16", "B/32", "L/16", "H/14", "R50+B/16", ...
            (see `keras_vit.variants()`).
        image_size: int or (height, width). Default: the resolution of the `weights`
            checkpoint (e.g. 384 for "augreg_in21k_ft_in1k_384"), else 224.
        pooling, gelu, representation_size, distilled, normalization: default to what the
            `weights` checkpoint was trained with, else the variant's ("token", "tanh", none,
            False, "vit"; DeiT: distilled, "erf", "imagenet").
        weights: optional weights: a Keras `.weights.h5` file; an original / AugReg /
            big_vision `.npz`; a Hugging Face or timm `.safetensors`, `.bin`, `.pt` or `.pth`
            file; or a published name such as "augreg_in21k" or "augreg_in21k_ft_in1k_384"
            (downloaded once into the Keras cache, see
            `keras_vit.checkpoints.named_checkpoints()`). Checkpoints are resampled to
            `image_size`; a head whose class count differs from `num_classes` starts from
            zeros (with a warning).
        dtype: dtype policy of the model, e.g. "mixed_bfloat16" (None: Keras' global one).

    Returns:
        A `ViT` (a `keras.Model`).
    """
    v = parse_variant(variant, patch_size)
    if depth is not None:
        v = dataclasses.replace(v, depth=_positive_int("depth", depth))
    checkpoint = None
    if weights is not None:
        from keras_vit import checkpoints  # on use: checkpoint readers and downloads

        checkpoint = checkpoints.open_weights(weights, variant=v)  # None for .weights.h5
        if checkpoint is not None:  # what the file says, unless given here
            pooling, representation_size, gelu = checkpoint.build_args(
                pooling, representation_size, gelu)
            if distilled is None:
                distilled = checkpoint.distilled
            if normalization is None:
                normalization = checkpoint.normalization
    if image_size is None:  # the checkpoint's own resolution: its position table fits as is
        grid = checkpoint.position_grid if checkpoint is not None else None
        image_size = (grid[0] * v.stride, grid[1] * v.stride) if grid else 224
    model = ViT(v, image_size=image_size, num_classes=num_classes, num_channels=num_channels,
                include_top=include_top, pooling=pooling or "token", distilled=distilled,
                representation_size=representation_size, dropout_rate=dropout_rate,
                attention_dropout_rate=attention_dropout_rate, drop_path_rate=drop_path_rate,
                gelu=gelu, classifier_activation=classifier_activation,
                normalization=normalization, dtype=dtype, name=name)
    if checkpoint is not None:
        checkpoints.load_checkpoint(model, checkpoint)
    elif weights is not None:
        from keras_vit.errors import CheckpointError

        try:
            model.load_weights(weights)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"{weights} is not a readable Keras weights file for this model (damaged, or "
                f"saved from another architecture): {str(err).splitlines()[0]}") from None
    return model


def load_model(path, *, compile=True):
    """Loads a `.keras` file saved by keras-vit, as a `ViT`.

    Files written by keras-vit 0.1 (a plain functional model) are converted to a `ViT` with
    the same weights (`upgrade_legacy_model`). Other Keras models load as they are.
    """
    import os
    import zipfile

    from keras_vit import recipes  # noqa: F401  registers the optimizers, schedules, losses

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file.")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable .keras file (a .keras file is a zip "
                         "archive that model.save writes; this one is damaged or something "
                         "else).")
    try:
        model = keras.saving.load_model(path, compile=compile)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a readable .keras file (damaged, or saved by code "
                         f"that is not installed): {str(err).splitlines()[0][:300]}") from None
    return upgrade_legacy_model(model)


def require_vit(model, what):
    """`model` if it is a `ViT`, else a TypeError saying how to get one."""
    if isinstance(model, ViT):
        return model
    raise TypeError(f"{what} needs a keras_vit.ViT (from keras_vit.build or "
                    f"keras_vit.load_model), got {type(model).__name__} "
                    f"{getattr(model, 'name', '')!r}. A model saved by keras-vit 0.1 becomes "
                    "one with keras_vit.load_model(path).")


def feature_model(model):
    """A model sharing `model`'s layers and weights that returns its intermediate values.

    Nothing is rebuilt or copied: the returned model calls the same layers, so
    fine-tuning one changes the other. Its output is a dict:

    - "tokens": `(batch, tokens, D)` final-normed token features;
    - "pooled": `(batch, D)` what the head reads (after pre_logits if present);
    - "block_outputs": list of `(batch, tokens, D)`, one per encoder block;
    - "attention_weights": list of `(batch, heads, tokens, tokens)`, one per block.
    """
    model = require_vit(model, "feature_model")
    images = keras.Input(model.inputs[0].shape[1:], name="images")
    x = model.embedding_dropout(model.patch_encoder(model.patches(images)))
    block_outputs, attention_weights = [], []
    for block in model.blocks:
        x, scores = _ReturnAttention(block, name=f"{block.name}_with_attention")(x)
        block_outputs.append(x)
        attention_weights.append(scores)
    tokens = model.encoder_norm(x)
    pooled = model.pool(tokens)
    if model.pre_logits is not None:
        pooled = model.pre_logits(pooled)
    return keras.Model(images, {"tokens": tokens, "pooled": pooled,
                                "block_outputs": block_outputs,
                                "attention_weights": attention_weights},
                       name=f"{model.name}_features")


def distillation_model(model):
    """A model sharing a distilled `ViT`'s layers that returns both heads' logits apart,
    `{"class": ..., "distillation": ...}`, for training with a teacher (the `ViT` itself
    returns their mean)."""
    model = require_vit(model, "distillation_model")
    if model.head_dist is None:
        raise ValueError(f"{model.name} has no distillation head: build a DeiT variant "
                         "(e.g. 'DeiT-S/16') or pass distilled=True.")
    images = keras.Input(model.inputs[0].shape[1:], name="images")
    x = model.embedding_dropout(model.patch_encoder(model.patches(images)))
    for i, block in enumerate(model.blocks):
        x = block(x, output_tokens=2 if i == len(model.blocks) - 1 else None)
    tokens = model.encoder_norm(x)
    heads = {}
    for key, pool, head in (("class", model.pool, model.head),
                            ("distillation", model.pool_dist, model.head_dist)):
        y = pool(tokens)
        heads[key] = head(model.pre_logits(y) if model.pre_logits is not None else y)
    return keras.Model(images, heads, name=f"{model.name}_two_heads")


@keras.saving.register_keras_serializable(package="keras_vit", name="ReturnAttention")
class _ReturnAttention(keras.layers.Layer):
    """Calls a shared TransformerBlock asking for its attention weights.

    A functional model cannot reuse a layer with a different output structure
    (Keras checks connectivity with the structure of the layer's first call), so
    the second call goes through this thin wrapper; the weights stay shared. It takes
    the block's dtype policy, not the global one in force when `feature_model` runs.
    """

    def __init__(self, block, **kwargs):
        kwargs.setdefault("dtype", block.dtype_policy)
        super().__init__(**kwargs)
        self.block = block

    def call(self, x):
        return self.block(x, return_attention_scores=True)

    def compute_output_spec(self, x):
        return self.block.compute_output_spec(x, return_attention_scores=True)

    def get_config(self):
        return {**super().get_config(), "block": keras.saving.serialize_keras_object(self.block)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(keras.saving.deserialize_keras_object(config.pop("block")), **config)


def class_probabilities(model, outputs, outputs_probabilities=None):
    """A classifier's outputs as float32 scores per class: the softmax of its logits, or the
    outputs themselves when they already are scores (a head with a softmax or sigmoid: a
    second softmax would flatten them).

    `outputs_probabilities`: say which, for a model that is not a `ViT` (default: whether its
    last layer has such an activation)."""
    outputs = keras.ops.cast(outputs, "float32")
    if outputs_probabilities is None:
        if isinstance(model, ViT):
            outputs_probabilities = model.outputs_probabilities
        else:
            last = model.layers[-1] if getattr(model, "layers", None) else None
            outputs_probabilities = _is_activation(getattr(last, "activation", None))
    return outputs if outputs_probabilities else keras.ops.softmax(outputs, axis=-1)


# --- models written by keras-vit 0.1 ---------------------------------------------------------

_LEGACY_PARTS = ("patches", "patch_encoder", "encoder_norm", "pool")


def upgrade_legacy_model(model):
    """A `ViT` with the weights of a model that keras-vit 0.1's `build` made (a plain
    functional model with layers named patches, patch_encoder, encoderblock_i, encoder_norm,
    pool, pre_logits and head); any other model is returned as it is. Its settings are read
    from those layers' configs, the only place that knows the old names."""
    if isinstance(model, ViT) or not isinstance(model, keras.Model):
        return model
    layers = {layer.name: layer for layer in model.layers}
    if not all(name in layers for name in _LEGACY_PARTS):
        return model
    blocks = [layer for layer in model.layers if isinstance(layer, TransformerBlock)]
    stem, encoder = layers["patches"], layers["patch_encoder"]
    first, last = blocks[0], blocks[-1]
    hybrid = isinstance(stem, ResNetStem)
    variant = Variant(
        _legacy_variant_name(encoder.width, first.num_heads, first.mlp_dim, stem.patch_size,
                             hybrid),
        encoder.width, len(blocks), first.num_heads, first.mlp_dim, stem.patch_size,
        resnet=stem.stage_depths if hybrid else None,
        resnet_width=stem.width if hybrid else 64)
    head = layers.get("head")
    pre_logits = layers.get("pre_logits")
    dropout = layers.get("embedding_dropout")
    upgraded = ViT(
        variant, image_size=tuple(model.inputs[0].shape[1:3]),
        num_channels=int(model.inputs[0].shape[-1]),
        num_classes=head.units if head is not None else None, include_top=head is not None,
        pooling=layers["pool"].mode, representation_size=pre_logits.units if pre_logits else None,
        dropout_rate=dropout.rate if dropout is not None else 0.0,
        attention_dropout_rate=first.attention_dropout_rate,
        drop_path_rate=last.drop_path_rate, gelu=first.gelu,
        classifier_activation=head.activation if head is not None else None,
        dtype=first.dtype_policy, name=model.name)
    pairs = [(stem, upgraded.patches), (encoder, upgraded.patch_encoder),
             (layers["encoder_norm"], upgraded.encoder_norm)]
    pairs += list(zip(blocks, upgraded.blocks))
    if pre_logits is not None:
        pairs.append((pre_logits, upgraded.pre_logits))
    if head is not None:
        pairs.append((head, upgraded.head))
    for old, new in pairs:
        new.set_weights(old.get_weights())
    return upgraded


def _legacy_variant_name(width, heads, mlp_dim, patch_size, hybrid):
    """"S/16", "R+Ti/1", ...: the table's size of that width, else "custom"."""
    size = next((name for name, dims in SIZES.items() if dims[0] == width and dims[2:] == (
        heads, mlp_dim)), "custom")
    return f"{'R+' if hybrid else ''}{size}/{patch_size}"
