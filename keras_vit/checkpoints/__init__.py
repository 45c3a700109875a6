"""Pretrained checkpoints: read Google's, big_vision's, Hugging Face's and timm's ViT weights.

    model = keras_vit.build("B/16", weights="path/to/B_16-i21k-...-res_224.npz")
    model = keras_vit.build("B/16", image_size=384, num_classes=102, weights="augreg_in21k")
    keras_vit.checkpoints.load_checkpoint(model, "model.safetensors")

Formats (chosen by file name; see `open_weights`):

- original vit_jax / AugReg `.npz` and big_vision `.npz` (see `flax`);
- Hugging Face `ViTModel` / `ViTForImageClassification` and timm `vit_*`
  weights as `.safetensors` (no torch needed) or `.bin` / `.pt` / `.pth` state
  dicts (torch needed) (see `torch_layouts`);
- a published name such as "augreg_in21k_ft_in1k" (see `registry`);
- a Keras `.weights.h5` file (loaded with `model.load_weights`).

Models built from a checkpoint take its pooling, pre_logits size and GELU form
unless they are given; the position embeddings are resampled to the model's
grid (bilinear like the reference, or bicubic), and a head for a different
class count starts from zeros.
"""

import os

from keras_vit.checkpoints.core import (Checkpoint, CheckpointError, CheckpointWarning,
                                        load_checkpoint, model_targets, save_npz)
from keras_vit.checkpoints.flax import read_npz
from keras_vit.checkpoints.registry import (cache_dir, download, fetch, is_name,
                                            named_checkpoints)
from keras_vit.checkpoints.resample import (posemb_sincos_2d, resample_grid,
                                            resample_position_embeddings)
from keras_vit.checkpoints.torch_layouts import (TORCH_SUFFIXES, load_safetensors,
                                                 read_torch_weights)

__all__ = ["Checkpoint", "CheckpointError", "CheckpointWarning", "cache_dir", "download",
           "fetch", "load_checkpoint", "load_safetensors", "model_targets", "named_checkpoints",
           "open_weights", "posemb_sincos_2d", "read_checkpoint", "read_npz",
           "read_torch_weights", "resample_grid", "resample_position_embeddings", "save_npz"]


def read_checkpoint(path):
    """Reads an `.npz`, `.safetensors`, `.bin`, `.pt` or `.pth` checkpoint into a `Checkpoint`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint file {path!r}.")
    if path.endswith(".npz"):
        return read_npz(path)
    if path.endswith(TORCH_SUFFIXES):
        return read_torch_weights(path)
    raise CheckpointError(f"Unknown checkpoint format: {path} (expected .npz, .safetensors, "
                          ".bin, .pt, .pth, or a Keras .weights.h5).")


def open_weights(weights, variant=None):
    """Resolves the `weights` argument of `build`.

    Returns a `Checkpoint` for a checkpoint file or published name (downloading
    it on first use), or None for a Keras `.weights.h5` file, which
    `model.load_weights` reads.
    """
    if isinstance(weights, Checkpoint):
        return weights
    text = os.fspath(weights)
    if text.endswith(".h5") or text.endswith(".keras"):
        if not os.path.exists(text):
            raise FileNotFoundError(f"No weights file {text!r}.")
        return None
    looks_like_name = not os.path.splitext(text)[1] and os.sep not in text
    if not os.path.exists(text) and (is_name(text) or looks_like_name):
        return read_checkpoint(fetch(text, variant))  # unknown names raise, listing the known
    return read_checkpoint(text)
