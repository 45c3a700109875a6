"""Attention maps by attention rollout (Abnar & Zuidema, 2020), and pictures of them.

    heat = keras_vit.attention_map(model, image)        # (H, W) in [0, 1]
    keras_vit.save_attention_figure(image, heat, "attention.png", labels="cat 93%")

Rollout: in every block, average the attention weights over the heads, add the
identity (the residual connection) and renormalise the rows; multiply these
matrices from the first block to the last. The row of the class token then says
how much each patch flows into the token the head reads. Models without a class
token (pooling="gap") read the mean of all tokens, so their map is the mean of
all rows of the rollout. The map is upsampled from the patch grid (the stem's
grid for hybrids) to the image's resolution and scaled to [0, 1].
"""

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

    from keras_vit.model import feature_model, require_vit

    model = require_vit(model, "attention_map")
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
        x = model.preprocess(x, resize=False)
    features = features or feature_model(model)
    weights = [keras.ops.convert_to_numpy(w) for w in features(x)["attention_weights"]]
    rollout = attention_rollout(weights)
    grid, prefix = model.grid, model.num_prefix_tokens
    if prefix:
        scores = rollout[:, 0, prefix:]  # what the class token (read by the head) draws from
    else:
        scores = rollout.mean(axis=1)  # GAP reads every token equally
    heat = scores.reshape(-1, grid[0], grid[1], 1).astype(np.float32)
    heat = keras.ops.convert_to_numpy(
        keras.ops.image.resize(heat, (height, width), interpolation="bilinear"))[..., 0]
    heat = heat - heat.min(axis=(1, 2), keepdims=True)
    heat = heat / np.maximum(heat.max(axis=(1, 2), keepdims=True), 1e-12)
    return heat[0] if single else heat


COLORMAP = "magma"  # perceptually uniform, readable in grey


def overlay(image, heat, alpha=0.5, colormap=COLORMAP):
    """Blends a heat map coloured by a perceptually uniform colour map (magma) over an RGB
    image in [0, 255]; returns uint8 (H, W, 3)."""
    from matplotlib import colormaps

    image = np.asarray(image, dtype=np.float32)
    heat = np.asarray(heat, dtype=np.float32)
    if image.shape[:2] != heat.shape:
        raise ValueError(f"Heat map {heat.shape} does not match the image {image.shape[:2]}.")
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(*heat.shape, 1), 3, axis=-1)
    colours = colormaps[colormap](np.clip(heat, 0.0, 1.0))[..., :3]
    blended = (1.0 - alpha) * image[..., :3] + alpha * 255.0 * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def save_attention_figure(images, heats, path, *, labels=None, grid=None, alpha=0.5):
    """Writes one PNG sheet: for each image, the image, then the attention overlay with a
    colour bar, titled with its label (e.g. the predicted class and probability), and the
    patch grid drawn when it is coarse (at most 16 cells a side).

    Args:
        images: an (H, W, 3) image or a list of them (RGB in [0, 255], any sizes).
        heats: the matching heat map(s) from `attention_map`, in [0, 1].
        path: the PNG to write.
        labels: optional text per image ("tulip 97.3%").
        grid: optional (rows, cols) of the model's patch grid.
        alpha: opacity of the heat map.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.cm import ScalarMappable

    if isinstance(images, np.ndarray) and images.ndim == 3:
        images, heats = [images], [heats]
        labels = None if labels is None else [labels] if isinstance(labels, str) else labels
    images, heats = list(images), list(heats)
    if len(images) != len(heats):
        raise ValueError(f"{len(images)} images but {len(heats)} heat maps.")
    rows = len(images)
    figure, axes = plt.subplots(rows, 2, figsize=(8, 3.8 * rows), squeeze=False)
    for i, (image, heat) in enumerate(zip(images, heats)):
        image = np.asarray(image)
        left, right = axes[i]
        left.imshow(image.astype(np.uint8))
        left.set_title("image" if labels is None else labels[i], fontsize=10)
        right.imshow(overlay(image, heat, alpha))
        right.set_title("attention rollout (class token)", fontsize=10)
        if grid is not None and max(grid) <= 16:
            height, width = image.shape[:2]
            for r in range(1, grid[0]):
                right.axhline(r * height / grid[0] - 0.5, color="white", linewidth=0.5,
                              alpha=0.6)
            for c in range(1, grid[1]):
                right.axvline(c * width / grid[1] - 0.5, color="white", linewidth=0.5,
                              alpha=0.6)
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
        bar = figure.colorbar(ScalarMappable(Normalize(0, 1), colormaps[COLORMAP]), ax=right,
                              fraction=0.046, pad=0.04)
        bar.set_label("share of the prediction's attention (scaled to 0..1)", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)
