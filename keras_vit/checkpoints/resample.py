"""Position-embedding resampling for a new resolution (the patch size stays).

"bilinear" is the reference's method (vit_jax/checkpoint.py and big_vision:
`scipy.ndimage.zoom(grid, zoom, order=1)`, i.e. linear interpolation with the
corner cells of the old and new grids aligned); "bicubic" is PyTorch's
`F.interpolate(mode="bicubic", align_corners=False)` (cubic convolution with
a = -0.75, half-pixel centres, edges clamped), which Hugging Face ViT's
`interpolate_pos_encoding` uses. Both are written in NumPy (float64 inside), so
the loader needs neither SciPy nor PyTorch; the tests check them against both.
"""

import math

import numpy as np

METHODS = ("bilinear", "bicubic")


def _linear_matrix(n_in, n_out):
    """(n_out, n_in) weights of scipy.ndimage.zoom(order=1) along one axis (grid_mode=False)."""
    coords = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    lo = np.clip(np.floor(coords).astype(np.int64), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = coords - lo
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix


def _cubic_matrix(n_in, n_out, a=-0.75):
    """(n_out, n_in) weights of torch bicubic interpolation, align_corners=False, along one axis."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5  # no clamping for cubic (as torch)
    base = np.floor(src)
    t = src - base

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for offset, w in zip((-1, 0, 1, 2), weights):
        idx = np.clip(base.astype(np.int64) + offset, 0, n_in - 1)
        np.add.at(matrix, (rows, idx), w)
    return matrix


def resample_grid(grid, new_hw, method="bilinear"):
    """Resamples a `(h, w, D)` grid of embeddings to `(new_h, new_w, D)`; returns float32."""
    if method not in METHODS:
        raise ValueError(f"interpolation must be one of {METHODS}, got {method!r}.")
    grid = np.asarray(grid, dtype=np.float64)
    (h, w), (nh, nw) = grid.shape[:2], (int(new_hw[0]), int(new_hw[1]))
    if (h, w) == (nh, nw):
        return grid.astype(np.float32)
    make = _linear_matrix if method == "bilinear" else _cubic_matrix
    out = np.einsum("ih,hwd,jw->ijd", make(h, nh), grid, make(w, nw))
    return out.astype(np.float32)


def square_grid(num_tokens):
    """(n, n) for a token count that is a perfect square, else None."""
    side = math.isqrt(int(num_tokens))
    return (side, side) if side * side == num_tokens else None


def resample_position_embeddings(posemb, new_grid, *, old_grid=None, num_prefix_tokens=1,
                                 method="bilinear"):
    """Resamples a ViT position-embedding table to a new patch grid.

    The first `num_prefix_tokens` entries (the class-token slot, 1 for the
    original checkpoints; 0 for GAP / big_vision tables) are split off and kept;
    the rest is reshaped to its `(h, w)` grid, resampled to `new_grid`, flattened
    and concatenated back.

    Args:
        posemb: `(1, T, D)` or `(T, D)` array.
        new_grid: `(rows, cols)` patch grid of the new resolution (may be non-square).
        old_grid: `(rows, cols)` of the table; inferred for square grids.
        num_prefix_tokens: int, leading entries that are not on the grid.
        method: "bilinear" (reference) or "bicubic" (PyTorch / Hugging Face).

    Returns:
        float32 array of the same rank, `(1, prefix + rows * cols, D)`.
    """
    posemb = np.asarray(posemb)
    squeeze = posemb.ndim == 2
    table = posemb if squeeze else posemb[0]
    prefix, cells = table[:num_prefix_tokens], table[num_prefix_tokens:]
    if old_grid is None:
        old_grid = square_grid(len(cells))
        if old_grid is None:
            raise ValueError(
                f"The position table has {len(cells)} grid entries, not a square grid; "
                "pass old_grid=(rows, cols) (source_grid= when loading).")
    old_grid = (int(old_grid[0]), int(old_grid[1]))
    if old_grid[0] * old_grid[1] != len(cells):
        raise ValueError(f"old_grid {old_grid} does not hold the table's {len(cells)} entries.")
    grid = resample_grid(cells.reshape(old_grid[0], old_grid[1], -1), new_grid, method)
    out = np.concatenate([prefix.astype(np.float32), grid.reshape(-1, grid.shape[-1])], axis=0)
    return out if squeeze else out[None]


def posemb_sincos_2d(rows, cols, width, temperature=10_000.0):
    """big_vision's fixed 2D sin-cos position embeddings `(1, rows * cols, width)` (MoCo v3)."""
    if width % 4:
        raise ValueError(f"sincos2d position embeddings need a width divisible by 4, got {width}.")
    y, x = np.mgrid[:rows, :cols]
    omega = np.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / temperature ** omega
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return pe[None].astype(np.float32)
