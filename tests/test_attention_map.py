"""Attention rollout maps: against a rollout of Hugging Face ViT's own attention weights,
on GAP and hybrid models, the overlay PNG, the command and the script."""

import importlib
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from keras_vit.variants import Variant
from tests import processes
from tests.conftest import randomize_weights
from tests.test_checkpoints import (CLASSES, TINY, hf_to_vit_jax, hf_vit, images, state)
from tests.test_hybrid import TINY_HYBRID

torch = pytest.importorskip("torch")
command = importlib.import_module("keras_vit.attention_rollout")  # the module (the package
# attribute keras_vit.attention_map is the function)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_rollout(attentions):
    """Rollout as vit-explain writes it in PyTorch: fuse heads by mean, (A + I) / 2, renormalise."""
    result = torch.eye(attentions[0].shape[-1]).expand(attentions[0].shape[0], -1, -1)
    for a in attentions:
        fused = a.mean(dim=1)
        fused = (fused + torch.eye(fused.shape[-1])) / 2
        fused = fused / fused.sum(dim=-1, keepdim=True)
        result = torch.matmul(fused, result)
    return result


def upsample_and_scale(grid, size):
    heat = keras.ops.convert_to_numpy(keras.ops.image.resize(
        grid[..., None].astype(np.float32), size, interpolation="bilinear"))[..., 0]
    heat = heat - heat.min(axis=(1, 2), keepdims=True)
    return heat / heat.max(axis=(1, 2), keepdims=True)


def test_rollout_matches_one_computed_from_hugging_face_attentions(tmp_path):
    peer = hf_vit(seed=4)
    np.savez(tmp_path / "vit.npz", **hf_to_vit_jax(state(peer)))
    model = keras_vit.build(TINY, num_classes=CLASSES, weights=str(tmp_path / "vit.npz"))
    x = images(224)
    with torch.no_grad():
        attentions = peer(torch.from_numpy(x).permute(0, 3, 1, 2),
                          output_attentions=True).attentions
    assert len(attentions) == 2
    expected_rollout = torch_rollout(attentions).numpy()
    ours_weights = keras_vit.feature_model(model)(x)["attention_weights"]
    rollout = command.attention_rollout([keras.ops.convert_to_numpy(w) for w in ours_weights])
    np.testing.assert_allclose(rollout, expected_rollout, atol=1e-5)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-6)  # rows stay distributions

    heat = keras_vit.attention_map(model, x, preprocess=False)
    expected = upsample_and_scale(expected_rollout[:, 0, 1:].reshape(2, 14, 14), (224, 224))
    assert heat.shape == (2, 224, 224) and heat.dtype == np.float32
    np.testing.assert_allclose(heat, expected, atol=1e-4)
    assert heat.min() == 0.0 and heat.max() == pytest.approx(1.0)
    # One image in [0, 255] at another size: same map, resized to that size.
    single = keras_vit.attention_map(model, (x[0] + 1) * 127.5)
    np.testing.assert_allclose(single, heat[0], atol=1e-4)
    assert np.std(heat[0]) > 0.05  # not a flat map: the test could fail


def test_gap_and_hybrid_models_and_other_image_sizes():
    gap = randomize_weights(keras_vit.build(Variant("g", 32, 2, 4, 64, 8), image_size=32,
                                            num_classes=3, pooling="gap"), scale=0.3)
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3)).astype(np.uint8)
    heat = keras_vit.attention_map(gap, image)
    assert heat.shape == (48, 40)
    resized = keras.ops.image.resize(image[None].astype(np.float32), (32, 32),
                                     interpolation="bilinear", antialias=True)
    weights = keras_vit.feature_model(gap)(keras_vit.preprocess(resized))["attention_weights"]
    rollout = command.attention_rollout([keras.ops.convert_to_numpy(w) for w in weights])
    expected = upsample_and_scale(rollout.mean(axis=1).reshape(1, 4, 4), (48, 40))[0]
    np.testing.assert_allclose(heat, expected, atol=1e-4)  # GAP: the mean of all rows

    hybrid = randomize_weights(keras_vit.build(TINY_HYBRID, image_size=64, num_classes=3),
                               scale=0.2)
    heat = keras_vit.attention_map(hybrid, np.zeros((2, 64, 64, 3), np.uint8))
    assert heat.shape == (2, 64, 64) and np.all((heat >= 0) & (heat <= 1))


@pytest.mark.slow
def test_overlay_sheet_command_and_script(tmp_path, capsys):
    from matplotlib import colormaps

    from keras_vit.run_dir import save_run

    model = randomize_weights(keras_vit.build(Variant("s", 32, 1, 4, 64, 8), image_size=32,
                                              num_classes=3), scale=0.3)
    model.save(tmp_path / "m.keras")
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3)).astype(np.uint8)
    image_path = tmp_path / "photo.png"
    tf.io.write_file(str(image_path), tf.io.encode_png(image))

    heat = keras_vit.attention_map(model, image)
    # The overlay: the image where alpha is 0, the perceptually uniform map where it is 1.
    np.testing.assert_array_equal(command.overlay(image, heat, alpha=0.0), image)
    magma = np.round(255 * colormaps["magma"](heat)[..., :3]).astype(np.uint8)
    assert np.abs(command.overlay(image, heat, alpha=1.0).astype(int) - magma).max() <= 1
    with pytest.raises(ValueError, match="does not match the image"):
        command.overlay(image, heat[:10])
    # A sheet: one row per image (image + overlay with its colour bar), titled.
    one = keras_vit.save_attention_figure(image, heat, tmp_path / "one.png", labels="cat 90%",
                                          grid=model.grid)
    two = keras_vit.save_attention_figure([image, image], [heat, heat], tmp_path / "two.png",
                                          labels=["a", "b"])
    one, two = (tf.io.decode_png(tf.io.read_file(p)).numpy() for p in (one, two))
    assert one.shape[1] == two.shape[1] and 1.8 < two.shape[0] / one.shape[0] < 2.2

    from keras_vit.cli import main
    # What predict takes: a .keras file and a run folder (with its class names).
    save_run(tmp_path / "run", model, {"class_names": ["cat", "dog", "bird"],
                                       "image_size": [32, 32]}, {})
    for model_arg in (tmp_path / "m.keras", tmp_path / "run"):
        assert main(["attention-map", str(image_path), str(image_path), "--model",
                     str(model_arg), "--out", str(tmp_path / "cli.png")]) == 0
        sheet = tf.io.decode_png(tf.io.read_file(str(tmp_path / "cli.png"))).numpy()
        assert sheet.shape[0] > 1.8 * one.shape[0]  # two images, one sheet
    assert main(["attention-map", str(image_path)]) == 2  # no weights: refused, not random
    # A missing or damaged image, a missing model: one line naming it, no traceback.
    (tmp_path / "cut.png").write_bytes(image_path.read_bytes()[:60])
    for image_arg, model_arg, named in (
            (tmp_path / "nothere.png", tmp_path / "m.keras", "nothere.png"),
            (tmp_path / "cut.png", tmp_path / "m.keras", "cut.png: damaged or truncated PNG"),
            (image_path, tmp_path / "missing.keras", "missing.keras")):
        capsys.readouterr()
        assert main(["attention-map", str(image_arg), "--model", str(model_arg)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("keras-vit attention-map: error:") and named in err
        assert "Traceback" not in err

    result = processes.run(
        [sys.executable, os.path.join(ROOT, "scripts", "attention_map.py"), str(image_path),
         "--model", str(tmp_path / "m.keras")], timeout=300,
        env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert result.returncode == 0, result.stderr[-2000:]
    written = str(tmp_path / "photo_attention.png")
    assert result.stdout.strip().endswith(written) and os.path.exists(written)
