"""Hybrid ResNetV2 + ViT ("R50+B/16", "R26+S/32", "R+Ti/16"): reference parameter counts,
the reference's weight standardisation and GroupNorm, and logits against Hugging Face BiT
(the backbone of its ViT-hybrid) feeding Hugging Face ViT, loaded from each layout."""

import re

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit.checkpoints import CheckpointError, read_checkpoint
from keras_vit.layers.resnet import ResNetStem, StdConv2D, standardize_kernel
from keras_vit.variants import Variant
from tests.conftest import randomize_weights
from tests.test_checkpoints import TOL, hf_to_vit_jax, hf_vit, images, ours, state

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# vit_jax/models_test.py MODEL_SIZES (1000 classes, 224x224).
REFERENCE_PARAMS = {"R+Ti/16": 6_337_704, "R26+S/32": 36_431_912, "R26+B/32": 101_383_976,
                    "R50+B/16": 98_659_112, "R50+L/32": 328_994_856}
WIDTH, DEPTHS = 32, (1, 1)  # a tiny two-stage stem: 128 then 256 channels, stride 8
TINY_HYBRID = Variant("tiny-hybrid", 32, 2, 4, 64, 1, resnet=DEPTHS, resnet_width=WIDTH)


def bit_peer(width, depths, seed=0):
    """Hugging Face BiT as the ViT hybrids configure it, random weights.

    Kernels are drawn already standardised (zero mean, unit std per output
    channel): the reference divides by (std + 1e-5) and BiT by sqrt(var + 1e-8),
    which then differ by one factor per convolution that the GroupNorm after it
    cancels, so the comparison tests the architecture and the layouts. BiT's
    GroupNorm epsilon is set to the reference's (Flax) 1e-6.
    """
    config = transformers.BitConfig(
        num_channels=3, embedding_size=width, depths=list(depths),
        hidden_sizes=[4 * width * 2 ** i for i in range(len(depths))] or [width],
        layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True,
        num_groups=32)
    model = transformers.BitModel(config).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.eps = 1e-6
        for name, p in model.named_parameters():
            if p.ndim == 4:
                w = rng.standard_normal(p.shape)
                w = (w - w.mean(axis=(1, 2, 3), keepdims=True)) / w.std(axis=(1, 2, 3),
                                                                          keepdims=True)
            elif name.endswith("weight"):
                w = 1 + 0.2 * rng.standard_normal(p.shape)
            else:
                w = 0.2 * rng.standard_normal(p.shape)
            p.copy_(torch.from_numpy(w.astype(np.float32)))
    return model


def bit_features(bit, x):
    with torch.no_grad():
        return bit(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state


def bit_to_vit_jax(sd):
    """BiT names -> the hybrid npz keys (timm `_load_weights` for hybrids, inverted)."""
    out = {"conv_root/kernel": sd["embedder.convolution.weight"].transpose(2, 3, 1, 0),
           "gn_root/scale": sd["embedder.norm.weight"], "gn_root/bias": sd["embedder.norm.bias"]}
    for key, value in sd.items():
        m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m:
            continue
        unit, part = f"block{int(m[1]) + 1}/unit{int(m[2]) + 1}", m[3]
        if part.startswith("conv") or part == "downsample.conv":
            name = "conv_proj" if part == "downsample.conv" else part
            out[f"{unit}/{name}/kernel"] = value.transpose(2, 3, 1, 0)
        else:
            name = "gn_proj" if part == "downsample.norm" else "gn" + part[-1]
            # Older Flax files store GroupNorm parameters as (1, 1, 1, C): the reader squeezes.
            out[f"{unit}/{name}/{'scale' if m[4] == 'weight' else 'bias'}"] = value.reshape(
                1, 1, 1, -1)
    return out


def bit_to_timm(sd, stem_only):
    """BiT names -> timm's hybrid backbone names (ResNetV2, or the bare stem for R+Ti)."""
    stem = "patch_embed.backbone." + ("" if stem_only else "stem.")
    out = {stem + "conv.weight": sd["embedder.convolution.weight"],
           stem + "norm.weight": sd["embedder.norm.weight"],
           stem + "norm.bias": sd["embedder.norm.bias"]}
    for key, value in sd.items():
        m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", key)
        if m:
            out[f"patch_embed.backbone.stages.{m[1]}.blocks.{m[2]}.{m[3]}"] = value
    return out


@pytest.fixture(scope="module")
def tiny_peers():
    bit = bit_peer(WIDTH, DEPTHS)
    x = images(64)
    feats = bit_features(bit, x)
    vit_tanh = hf_vit(num_channels=feats.shape[1], patch_size=1, image_size=feats.shape[2])
    vit_erf = hf_vit(num_channels=feats.shape[1], patch_size=1, image_size=feats.shape[2],
                     gelu="erf", seed=5)
    return bit, vit_tanh, vit_erf, x, feats


def test_parameter_counts_match_the_reference():
    for name, params in REFERENCE_PARAMS.items():
        assert keras_vit.count_parameters(name) == params, name
        assert name in keras_vit.variant_names()
    model = keras_vit.build(TINY_HYBRID, image_size=64, num_classes=3)
    assert model.count_params() == keras_vit.count_parameters(TINY_HYBRID, 64, 3)
    assert keras_vit.parse_variant("R50+B/16").stride == 16
    assert keras_vit.parse_variant("R26+S/32").stem_channels == 2048


def test_std_conv_and_group_norm_follow_the_reference_formulas():
    rng = np.random.default_rng(0)
    kernel = rng.normal(0.3, 2.0, (3, 3, 4, 8)).astype(np.float32)
    # vit_jax models_resnet.weight_standardize: (w - mean) / (std + 1e-5), axes (0, 1, 2).
    expected = (kernel - kernel.mean((0, 1, 2))) / (kernel.std((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(standardize_kernel(kernel)), expected,
                               atol=1e-6)
    conv = StdConv2D(8, 3, strides=2)
    x = rng.normal(size=(1, 9, 9, 4)).astype(np.float32)
    conv.build(x.shape)
    conv.kernel.assign(kernel)
    plain = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)
    plain.build(x.shape)
    plain.kernel.assign(expected)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(conv(x)),
                               keras.ops.convert_to_numpy(plain(x)), atol=1e-5)
    assert keras.ops.convert_to_numpy(conv(x)).shape == (1, 5, 5, 8)  # TF "SAME"


def test_tiny_hybrid_npz_matches_hugging_face_bit_and_vit(tiny_peers, tmp_path):
    bit, vit, _, x, feats = tiny_peers
    arrays = {**hf_to_vit_jax(state(vit)), **bit_to_vit_jax(state(bit))}
    np.savez(tmp_path / "hybrid.npz", **arrays)
    model = keras_vit.build(TINY_HYBRID, image_size=64, num_classes=5,
                            weights=str(tmp_path / "hybrid.npz"))
    stem = model.get_layer("patches")
    assert isinstance(stem, ResNetStem) and stem.grid == (8, 8)
    np.testing.assert_allclose(  # the stem's token sequence is BiT's feature map, flattened
        ours(stem, x), feats.flatten(2).transpose(1, 2).numpy(), atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        expected = vit(feats).logits.numpy()
    assert np.abs(expected).max() > 0.3
    np.testing.assert_allclose(ours(model, x), expected, atol=TOL, rtol=0)


def test_tiny_hybrid_pytorch_layouts_match(tiny_peers, tmp_path):
    bit, _, vit, x, feats = tiny_peers
    with torch.no_grad():
        expected = vit(feats).logits.numpy()
    bit_sd, vit_sd = bit.state_dict(), vit.state_dict()
    # Hugging Face ViT-hybrid (transformers 4): BiT under embeddings.patch_embeddings.backbone.
    hf = {**vit_sd, **{f"vit.embeddings.patch_embeddings.backbone.bit.{k}": v
                       for k, v in bit_sd.items()}}
    safetensors_torch.save_file({k: v.contiguous() for k, v in hf.items()},
                                tmp_path / "hf.safetensors")
    from tests.test_checkpoints_torch import hf_to_timm
    timm = {**hf_to_timm({k: v.numpy() for k, v in vit_sd.items()}),
            **{k: v.numpy() for k, v in bit_to_timm(bit_sd, stem_only=False).items()}}
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in timm.items()},
               tmp_path / "timm.pth")
    for name, layout in (("hf.safetensors", "hf"), ("timm.pth", "timm")):
        assert read_checkpoint(tmp_path / name).layout == layout
        model = keras_vit.build(TINY_HYBRID, image_size=64, num_classes=5,
                                weights=str(tmp_path / name))
        np.testing.assert_allclose(ours(model, x), expected, atol=TOL, rtol=0)


def test_r_ti16_root_only_hybrid_matches_at_224(tmp_path):
    """R+Ti/16: the root block alone (stride 4), then 8x8 cells: a 7x7 grid at 224."""
    bit = bit_peer(64, ())
    x = images(224, n=1)
    feats = bit_features(bit, x)
    assert tuple(feats.shape) == (1, 64, 56, 56)
    vit = hf_vit(width=192, depth=12, heads=3, mlp=768, num_channels=64, patch_size=8,
                 image_size=56, num_labels=1000, seed=2, scale=0.05)  # logits of O(1) at 192 wide
    arrays = {**hf_to_vit_jax(state(vit), depth=12, heads=3), **bit_to_vit_jax(state(bit))}
    np.savez(tmp_path / "R_Ti_16.npz", **arrays)
    model = keras_vit.build("R+Ti/16", weights=str(tmp_path / "R_Ti_16.npz"))
    assert model.count_params() == REFERENCE_PARAMS["R+Ti/16"]
    assert model.get_layer("patch_encoder").pos_embedding.shape == (1, 50, 192)
    with torch.no_grad():
        expected = vit(feats).logits.numpy()
    np.testing.assert_allclose(ours(model, x), expected, atol=TOL, rtol=0)


def test_hybrid_saves_loads_and_exposes_features(tmp_path):
    model = randomize_weights(keras_vit.build(TINY_HYBRID, image_size=64, num_classes=3),
                              scale=0.2)
    x = images(64)
    model.save(tmp_path / "hybrid.keras")
    again = keras.saving.load_model(tmp_path / "hybrid.keras")
    np.testing.assert_allclose(ours(again, x), ours(model, x), atol=1e-6)
    features = keras_vit.feature_model(model)(x)
    assert len(features["attention_weights"]) == 2
    assert features["attention_weights"][0].shape == (2, 4, 65, 65)
    stem = model.get_layer("patches")
    assert ResNetStem.from_config(stem.get_config()).get_config() == stem.get_config()


def test_hybrid_cells_can_change_and_the_model_trains_under_its_name():
    # patch_size picks the cells on the stem's output: R+Ti/16's root has stride 4, so 1x1
    # cells of a 16x16 image give 16 tokens (the embedded digits default).
    model = keras_vit.build("R+Ti/16", image_size=16, patch_size=1, depth=1, num_classes=3)
    assert model.get_layer("patch_encoder").output.shape == (None, 17, 192)
    # TensorFlow name scopes reject "+" and "/": fit opens one named after the model.
    assert model.name == "vit_r_ti16"
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    history = model.fit(np.zeros((2, 16, 16, 3), "float32"), np.array([0, 1]), verbose=0)
    assert np.isfinite(history.history["loss"][0])
    with pytest.raises(ValueError, match="positive integer"):
        keras_vit.build("R50+B/16", patch_size=0)


def test_hybrid_name_and_size_errors():
    with pytest.raises(ValueError, match="not divisible by the patch size 32"):
        keras_vit.build("R26+S/32", image_size=200)
    checkpoint_like = keras_vit.build(TINY_HYBRID, image_size=64, num_classes=3)
    plain = keras_vit.build(Variant("p", 32, 2, 4, 64, 8), image_size=64, num_classes=3)
    from keras_vit.checkpoints import save_npz
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        save_npz(checkpoint_like, f"{folder}/h.npz")
        with pytest.raises(CheckpointError, match=r"extra: 'conv_root/kernel' \(7, 7, 3, 32\)"):
            keras_vit.checkpoints.load_checkpoint(plain, f"{folder}/h.npz")


def test_hybrid_runs_under_mixed_precision():
    reference = randomize_weights(keras_vit.build(TINY_HYBRID, image_size=64, num_classes=3),
                                  scale=0.2)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # conftest resets it
    model = keras_vit.build(TINY_HYBRID, image_size=64, num_classes=3)
    model.set_weights(reference.get_weights())
    assert all(w.dtype == "float32" for w in model.weights)
    x = images(64)
    logits = model(x)
    assert logits.dtype == "float32"
    np.testing.assert_allclose(ours(model, x), ours(reference, x), atol=2e-2)
