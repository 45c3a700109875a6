"""Attention maps by attention rollout (Abnar & Zuidema, 2020), and the `attention-map` command.

    heat = keras_vit.attention_map(model, image)        # (H, W) in [0, 1]
    keras_vit.save_attention_overlay(image, heat, "overlay.png")

Rollout: in every block, average the attention weights over the heads, add the
identity (the residual connection) and renormalise the rows; multiply these
matrices from the first block to the last. The row of the class token then says
how much each patch flows into the token the head reads. Models without a class
token (pooling="gap") read the mean of all tokens, so their map is the mean of
all rows of the rollout. The map is upsampled from the patch grid (the stem's
grid for hybrids) to the image's resolution and scaled to [0, 1].

    keras-vit attention-map IMAGE [--weights augreg_in21k_ft_in1k --variant B/16] [--out PNG]
    python scripts/attention_map.py IMAGE ...
"""

import os
import sys
import zlib

import numpy as np


def attention_rollout(attention_weights):
    """Rollout of per-block attention weights.

    Args:
        attention_weights: list (one per block) of `(batch, heads, tokens, tokens)` arrays.

    Returns:
        `(batch, tokens, tokens)` float64: row i is the share of each input token in token i
        at the output.
    """
    weights = [np.asarray(w, dtype=np.float64) for w in attention_weights]
    batch, _, tokens, _ = weights[0].shape
    eye = np.eye(tokens)
    rollout = np.broadcast_to(eye, (batch, tokens, tokens))
    for w in weights:
        a = w.mean(axis=1) + eye
        a = a / a.sum(axis=-1, keepdims=True)
        rollout = a @ rollout
    return rollout


def _model_grid_and_token(model):
    layers = {layer.name: layer for layer in model.layers}
    if "patches" not in layers or "patch_encoder" not in layers:
        raise ValueError(f"Model {model.name!r} was not made by keras_vit.build.")
    return tuple(layers["patches"].grid), layers["patch_encoder"].class_token


def attention_map(model, image, *, preprocess=True, features=None):
    """Attention-rollout heat map of a `build` model for an image, at the image's resolution.

    Args:
        model: a model from `keras_vit.build` (any variant, hybrids and GAP models too).
        image: `(H, W, C)` or `(batch, H, W, C)`; RGB in [0, 255] (with
            `preprocess=True`) or already scaled to [-1, 1]. Any size: it is
            resized to the model's input size for the forward pass, and the map
            is returned at the image's own size.
        preprocess: scale [0, 255] -> [-1, 1] with `keras_vit.preprocess`.
        features: optional `keras_vit.feature_model(model)` to reuse across calls.

    Returns:
        float32 `(H, W)` (or `(batch, H, W)`) in [0, 1]; 1 marks the patch the
        prediction draws on most.
    """
    import keras

    from keras_vit.model import feature_model
    from keras_vit.preprocessing import preprocess as scale

    x = np.asarray(image)
    single = x.ndim == 3
    if single:
        x = x[None]
    height, width = x.shape[1:3]
    model_hw = tuple(model.inputs[0].shape[1:3])
    x = keras.ops.convert_to_tensor(x.astype(np.float32))
    if (height, width) != model_hw:
        x = keras.ops.image.resize(x, model_hw, interpolation="bilinear", antialias=True)
    if preprocess:
        x = scale(x)
    features = features or feature_model(model)
    weights = [keras.ops.convert_to_numpy(w) for w in features(x)["attention_weights"]]
    rollout = attention_rollout(weights)
    grid, class_token = _model_grid_and_token(model)
    if class_token:
        scores = rollout[:, 0, 1:]  # what the class token (read by the head) draws from
    else:
        scores = rollout.mean(axis=1)  # GAP reads every token equally
    heat = scores.reshape(-1, grid[0], grid[1], 1).astype(np.float32)
    heat = keras.ops.convert_to_numpy(
        keras.ops.image.resize(heat, (height, width), interpolation="bilinear"))[..., 0]
    heat = heat - heat.min(axis=(1, 2), keepdims=True)
    heat = heat / np.maximum(heat.max(axis=(1, 2), keepdims=True), 1e-12)
    return heat[0] if single else heat


def _jet(values):
    """A jet-like colour map: 0 -> dark blue, 0.5 -> green, 1 -> dark red; (..., 3) in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)


def _png_bytes(rgb):
    """Encodes an (H, W, 3) uint8 array as PNG (zlib + CRC chunks; no imaging library needed)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind, data):
        body = kind + data
        return (len(data).to_bytes(4, "big") + body
                + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "big"))

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def overlay(image, heat, alpha=0.5):
    """Blends a jet-coloured heat map over an RGB image in [0, 255]; returns uint8 (H, W, 3)."""
    image = np.asarray(image, dtype=np.float32)
    heat = np.asarray(heat, dtype=np.float32)
    if image.shape[:2] != heat.shape:
        raise ValueError(f"Heat map {heat.shape} does not match the image {image.shape[:2]}.")
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(*heat.shape, 1), 3, axis=-1)
    blended = (1.0 - alpha) * image[..., :3] + alpha * 255.0 * _jet(heat)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def save_attention_overlay(image, heat, path, alpha=0.5):
    """Writes `overlay(image, heat, alpha)` to `path` as a PNG; returns the path."""
    with open(path, "wb") as f:
        f.write(_png_bytes(overlay(image, heat, alpha)))
    return str(path)


# ---------------------------------------------------------------------------
# keras-vit attention-map IMAGE


def add_arguments(parser):
    parser.add_argument("image", help="image file (JPEG, PNG, BMP or GIF)")
    parser.add_argument("--variant", default="B/16",
                        help="ViT variant when building from --weights (default B/16)")
    parser.add_argument("--weights", default=None,
                        help="checkpoint: .npz / .safetensors / .bin / .weights.h5 file or a "
                             "published name such as augreg_in21k_ft_in1k")
    parser.add_argument("--model", default=None,
                        help="a saved .keras model (instead of --variant/--weights)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="model input size when building from --weights")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--out", default=None,
                        help="output PNG (default: IMAGE's name + _attention.png)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity")


def run(args):
    import keras

    import keras_vit
    from keras_vit.predict import NotAnImageError, read_image

    if args.model is None and args.weights is None:
        print("keras-vit attention-map: pass --weights (or --model); a model with random "
              "weights has no meaningful attention.", file=sys.stderr)
        return 2
    try:
        _, image = read_image(args.image)  # a missing or damaged image fails before the model
        if args.model:
            model = keras.saving.load_model(args.model)
        else:
            model = keras_vit.build(args.variant, image_size=args.image_size,
                                    num_classes=args.num_classes, weights=args.weights)
        heat = attention_map(model, image)  # (a model that is not a keras-vit ViT: says so)
    except (OSError, NotAnImageError, ValueError) as e:  # files, images, checkpoints, models
        print(f"keras-vit attention-map: error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.splitext(args.image)[0] + "_attention.png"
    save_attention_overlay(image, heat, out, alpha=args.alpha)
    print(out)
    return 0
