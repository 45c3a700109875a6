"""Defaults that fit the data: what `keras-vit train` picks for a folder or TFDS dataset when
the user did not say (image size, patch, variant, depth, batch).

- Images smaller than the paper's 224 keep their size (no upscaling), cut into a patch that
  gives a grid of about 8 tokens a side (the short side; at least 4).
- The variant follows the training set: a ViT learns little from scratch on a few thousand
  images, and a small one learns it faster and saves a small file: Ti with 6 blocks under
  5,000 training images, Ti under 50,000, S otherwise.
- The batch is never larger than the training set (the largest power of two that fits).

A checkpoint (`weights`) decides the model itself; then only the batch follows the data.
"""

import dataclasses
import math

SMALL_DATA = 5_000      # below: Ti with 6 blocks
MEDIUM_DATA = 50_000    # below: Ti; above: S
TOKENS_A_SIDE = 8       # the patch grid aimed at on the short side of small images
PAPER_SIZE = 224


def fit_to_data(given, config, data):
    """(config with the data's defaults where `given` (the user's, unresolved) left a setting
    unset, a sentence saying what was chosen and why, or None when nothing was)."""
    if config.data == "digits":  # its defaults are measured (DATA_DEFAULTS)
        return config, None
    changes, reasons = {}, []
    train = data.sizes["train"]
    model_given = any(getattr(given, name) is not None
                      for name in ("variant", "image_size", "patch_size", "depth"))
    if not given.weights and not model_given:
        size = data.typical_size
        if size is not None and min(size) < PAPER_SIZE:
            short = min(size)
            patch = max(1, round(short / TOKENS_A_SIDE))
            if short // patch < 4:
                patch = max(1, short // 4)
            height, width = (max(patch, round(side / patch) * patch) for side in size)
            changes["image_size"] = (height, width)
            reasons.append(f"{height}x{width} images (median {size[0]}x{size[1]}: not "
                           f"upscaled) in {patch}x{patch} px patches ({height // patch}x"
                           f"{width // patch} tokens)")
        else:
            patch = 16
        name = "Ti" if train < MEDIUM_DATA else "S"
        changes.update(variant=f"{name}/{patch}", patch_size=None,
                       depth=6 if train < SMALL_DATA else None)
        reasons.append(f"{name}/{patch}" + (" with 6 blocks" if train < SMALL_DATA else "") +
                       f" for {train:,} training images")
    if given.batch_size is None and config.batch_size > train:
        batch = 2 ** int(math.log2(train))
        changes["batch_size"] = batch
        reasons.append(f"batch {batch} (the training set has {train})")
    if not changes:
        return config, None
    sentence = ("Chosen from the data: " + "; ".join(reasons) + ". Set --variant, "
                "--image-size, --patch-size, --depth or --batch-size to choose yourself.")
    return dataclasses.replace(config, **changes), sentence
