"""Readers for the JAX checkpoints: original vit_jax / AugReg `.npz` and big_vision `.npz`.

Original files (google-research/vision_transformer, AugReg) are flat `.npz`
archives whose keys already are the canonical layout. big_vision files differ:

- a prefix: `params/` (or `params/img/` for two-tower models, `opt/target/` for
  old ones); keys outside it (optimizer state, a text tower) are ignored;
- the position table is a top-level `pos_embedding` (older:
  `Transformer/pos_embedding`) with no class-token slot (the class token, when
  there is one, is concatenated after the embeddings are added), or none at
  all for fixed sin-cos embeddings;
- block sub-modules numbered `LayerNorm_0`, `MultiHeadDotProductAttention_0`,
  `LayerNorm_1`, `MlpBlock_0` (original: `_0`, `_1`, `_2`, `_3`);
- "scan" checkpoints keep all blocks in `Transformer/encoderblock/...` arrays
  with a leading depth axis.
"""

import re
import zipfile

import numpy as np

from keras_vit.checkpoints.core import POSEMB, POSEMB_GRID, Checkpoint, CheckpointError, Entry
from keras_vit.checkpoints.resample import square_grid

_PREFIXES = ("params/img/", "params/", "opt/target/", "")
_BV_RENAME = (("MultiHeadDotProductAttention_0/", "MultiHeadDotProductAttention_1/"),
              ("LayerNorm_1/", "LayerNorm_2/"), ("MlpBlock_0/", "MlpBlock_3/"))
_GROUP_NORM = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")
_SCANNED = "Transformer/encoderblock/"


def read_npz_arrays(path):
    """All arrays of an `.npz` file, loaded with `allow_pickle=False`."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # not a zip: NumPy would try to unpickle it
        what = "an empty file" if not magic else "not an .npz archive (a zip of .npy arrays)"
        raise CheckpointError(f"{path} is {what}: give the .npz checkpoint file as downloaded "
                              "(or a .safetensors / .bin / .pt / .pth / .weights.h5 file).")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise CheckpointError(f"{path} is a single .npy array, not an .npz checkpoint.")
            arrays = {}
            for key in archive.files:
                try:
                    arrays[key] = archive[key]
                except ValueError as err:  # object arrays need pickle: refused
                    raise CheckpointError(
                        f"{path}: key {key!r} holds Python objects, which would need "
                        f"unpickling (allow_pickle=False refuses it): {err}") from err
            return arrays
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable .npz file (truncated or corrupt?): "
                              f"{err}") from err


def read_npz(path):
    """Reads an original vit_jax / AugReg or big_vision `.npz` into a `Checkpoint`."""
    raw = read_npz_arrays(path)
    grid = raw.pop(POSEMB_GRID, None)
    prefix = next((p for p in _PREFIXES if f"{p}embedding/kernel" in raw), None)
    if prefix is None:
        sample = ", ".join(sorted(raw)[:8])
        raise CheckpointError(
            f"{path} is not a ViT checkpoint: no 'embedding/kernel' (with or without a "
            f"params/ prefix) among its {len(raw)} keys ({sample}, ...).")
    ignored = [k for k in raw if not k.startswith(prefix)]
    arrays = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    sources = {k: prefix + k for k in arrays}

    scanned = any(k.startswith(_SCANNED) for k in arrays)
    if scanned:  # Transformer/encoderblock/<rest> (depth, ...) -> encoderblock_{i}/<rest>
        for key in [k for k in arrays if k.startswith(_SCANNED)]:
            stacked, rest = arrays.pop(key), key[len(_SCANNED):]
            source = sources.pop(key)
            for i in range(stacked.shape[0]):
                arrays[f"Transformer/encoderblock_{i}/{rest}"] = stacked[i]
                sources[f"Transformer/encoderblock_{i}/{rest}"] = f"{source}[{i}]"
    big_vision = (prefix.startswith("params/") or scanned or "pos_embedding" in arrays
                  or "Transformer/pos_embedding" in arrays
                  or any("MultiHeadDotProductAttention_0/" in k for k in arrays))
    renumber = any("/MultiHeadDotProductAttention_0/" in k for k in arrays
                   if k.startswith("Transformer/encoderblock_"))
    params = {}
    for key, value in arrays.items():
        canonical = key
        if renumber and key.startswith("Transformer/encoderblock_"):
            for old, new in _BV_RENAME:
                canonical = canonical.replace("/" + old, "/" + new)
        shape = tuple(value.shape)
        if _GROUP_NORM.search(canonical):
            value = value.reshape(-1)  # older Flax stored GroupNorm params as (1, 1, 1, C)
        params[canonical] = Entry(np.asarray(value), sources[key], shape)

    sincos2d = False
    for key in ("pos_embedding", "Transformer/pos_embedding"):
        if key in params:
            entry = params.pop(key)
            table = entry.array if entry.array.ndim == 3 else entry.array[None]
            tokens = table.shape[1]
            combined = square_grid(tokens) is None and square_grid(tokens - 1) is not None
            if "cls" in params and not combined:
                # big_vision: the class token gets no position embedding -> a zero slot.
                table = np.concatenate([np.zeros_like(table[:, :1]), table], axis=1)
            params[POSEMB] = Entry(table, entry.source_key, entry.source_shape)
            break
    else:
        if POSEMB not in params and big_vision:
            sincos2d = True  # big_vision posemb="sincos2d": fixed, not stored

    def namer(key):
        name = key
        if renumber and key.startswith("Transformer/encoderblock_"):
            for old, new in _BV_RENAME:
                name = name.replace("/" + new, "/" + old)
        if scanned and name.startswith("Transformer/encoderblock_"):
            index, _, rest = name[len("Transformer/encoderblock_"):].partition("/")
            name = f"{_SCANNED}{rest}[{index}]"
        if key == POSEMB and big_vision:
            name = "pos_embedding"
        return prefix + name

    return Checkpoint(params, path=path, layout="big_vision" if big_vision else "vit_jax",
                      gelu="tanh", namer=namer, sincos2d=sincos2d, ignored=ignored,
                      grid=None if grid is None else grid.tolist())
