"""`build("B/16")`: the ViT of "An Image is Worth 16x16 Words" as a Keras functional model."""

import dataclasses

import keras

from keras_vit.layers import (Patches, PatchEncoder, TokenPooling, TransformerBlock,
                              patch_grid)
from keras_vit.layers.gelu import GELU_FORMS
from keras_vit.layers.resnet import ResNetStem
from keras_vit.variants import image_hw, parse_variant


def build(variant, *, image_size=None, num_classes=1000, patch_size=None, depth=None,
          num_channels=3,
          include_top=True, pooling=None, representation_size=None, dropout_rate=0.0,
          attention_dropout_rate=0.0, drop_path_rate=0.0, gelu=None,
          classifier_activation=None, weights=None, name=None):
    """Builds a Vision Transformer as a Keras functional model.

    The model takes images scaled to [-1, 1] (see `keras_vit.preprocess`) of shape
    `(batch, height, width, num_channels)` and returns logits (float32 under mixed
    precision too).

    Args:
        variant: "Ti/16", "S/16", "B/16", "B/32", "L/16", "H/14", ... (see `variants()`).
        image_size: int or (height, width); each must be divisible by the patch size.
            Default: the resolution of the `weights` checkpoint (e.g. 384 for
            "augreg_in21k_ft_in1k_384"), else 224.
        num_classes: int, classes of the head.
        patch_size: int, overrides the patch size in `variant` (e.g. 4 for 32x32 images).
        depth: int, overrides the number of encoder blocks (e.g. 6 for small data).
        num_channels: int, image channels.
        include_top: bool; False returns the pooled features the head would read
            (width D, or `representation_size`) instead of logits, in the compute dtype
            (bfloat16 under mixed_bfloat16).
        pooling: "token" (class token, the paper; the default) or "gap" (no class
            token, global average pooling of the patch tokens). With `weights`
            from a checkpoint, defaults to what the checkpoint has.
        representation_size: optional int, adds the "pre_logits" Dense + tanh
            layer of the i21k checkpoints (taken from the checkpoint when it has one).
        dropout_rate: float, dropout after the embeddings, attention and MLP.
        attention_dropout_rate: float, dropout on the attention weights.
        drop_path_rate: float, stochastic depth, rising linearly from 0 at the
            first block to this rate at the last.
        gelu: "tanh" (the JAX reference and its checkpoints; the default) or "erf"
            (exact; PyTorch, timm and Hugging Face weights, chosen by default for them).
        classifier_activation: None for logits, or e.g. "softmax".
        weights: optional weights for this model: a Keras `.weights.h5` file; an
            original / AugReg / big_vision `.npz`; a Hugging Face or timm
            `.safetensors`, `.bin`, `.pt` or `.pth` file; or a published name such
            as "augreg_in21k" or "augreg_in21k_ft_in1k_384" (downloaded once into
            the Keras cache, see `keras_vit.checkpoints.named_checkpoints()`).
            Checkpoints are resampled to `image_size`; a head whose class count
            differs from `num_classes` starts from zeros (with a warning).
        name: model name; defaults to e.g. "vit_b16".

    Returns:
        A `keras.Model`.
    """
    v = parse_variant(variant, patch_size)
    if depth is not None:
        if int(depth) < 1:
            raise ValueError(f"depth must be a positive integer, got {depth}.")
        v = dataclasses.replace(v, depth=int(depth))
    checkpoint = None
    if weights is not None:
        from keras_vit import checkpoints  # on use: checkpoint readers and downloads
        checkpoint = checkpoints.open_weights(weights, variant=v)  # None for .weights.h5
        if checkpoint is not None:  # what the file says, unless given here
            pooling, representation_size, gelu = checkpoint.build_args(
                pooling, representation_size, gelu)
    pooling = pooling or "token"
    gelu = gelu or "tanh"
    if image_size is None:  # the checkpoint's own resolution: its position table fits as is
        grid = checkpoint.position_grid if checkpoint is not None else None
        image_size = (grid[0] * v.stride, grid[1] * v.stride) if grid else 224
    height, width = image_hw(image_size)
    patch_grid(height, width, v.stride)
    if gelu not in GELU_FORMS:
        raise ValueError(f"gelu must be one of {GELU_FORMS}, got {gelu!r}.")
    if include_top and (not num_classes or num_classes < 1):
        raise ValueError(
            f"num_classes must be a positive integer with include_top=True, got {num_classes}; "
            "use include_top=False for features without a head.")

    images = keras.Input((height, width, num_channels), name="images")
    patches = (ResNetStem(v.resnet, v.resnet_width, v.patch_size, name="patches") if v.is_hybrid
               else Patches(v.patch_size, name="patches"))
    x = PatchEncoder(v.width, class_token=pooling == "token", name="patch_encoder")(
        patches(images))
    x = keras.layers.Dropout(dropout_rate, name="embedding_dropout")(x)
    for i in range(v.depth):
        block = TransformerBlock(
            v.num_heads, v.mlp_dim, dropout_rate=dropout_rate,
            attention_dropout_rate=attention_dropout_rate,
            drop_path_rate=drop_path_rate * i / max(v.depth - 1, 1), gelu=gelu,
            name=f"encoderblock_{i}")
        # The head reads only the class token, so the last block computes only its output
        # (same values; its MLP and projections run on one token); `feature_model` gives
        # every token.
        x = block(x, class_token_only=pooling == "token" and i == v.depth - 1)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="encoder_norm")(x)
    x = TokenPooling(pooling, name="pool")(x)
    if representation_size:
        # Flax's nn.Dense default init (lecun_normal), as the reference's pre_logits.
        x = keras.layers.Dense(representation_size, activation="tanh",
                               kernel_initializer="lecun_normal", name="pre_logits")(x)
    if include_top:
        # float32 head: logits stay float32 under mixed precision.
        x = keras.layers.Dense(num_classes, kernel_initializer="zeros",
                               activation=classifier_activation, dtype="float32",
                               name="head")(x)
    # "R50+B/16" -> "vit_r50_b16": TensorFlow name scopes (as fit opens) reject "+" and "/".
    default_name = "vit_" + v.name.lower().replace("/", "").replace("+", "_")
    model = keras.Model(images, x, name=name or default_name)
    if checkpoint is not None:
        checkpoints.load_checkpoint(model, checkpoint)
    elif weights is not None:
        model.load_weights(weights)
    return model


def _encoder_layers(model):
    """The layers of a model made by `build`, by role, checked so errors say what is wrong."""
    by_name = {layer.name: layer for layer in model.layers}
    missing = [n for n in ("patches", "patch_encoder", "encoder_norm", "pool") if n not in by_name]
    if missing:
        raise ValueError(f"Model {model.name!r} was not made by keras_vit.build: it has no "
                         f"layer(s) {missing}.")
    blocks = [layer for layer in model.layers if isinstance(layer, TransformerBlock)]
    return by_name, blocks


def feature_model(model):
    """A model sharing `model`'s layers and weights that returns its intermediate values.

    Nothing is rebuilt or copied: the returned model calls the same layers, so
    fine-tuning one changes the other. Its output is a dict:

    - "tokens": `(batch, tokens, D)` final-normed token features;
    - "pooled": `(batch, D)` what the head reads (after pre_logits if present);
    - "block_outputs": list of `(batch, tokens, D)`, one per encoder block;
    - "attention_weights": list of `(batch, heads, tokens, tokens)`, one per block.
    """
    layers, blocks = _encoder_layers(model)
    images = keras.Input(model.inputs[0].shape[1:], name="images")
    x = layers["patch_encoder"](layers["patches"](images))
    if "embedding_dropout" in layers:
        x = layers["embedding_dropout"](x)
    block_outputs, attention_weights = [], []
    for block in blocks:
        x, scores = _ReturnAttention(block, name=f"{block.name}_with_attention")(x)
        block_outputs.append(x)
        attention_weights.append(scores)
    tokens = layers["encoder_norm"](x)
    pooled = layers["pool"](tokens)
    if "pre_logits" in layers:
        pooled = layers["pre_logits"](pooled)
    return keras.Model(images, {"tokens": tokens, "pooled": pooled,
                                "block_outputs": block_outputs,
                                "attention_weights": attention_weights},
                       name=f"{model.name}_features")


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

    def get_config(self):
        return {**super().get_config(), "block": keras.saving.serialize_keras_object(self.block)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(keras.saving.deserialize_keras_object(config.pop("block")), **config)


def class_probabilities(model, outputs):
    """A classifier's outputs as float32 scores per class: the softmax of its logits, or the
    outputs themselves when the head already applies an activation (a model built with
    `classifier_activation="softmax"` or "sigmoid"), which a second softmax would flatten."""
    outputs = keras.ops.cast(outputs, "float32")
    head = next((layer for layer in model.layers if layer.name == "head"), None)
    activation = getattr(head, "activation", None)
    if activation is not None and activation is not keras.activations.linear:
        return outputs
    return keras.ops.softmax(outputs, axis=-1)
