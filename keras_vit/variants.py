"""The ViT variant table: "B/16" -> width, depth, heads, MLP size and patch size.

One small table, decoded in one place (as big_vision does), so every part of
the library agrees on what "S/16" means.
"""

import dataclasses
import numbers

# name: (width D, depth L, heads, MLP size). From the paper's Table 1 plus the
# Ti and S sizes of DeiT / AugReg.
SIZES = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
PATCH_SIZES = (8, 14, 16, 32)

# Hybrids of the paper and AugReg (vit_jax/configs/models.py): a ResNetV2 stem
# (stage depths; () is the root block alone, stride 4) replaces the patch cut,
# then the transformer of `size` embeds `patch` x `patch` cells of the stem's
# feature map. The number after "/" is the effective patch size (total stride);
# "R+Ti/16" keeps the reference's name although root + 8x8 cells is stride 32.
# `patch_size=` changes the cells (R+Ti/16 with 1x1 cells is stride 4: the digits default).
_HYBRIDS = {
    # name: (transformer size, ResNet stage depths, patch size on the stem output)
    "R+Ti/16": ("Ti", (), 8),
    "R26+S/32": ("S", (2, 2, 2, 2), 1),
    "R26+B/32": ("B", (2, 2, 2, 2), 1),
    "R50+B/16": ("B", (3, 4, 9), 1),
    "R50+L/32": ("L", (3, 4, 6, 3), 1),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A ViT size: "B/16" is width 768, depth 12, 12 heads, MLP 3072, 16x16 patches."""

    name: str
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    # Hybrids only: ResNetV2 stage depths (None: plain ViT; (): root block only)
    # and the stem's base width; `patch_size` then applies to the stem's output.
    resnet: tuple = None
    resnet_width: int = 64
    # DeiT ("DeiT-S/16"): a distillation token and head beside the class token's (Touvron et
    # al. 2021), the exact GELU and ImageNet's mean/std normalisation, as its checkpoints.
    distilled: bool = False

    def to_config(self):
        """The fields as JSON-friendly values (`parse_variant` takes them back)."""
        fields = dataclasses.asdict(self)
        if self.resnet is not None:
            fields["resnet"] = list(self.resnet)
        return fields

    @property
    def is_hybrid(self):
        return self.resnet is not None

    @property
    def stride(self):
        """Pixels per token side: the patch size, times the stem's stride for hybrids."""
        if self.resnet is None:
            return self.patch_size
        return self.patch_size * 4 * 2 ** max(len(self.resnet) - 1, 0)

    @property
    def stem_channels(self):
        """Channels of the hybrid stem's output (None for a plain ViT)."""
        if self.resnet is None:
            return None
        if not self.resnet:
            return self.resnet_width
        return self.resnet_width * 4 * 2 ** (len(self.resnet) - 1)


# DeiT's sizes (Touvron et al. 2021): the paper's Ti, S and B with a distillation token.
DEIT_SIZES = ("Ti", "S", "B")
DEIT_PREFIX = "DeiT-"


def variant_names():
    """Every variant string `build` accepts, e.g. "Ti/16", "B/32", "H/14", "R50+B/16",
    "DeiT-S/16"."""
    return ([f"{size}/{patch}" for size in SIZES for patch in PATCH_SIZES] + list(_HYBRIDS)
            + [f"{DEIT_PREFIX}{size}/16" for size in DEIT_SIZES])


def parse_variant(variant, patch_size=None):
    """Decodes "B/16" (or "B" with `patch_size`) into a `Variant`.

    Also takes the hybrid names ("R50+B/16", "R26+S/32", ...), a `Variant` itself (a custom
    size, e.g. a tiny one for tests) and the dict of a `Variant`'s fields that a saved model's
    config holds.

    Raises:
        ValueError: the name is not one of `variant_names()`.
    """
    if isinstance(variant, dict):
        fields = dict(variant)
        if fields.get("resnet") is not None:
            fields["resnet"] = tuple(int(d) for d in fields["resnet"])
        variant = Variant(**fields)
    if isinstance(variant, Variant):
        if patch_size is None:
            return variant
        return dataclasses.replace(variant, patch_size=int(patch_size))
    if isinstance(variant, str) and variant.strip() in _HYBRIDS:
        name = variant.strip()
        size, resnet, cell = _HYBRIDS[name]
        if patch_size is not None:  # cells of the stem's output (1 = every position a token)
            cell = _positive(patch_size)
        return Variant(name, *SIZES[size], cell, resnet=resnet)
    if not isinstance(variant, str):
        raise TypeError(f"variant must be a string such as 'B/16', got {variant!r}")
    if variant.strip().startswith(DEIT_PREFIX):
        base = parse_variant(variant.strip()[len(DEIT_PREFIX):], patch_size)
        if base.name.split("/")[0] not in DEIT_SIZES:
            raise ValueError(f"Unknown DeiT variant {variant!r}: DeiT comes in "
                             f"{', '.join(DEIT_PREFIX + s + '/16' for s in DEIT_SIZES)} (any "
                             "patch size).")
        return dataclasses.replace(base, name=DEIT_PREFIX + base.name, distilled=True)
    size, _, patch = variant.strip().partition("/")
    if size not in SIZES or (patch and not patch.isdigit()):
        raise ValueError(
            f"Unknown ViT variant {variant!r}. Valid variants: "
            f"{', '.join(variant_names())} (any size also takes patch_size=...)."
        )
    if patch_size is None:
        if not patch:
            raise ValueError(
                f"Variant {variant!r} has no patch size: write e.g. '{size}/16' "
                "or pass patch_size=16."
            )
        patch_size = int(patch)
    patch_size = _positive(patch_size)
    width, depth, heads, mlp = SIZES[size]
    return Variant(f"{size}/{patch_size}", width, depth, heads, mlp, patch_size)


def _positive(patch_size):
    if not isinstance(patch_size, numbers.Integral) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
    return int(patch_size)


def image_hw(image_size):
    """(height, width) from an int or a pair; a side may be None (then `patch_grid` says
    it must be known). Anything else raises a ValueError saying what is accepted."""
    sides = (image_size, image_size) if isinstance(image_size, numbers.Integral) else image_size
    if (not isinstance(sides, (tuple, list)) or len(sides) != 2 or not all(
            side is None or (isinstance(side, numbers.Integral) and side >= 1)
            for side in sides)):
        raise ValueError(f"image_size must be a positive int or (height, width) of positive "
                         f"ints, got {image_size!r}.")
    return tuple(None if side is None else int(side) for side in sides)


def count_parameters(variant, image_size=224, num_classes=1000, patch_size=None,
                     num_channels=3, class_token=True, representation_size=None,
                     distilled=None):
    """Parameter count of a ViT computed from its shapes, without building it.

    Matches `build(...).count_params()`; used for the variant table and to
    check the large variants cheaply. An image size the patch does not divide raises
    the ValueError `build` raises.
    """
    from keras_vit.layers.patches import patch_grid

    v = parse_variant(variant, patch_size)
    distilled = v.distilled if distilled is None else distilled
    rows, cols = patch_grid(*image_hw(image_size), v.stride)
    d, p = v.width, v.patch_size
    prefix = (1 if class_token else 0) + (1 if distilled else 0)
    tokens = rows * cols + prefix
    stem = 0
    if v.is_hybrid:
        stem = _resnet_stem_parameters(v.resnet, v.resnet_width, num_channels)
        num_channels = v.stem_channels
    embed = stem + p * p * num_channels * d + d + tokens * d + prefix * d
    block = 2 * 2 * d + 4 * (d * d + d) + (d * v.mlp_dim + v.mlp_dim) + (v.mlp_dim * d + d)
    features = d
    pre_logits = 0
    if representation_size:
        pre_logits = d * representation_size + representation_size
        features = representation_size
    head = features * num_classes + num_classes if num_classes else 0
    heads = 2 if distilled else 1  # DeiT: a distillation head beside the class token's
    return embed + v.depth * block + 2 * d + pre_logits + heads * head


def _resnet_stem_parameters(stage_depths, width, num_channels):
    """Weights of the hybrids' ResNetV2 stem: bias-free convolutions, GroupNorm scale + bias."""
    total = 7 * 7 * num_channels * width + 2 * width  # conv_root, gn_root
    in_ch = width
    for s, depth in enumerate(stage_depths):
        mid = width * 2 ** s
        out = 4 * mid
        for u in range(depth):
            total += in_ch * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * out + 2 * out
            if u == 0 and (in_ch != out or s > 0):  # conv_proj + gn_proj
                total += in_ch * out + 2 * out
            in_ch = out
    return total


def variants(image_size=224, num_classes=1000):
    """A list of dicts describing every variant: name, width, depth, heads, MLP, parameters
    (None where the patch size does not divide `image_size`)."""
    rows = []
    for name in variant_names():
        v = parse_variant(name)
        try:
            params = count_parameters(name, image_size, num_classes)
        except ValueError:  # the patch does not divide the size: that model cannot be built
            params = None
        rows.append({
            "name": v.name,
            "width": v.width,
            "depth": v.depth,
            "heads": v.num_heads,
            "mlp_dim": v.mlp_dim,
            "patch_size": v.patch_size,
            "params": params,
        })
    return rows
