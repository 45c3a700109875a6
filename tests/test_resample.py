"""Position-embedding resampling against the reference (SciPy zoom) and PyTorch bicubic."""

import numpy as np
import pytest
import scipy.ndimage

from keras_vit.checkpoints import (posemb_sincos_2d, resample_grid,
                                   resample_position_embeddings)

torch = pytest.importorskip("torch")

GRIDS = [((14, 14), (24, 24)), ((24, 24), (14, 14)), ((7, 7), (12, 12)), ((14, 14), (12, 20)),
         ((3, 5), (7, 4)), ((14, 14), (1, 3)), ((2, 2), (2, 2))]


def reference_resample(posemb, new_grid, old_grid, prefix):
    """vit_jax/checkpoint.py load_pretrained (per-axis zoom so it takes non-square grids)."""
    tok, grid = posemb[:, :prefix], posemb[0, prefix:]
    grid = grid.reshape(old_grid[0], old_grid[1], -1)
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
    return np.concatenate([tok, grid.reshape(1, new_grid[0] * new_grid[1], -1)], axis=1)


@pytest.mark.parametrize("old,new", GRIDS)
@pytest.mark.parametrize("prefix", [0, 1])
def test_bilinear_equals_the_reference_scipy_zoom(old, new, prefix):
    rng = np.random.default_rng(sum(old) + sum(new))
    posemb = rng.normal(0, 0.5, (1, prefix + old[0] * old[1], 24)).astype(np.float32)
    expected = reference_resample(posemb, new, old, prefix)
    got = resample_position_embeddings(posemb, new, old_grid=old if old[0] != old[1] else None,
                                       num_prefix_tokens=prefix)
    assert got.shape == expected.shape == (1, prefix + new[0] * new[1], 24)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    if prefix:
        np.testing.assert_array_equal(got[:, 0], posemb[:, 0])  # class-token slot untouched


@pytest.mark.parametrize("old,new", GRIDS)
def test_bicubic_equals_torch_interpolate_bicubic(old, new):
    """Hugging Face ViT's interpolate_pos_encoding: F.interpolate(bicubic, align_corners=False)."""
    rng = np.random.default_rng(7)
    grid = rng.normal(0, 1, (old[0], old[1], 16))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=new, mode="bicubic",
        align_corners=False)[0].permute(1, 2, 0).numpy()  # float64: no float32 rounding
    got = resample_grid(grid, new, method="bicubic")
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    # Different from the reference's bilinear whenever the grid changes: the option matters.
    if old != new:
        assert np.abs(got - resample_grid(grid, new, method="bilinear")).max() > 1e-2


def test_two_dimensional_tables_and_errors():
    table = np.arange(17 * 2, dtype=np.float32).reshape(17, 2)
    out = resample_position_embeddings(table, (2, 2))
    assert out.shape == (5, 2)
    np.testing.assert_array_equal(out[0], table[0])
    with pytest.raises(ValueError, match="not a square grid"):
        resample_position_embeddings(np.zeros((1, 1 + 12, 4)), (4, 4))
    with pytest.raises(ValueError, match="does not hold"):
        resample_position_embeddings(np.zeros((1, 1 + 12, 4)), (4, 4), old_grid=(4, 4))
    with pytest.raises(ValueError, match="interpolation must be one of"):
        resample_grid(np.zeros((2, 2, 1)), (3, 3), method="nearest")


def test_sincos2d_matches_big_vision_formula_values():
    pe = posemb_sincos_2d(3, 4, 8)
    assert pe.shape == (1, 12, 8)
    # Cell (row 0, col 0): sin(0)=0, cos(0)=1 for both axes.
    np.testing.assert_allclose(pe[0, 0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
    # Cell (row 2, col 3), omega = [1, 1/10000]: x terms from col 3, y terms from row 2.
    omega = np.array([1.0, 1e-4])
    expected = np.concatenate([np.sin(3 * omega), np.cos(3 * omega),
                               np.sin(2 * omega), np.cos(2 * omega)])
    np.testing.assert_allclose(pe[0, 2 * 4 + 3], expected, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        posemb_sincos_2d(2, 2, 6)
