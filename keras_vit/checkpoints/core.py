"""Checkpoint contents in one layout, and loading them into a model made by `build`.

Every reader (original / AugReg / big_vision `.npz`, Hugging Face and timm
PyTorch weights) turns its file into a `Checkpoint` whose keys are those of the
original vit_jax `.npz` files ("embedding/kernel", "cls",
"Transformer/posembed_input/pos_embedding", "Transformer/encoderblock_{i}/...",
"pre_logits/...", "head/...", and the hybrids' "conv_root/kernel", "gn_root/...",
"block{s}/unit{u}/..."), with arrays in the Flax/Keras layout. `load_checkpoint`
matches those keys against the model's weights, checks every shape, and assigns
nothing until all of them fit.
"""

import dataclasses
import math
import os
import warnings

import keras
import numpy as np

from keras_vit.errors import CheckpointError
from keras_vit.checkpoints.resample import (posemb_sincos_2d, resample_position_embeddings,
                                            square_grid)

POSEMB = "Transformer/posembed_input/pos_embedding"
POSEMB_GRID = "keras_vit/posemb_grid"  # (rows, cols), written by save_npz for non-square grids


class CheckpointWarning(UserWarning):
    """Something in a checkpoint was deliberately not loaded (e.g. a head for other classes)."""


@dataclasses.dataclass
class Entry:
    """One array of a checkpoint, in the canonical layout, and where it came from."""

    array: np.ndarray
    source_key: str
    source_shape: tuple
    # PyTorch attention weights arrive as (D, heads * head_dim): they may be
    # reshaped to the model's (D, heads, head_dim) by splitting axes.
    flexible: bool = False


class Checkpoint:
    """A checkpoint read into the canonical (original vit_jax `.npz`) key layout.

    Attributes:
        params: dict, canonical key -> `Entry`.
        path: str, the file it was read from.
        layout: "vit_jax", "big_vision", "hf" or "timm".
        gelu: "tanh" (JAX checkpoints) or "erf" (PyTorch ones): the GELU it was trained with.
        sincos2d: bool, big_vision fixed sin-cos position embeddings (none stored).
        ignored: list of file keys left out on purpose (e.g. optimizer state).
        grid: (rows, cols) of the position table when the file records it (`save_npz`
            does for grids that are not square), else None: square, inferred.
    """

    def __init__(self, params, *, path, layout, gelu, namer=None, sincos2d=False, ignored=(),
                 grid=None, normalization="vit"):
        self.params = dict(params)
        # How the images it was trained on were scaled ("vit": [-1, 1]; DeiT's: "imagenet").
        self.normalization = normalization
        self.grid = tuple(int(n) for n in grid) if grid is not None else None
        self.path = str(path)
        self.layout = layout
        self.gelu = gelu
        self.sincos2d = bool(sincos2d)
        self.ignored = list(ignored)
        self._namer = namer

    def source_name(self, key):
        """The file's name for a canonical key (for messages about missing keys)."""
        if key in self.params:
            return self.params[key].source_key
        return self._namer(key) if self._namer else key

    @property
    def class_token(self):
        return "cls" in self.params

    @property
    def distilled(self):
        """Whether it is a distilled DeiT (a distillation token and head)."""
        return "dist" in self.params

    @property
    def representation_size(self):
        entry = self.params.get("pre_logits/kernel")
        return None if entry is None else int(entry.array.shape[-1])

    @property
    def num_classes(self):
        entry = self.params.get("head/kernel")
        return None if entry is None else int(entry.array.shape[-1])

    @property
    def position_grid(self):
        """(rows, cols) of the stored position table: recorded, or square; None if unknown."""
        entry = self.params.get(POSEMB)
        if entry is None:
            return None
        table = entry.array if entry.array.ndim == 3 else entry.array[None]
        return self.grid or square_grid(table.shape[1] - self.num_prefix_tokens)

    @property
    def num_prefix_tokens(self):
        """Position entries before the patches': class token, DeiT's distillation token."""
        return int(self.class_token) + int(self.distilled)

    @property
    def depth(self):
        return len({k.split("/")[1] for k in self.params
                    if k.startswith("Transformer/encoderblock_")})

    def build_args(self, pooling, representation_size, gelu):
        """Fills `build` arguments left as None with what this checkpoint was trained with."""
        if pooling is None:
            pooling = "token" if self.class_token else "gap"
        if representation_size is None:
            representation_size = self.representation_size
        if gelu is None:
            gelu = self.gelu
        return pooling, representation_size, gelu

    def __repr__(self):
        return (f"Checkpoint({self.path!r}, layout={self.layout!r}, depth={self.depth}, "
                f"class_token={self.class_token}, representation_size="
                f"{self.representation_size}, num_classes={self.num_classes}, "
                f"gelu={self.gelu!r})")


# ---------------------------------------------------------------------------
# The model side: canonical key -> (variable, canonical shape).


def _vit(model):
    """`model` if it has a ViT's parts (a `keras_vit.ViT`), else a TypeError. (Duck-typed:
    the model module imports the checkpoint readers, not the other way round.)"""
    parts = ("patches", "patch_encoder", "blocks", "encoder_norm", "pre_logits", "head")
    if all(hasattr(model, part) for part in parts):
        return model
    raise TypeError(f"Checkpoints load into a keras_vit.ViT (keras_vit.build or "
                    f"keras_vit.load_model), not {type(model).__name__} "
                    f"{getattr(model, 'name', '')!r}.")


def _stem_targets(stem, targets):
    def norm(prefix, layer):
        targets[f"{prefix}/scale"] = layer.gamma
        targets[f"{prefix}/bias"] = layer.beta

    targets["conv_root/kernel"] = stem.conv_root.kernel
    norm("gn_root", stem.gn_root)
    for prefix, unit in zip(stem.unit_names, stem.units):
        for r in (1, 2, 3):
            targets[f"{prefix}/conv{r}/kernel"] = getattr(unit, f"conv{r}").kernel
            norm(f"{prefix}/gn{r}", getattr(unit, f"gn{r}"))
        if unit.needs_projection:
            targets[f"{prefix}/conv_proj/kernel"] = unit.conv_proj.kernel
            norm(f"{prefix}/gn_proj", unit.gn_proj)


def model_targets(model):
    """The weights of a `build` model under their canonical checkpoint keys.

    Returns:
        (targets, info): `targets` maps key -> (variable, canonical shape);
        `info` has the patch grid, class-token flag and head/pre_logits layers.
    """
    from keras_vit.layers.resnet import ResNetStem

    model = _vit(model)
    stem, encoder = model.patches, model.patch_encoder
    raw = {}
    if isinstance(stem, ResNetStem):
        _stem_targets(stem, raw)
        cell, channels = stem.patch_size, stem.output_channels
    else:
        cell, channels = stem.patch_size, stem.num_channels
    width = encoder.width
    raw["embedding/kernel"] = (encoder.kernel, (cell, cell, channels, width))
    raw["embedding/bias"] = encoder.bias
    if encoder.class_token:
        raw["cls"] = encoder.cls
    if encoder.distillation_token:
        raw["dist"] = encoder.dist
    for i, block in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        att, mlp = block.attention, block.mlp
        raw[p + "LayerNorm_0/scale"] = block.norm_1.gamma
        raw[p + "LayerNorm_0/bias"] = block.norm_1.beta
        for name in ("query", "key", "value"):
            mha = p + f"MultiHeadDotProductAttention_1/{name}/"
            raw[mha + "kernel"] = getattr(att, f"{name}_kernel")
            raw[mha + "bias"] = getattr(att, f"{name}_bias")
        raw[p + "MultiHeadDotProductAttention_1/out/kernel"] = att.out_kernel
        raw[p + "MultiHeadDotProductAttention_1/out/bias"] = att.out_bias
        raw[p + "LayerNorm_2/scale"] = block.norm_2.gamma
        raw[p + "LayerNorm_2/bias"] = block.norm_2.beta
        for d, dense in enumerate((mlp.dense_0, mlp.dense_1)):
            raw[p + f"MlpBlock_3/Dense_{d}/kernel"] = dense.kernel
            raw[p + f"MlpBlock_3/Dense_{d}/bias"] = dense.bias
    norm = model.encoder_norm
    raw["Transformer/encoder_norm/scale"] = norm.gamma
    raw["Transformer/encoder_norm/bias"] = norm.beta
    heads = (("pre_logits", model.pre_logits), ("head", model.head),
             ("head_dist", getattr(model, "head_dist", None)))
    for name, layer in heads:
        if layer is not None:
            raw[f"{name}/kernel"], raw[f"{name}/bias"] = layer.kernel, layer.bias
    targets = {}
    for key, value in raw.items():
        variable, shape = value if isinstance(value, tuple) else (value, None)
        targets[key] = (variable, tuple(shape or variable.shape))
    info = {"grid": tuple(stem.grid), "prefix_tokens": encoder.num_prefix_tokens,
            "pos_embedding": encoder.pos_embedding, "width": width,
            "has_head": model.head is not None}
    return targets, info


# ---------------------------------------------------------------------------
# Loading.


def _merges_to(target, source):
    """True if `source` is `target` with runs of adjacent axes merged ((D, H*k) of (D, H, k))."""
    i = 0
    for size in source:
        prod, start = 1, i
        while i < len(target) and (prod < size or i == start):
            prod *= target[i]
            i += 1
        if prod != size:
            return False
    return i == len(target)


def _fit(entry, shape):
    array = entry.array
    if tuple(array.shape) == tuple(shape):
        return array
    if entry.flexible and array.size == math.prod(shape) and _merges_to(shape, array.shape):
        return array.reshape(shape)
    return None


def _describe(entry):
    where = f"{entry.source_key!r} has shape {tuple(entry.source_shape)} in the file"
    if tuple(entry.source_shape) != tuple(entry.array.shape):
        where += f" ({tuple(entry.array.shape)} in Keras layout)"
    return where


def _warn(message):
    warnings.warn(message, CheckpointWarning, stacklevel=3)


def _position_embeddings(checkpoint, params, info, interpolation, source_grid, problems):
    """The model's position table from the checkpoint's, resampled to the model's grid."""
    variable = info["pos_embedding"]
    shape = tuple(variable.shape)
    grid, prefix = info["grid"], info["prefix_tokens"]
    if checkpoint.sincos2d:
        table = posemb_sincos_2d(grid[0], grid[1], info["width"])
        if prefix:  # big_vision adds position embeddings before the class token
            table = np.concatenate([np.zeros((1, prefix, table.shape[-1]), np.float32), table], 1)
        return table
    entry = params.pop(POSEMB, None)
    if entry is None:
        problems.append(f"missing: {checkpoint.source_name(POSEMB)!r} "
                        f"(position embeddings), the model expects {shape}")
        return None
    table = np.asarray(entry.array, np.float32)
    if table.ndim == 2:
        table = table[None]
    slots = checkpoint.num_prefix_tokens
    cells = table.shape[1] - slots
    if table.shape[-1] != shape[-1]:
        problems.append(f"shape mismatch: {_describe(entry)}; the model expects {shape}")
        return None
    old_grid = (tuple(source_grid) if source_grid is not None
                else checkpoint.grid or square_grid(cells))
    same_grid = old_grid is None or old_grid == grid
    if table.shape[1] == shape[1] and same_grid and slots == prefix:
        return table
    if old_grid is None:
        problems.append(
            f"{entry.source_key!r}: {cells} position entries are not a square grid, so the "
            f"table cannot be resampled to the model's {grid[0]}x{grid[1]} grid; pass "
            "source_grid=(rows, cols)")
        return None
    table = resample_position_embeddings(table, grid, old_grid=old_grid,
                                         num_prefix_tokens=slots, method=interpolation)
    # A model with fewer leading tokens (GAP: none) drops their entries (the "cls" / "dist"
    # keys are reported as extra); one with more starts them from zeros.
    if slots > prefix:
        table = np.concatenate([table[:, :prefix], table[:, slots:]], axis=1)
    elif prefix > slots:
        table = np.concatenate([table[:, :slots], np.zeros_like(table[:, :prefix - slots]),
                                table[:, slots:]], axis=1)
    return table


def load_checkpoint(model, checkpoint, *, strict=True, interpolation="bilinear",
                    source_grid=None):
    """Loads a checkpoint into a model made by `keras_vit.build`.

    Position embeddings are resampled to the model's patch grid; the head is
    kept when its class count matches the model's, else it starts from zeros
    (with a `CheckpointWarning`); a checkpoint head is dropped for a model built
    with `include_top=False`. Nothing is assigned unless everything fits.

    Args:
        model: a model from `keras_vit.build`.
        checkpoint: a `Checkpoint`, a file path or an AugReg file name (a name such as
            "augreg_in21k" names one file per variant: pass `fetch(name, variant)`).
        strict: if True (default) a missing, extra or mis-shaped key raises a
            `CheckpointError` naming it with both shapes; if False, missing and
            extra keys only warn (mis-shaped ones still raise).
        interpolation: "bilinear" (the reference) or "bicubic" (PyTorch/HF) for
            resampling position embeddings.
        source_grid: (rows, cols) of the checkpoint's position grid, for
            tables that are not square.

    Returns:
        The `Checkpoint` that was loaded.
    """
    if not isinstance(checkpoint, Checkpoint):
        from keras_vit.checkpoints import open_weights

        opened = open_weights(checkpoint)
        if opened is None:
            model.load_weights(checkpoint)
            return None
        checkpoint = opened
    targets, info = model_targets(model)
    params = dict(checkpoint.params)
    problems, extras, assignments = [], [], []
    forms = {block.gelu for block in _vit(model).blocks}
    if forms and forms != {checkpoint.gelu}:
        _warn(f"{checkpoint.path} was trained with the {checkpoint.gelu!r} GELU but the model "
              f"uses {sorted(forms)}: outputs will differ slightly; build it with "
              f"gelu={checkpoint.gelu!r} (or leave gelu unset with weights=).")

    # pre_logits in the file but not in the model: the reference's drop-head fine-tuning
    # (vit_jax drops the layer when representation_size is None). The file's head was
    # trained on pre_logits' outputs, so it cannot be kept either.
    dropped_pre_logits = "pre_logits/kernel" in params and "pre_logits/kernel" not in targets
    if dropped_pre_logits:
        params.pop("pre_logits/kernel"), params.pop("pre_logits/bias", None)
        _warn(f"{checkpoint.path} has a pre_logits layer that the model lacks: it is dropped, "
              "as the reference's fine-tuning does (build with representation_size=N, or leave "
              "it unset with weights=, to keep it).")

    # Heads (the class token's, and DeiT's distillation head): kept if they fit, else fresh
    # zeros for the new classes.
    for head in ("head", "head_dist"):
        head_kernel = params.get(f"{head}/kernel")
        if f"{head}/kernel" in targets:
            kernel_var, kernel_shape = targets[f"{head}/kernel"]
            if head_kernel is not None and dropped_pre_logits:
                _warn(f"The checkpoint's {head} reads pre_logits, which is dropped: the model's "
                      f"{kernel_shape[-1]}-class {head} starts from zeros (fine-tune it).")
                params.pop(f"{head}/kernel"), params.pop(f"{head}/bias", None)
                _zero_head(targets, assignments, head)
            elif head_kernel is None:
                _warn(f"{checkpoint.path} has no {'classification head' if head == 'head' else head}"
                      f": the model's {kernel_shape[-1]}-class {head} starts from zeros.")
                _zero_head(targets, assignments, head)
            elif (head_kernel.array.ndim == 2 and head_kernel.array.shape[0] == kernel_shape[0]
                  and head_kernel.array.shape[1] != kernel_shape[1]):
                _warn(f"The checkpoint's {head} has {head_kernel.array.shape[1]} classes and the "
                      f"model {kernel_shape[1]}: the {head} is initialised to zeros (fine-tune "
                      "it).")
                params.pop(f"{head}/kernel"), params.pop(f"{head}/bias", None)
                _zero_head(targets, assignments, head)
        elif head_kernel is not None and not info["has_head"]:
            _warn(f"The checkpoint's {head_kernel.array.shape[-1]}-class {head} is not loaded: "
                  "the model was built with include_top=False.")
            params.pop(f"{head}/kernel"), params.pop(f"{head}/bias", None)

    table = _position_embeddings(checkpoint, params, info, interpolation, source_grid, problems)
    if table is not None:
        assignments.append((info["pos_embedding"], table))

    done = {id(v) for v, _ in assignments}
    for key, (variable, shape) in targets.items():
        if id(variable) in done:
            continue
        entry = params.pop(key, None)
        if entry is None:
            problems.append(f"missing: {checkpoint.source_name(key)!r}, the model expects {shape}"
                            + (f" (as {key})" if checkpoint.source_name(key) != key else ""))
            continue
        array = _fit(entry, shape)
        if array is None:
            problems.append(f"shape mismatch: {_describe(entry)}; the model expects {shape}"
                            + (f" for {key}" if entry.source_key != key else ""))
            continue
        assignments.append((variable, array.reshape(tuple(variable.shape))))
    for key, entry in params.items():
        hint = ""
        if key.startswith("MAPHead"):
            hint = " (MAP-head pooling is not supported)"
        elif key == "cls":
            hint = " (the model has no class token: build it with pooling='token')"
        elif key in ("dist", "head_dist/kernel", "head_dist/bias"):
            hint = (" (a distilled DeiT checkpoint: build a DeiT variant, e.g. 'DeiT-S/16', "
                    "or leave distilled unset with weights=)")
        extras.append(f"extra: {entry.source_key!r} {tuple(entry.source_shape)} is not in the "
                      f"model{hint}")

    shape_problems = [p for p in problems if not p.startswith("missing")]
    missing = [p for p in problems if p.startswith("missing")]
    if shape_problems or (strict and (missing or extras)):
        listed = shape_problems + (missing + extras if strict else [])
        more = f"\n  ... and {len(listed) - 25} more" if len(listed) > 25 else ""
        blocks = len(model.blocks)
        depth = (f"\nThe checkpoint has {checkpoint.depth} encoder blocks and the model "
                 f"{blocks}: build it with depth={checkpoint.depth} (keras-vit train: --depth "
                 f"{checkpoint.depth})."
                 if checkpoint.depth and checkpoint.depth != blocks and not shape_problems
                 else "")
        raise CheckpointError(
            f"Checkpoint {checkpoint.path} ({checkpoint.layout} layout) does not fit model "
            f"{model.name!r}:\n  " + "\n  ".join(listed[:25]) + more + depth +
            ("\nCheck the variant, depth, image size and pooling" +
             ("; strict=False skips missing and extra keys (never mis-shaped ones)."
              if strict and (missing or extras) and not shape_problems else ".")))
    if missing or extras:
        _warn("Not loaded (strict=False):\n  " + "\n  ".join(missing + extras))
    for variable, value in assignments:
        variable.assign(np.asarray(value).astype(variable.dtype))
    return checkpoint


def _zero_head(targets, assignments, head="head"):
    for key in (f"{head}/kernel", f"{head}/bias"):
        variable, _ = targets.pop(key)
        assignments.append((variable, np.zeros(tuple(variable.shape), np.float32)))


def save_npz(model, path):
    """Writes a `build` model's weights as an original vit_jax `.npz` checkpoint.

    The file has the key layout of the published checkpoints (see
    `keras_vit.checkpoints`), so it loads back with `build(..., weights=path)`
    and into the JAX reference code. A grid that is not square (e.g. 224x320 images) is
    recorded under `POSEMB_GRID`, which the reference ignores, so a 2x8 table is not
    read back as 4x4. Returns the path written (`.npz` added if missing, as numpy does).
    """
    targets, info = model_targets(model)
    arrays = {key: keras.ops.convert_to_numpy(variable).reshape(shape)
              for key, (variable, shape) in targets.items()}
    arrays[POSEMB] = keras.ops.convert_to_numpy(info["pos_embedding"])
    if info["grid"][0] != info["grid"][1]:
        arrays[POSEMB_GRID] = np.asarray(info["grid"], np.int64)
    if isinstance(path, (str, os.PathLike)):
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"  # numpy adds it anyway: return the name of the file written
    np.savez(path, **arrays)
    return path
