"""The ViT variant table: "B/16" -> width, depth, heads, MLP size and patch size.

One small table, decoded in one place (as big_vision does), so every part of
the library agrees on what "S/16" means.
"""

import dataclasses

# name: (width D, depth L, heads, MLP size). From the paper's Table 1 plus the
# Ti and S sizes of DeiT / AugReg.
_SIZES = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
PATCH_SIZES = (8, 14, 16, 32)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A ViT size: "B/16" is width 768, depth 12, 12 heads, MLP 3072, 16x16 patches."""

    name: str
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int


def variant_names():
    """Every variant string `build` accepts, e.g. "Ti/16", "B/32", "H/14"."""
    return [f"{size}/{patch}" for size in _SIZES for patch in PATCH_SIZES]


def parse_variant(variant, patch_size=None):
    """Decodes "B/16" (or "B" with `patch_size`) into a `Variant`.

    Raises:
        ValueError: the name is not one of `variant_names()`.
    """
    if not isinstance(variant, str):
        raise TypeError(f"variant must be a string such as 'B/16', got {variant!r}")
    size, _, patch = variant.strip().partition("/")
    if size not in _SIZES or (patch and not patch.isdigit()):
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
    patch_size = int(patch_size)
    if patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size}.")
    width, depth, heads, mlp = _SIZES[size]
    return Variant(f"{size}/{patch_size}", width, depth, heads, mlp, patch_size)


def count_parameters(variant, image_size=224, num_classes=1000, patch_size=None,
                     num_channels=3, class_token=True, representation_size=None):
    """Parameter count of a ViT computed from its shapes, without building it.

    Matches `build(...).count_params()`; used for the variant table and to
    check the large variants cheaply.
    """
    v = parse_variant(variant, patch_size)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    d, p = v.width, v.patch_size
    tokens = (h // p) * (w // p) + (1 if class_token else 0)
    embed = p * p * num_channels * d + d + tokens * d + (d if class_token else 0)
    block = 2 * 2 * d + 4 * (d * d + d) + (d * v.mlp_dim + v.mlp_dim) + (v.mlp_dim * d + d)
    features = d
    pre_logits = 0
    if representation_size:
        pre_logits = d * representation_size + representation_size
        features = representation_size
    head = features * num_classes + num_classes if num_classes else 0
    return embed + v.depth * block + 2 * d + pre_logits + head


def variants(image_size=224, num_classes=1000):
    """A list of dicts describing every variant: name, width, depth, heads, MLP, parameters."""
    rows = []
    for name in variant_names():
        v = parse_variant(name)
        rows.append({
            "name": v.name,
            "width": v.width,
            "depth": v.depth,
            "heads": v.num_heads,
            "mlp_dim": v.mlp_dim,
            "patch_size": v.patch_size,
            "params": count_parameters(name, image_size, num_classes),
        })
    return rows
