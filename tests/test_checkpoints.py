"""Original vit_jax / AugReg and big_vision `.npz` checkpoints, checked against Hugging Face ViT.

Random weights are drawn into a tiny Hugging Face `ViTForImageClassification`
(the peer, PyTorch), written out in the checkpoint layout with the mapping
timm's `_load_weights` documents for these files, loaded into keras-vit, and
the logits of both compared.
"""

import keras
import numpy as np
import pytest
import scipy.ndimage

import keras_vit
from keras_vit.checkpoints import (CheckpointError, CheckpointWarning, load_checkpoint,
                                   read_checkpoint, save_npz)
from keras_vit.variants import Variant
from tests.conftest import randomize_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

D, HEADS, DEPTH, MLP, PATCH, CLASSES = 32, 4, 2, 64, 16, 5
TINY = Variant("tiny", D, DEPTH, HEADS, MLP, PATCH)
TOL = 1e-5


def hf_vit(*, gelu="tanh", image_size=224, num_labels=CLASSES, model_class=None, seed=0,
           patch_size=PATCH, num_channels=3, width=D, depth=DEPTH, heads=HEADS, mlp=MLP,
           scale=0.1):
    """A tiny Hugging Face ViT with random weights of a useful size (not the tiny init)."""
    config = transformers.ViTConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=mlp, image_size=image_size, patch_size=patch_size,
        num_channels=num_channels, num_labels=num_labels, layer_norm_eps=1e-6,  # HF default 1e-12
        hidden_act="gelu_pytorch_tanh" if gelu == "tanh" else "gelu",
        attn_implementation="eager")
    model = (model_class or transformers.ViTForImageClassification)(config).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                value = 1 + 0.2 * rng.standard_normal(p.shape)
            elif "position" in name:
                value = 0.5 * rng.standard_normal(p.shape)
            else:
                value = scale * rng.standard_normal(p.shape)
            p.copy_(torch.from_numpy(value.astype(np.float32)))
    return model


def state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_to_vit_jax(sd, depth=DEPTH, heads=HEADS):
    """HF (transformers 5 names) -> original vit_jax `.npz` keys (timm `_load_weights` inverted)."""
    sd = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in sd.items()}
    w = sd["embeddings.patch_embeddings.projection.weight"]
    width = w.shape[0]
    out = {"embedding/kernel": w.transpose(2, 3, 1, 0),
           "embedding/bias": sd["embeddings.patch_embeddings.projection.bias"],
           "cls": sd["embeddings.cls_token"],
           "Transformer/posembed_input/pos_embedding": sd["embeddings.position_embeddings"],
           "Transformer/encoder_norm/scale": sd["layernorm.weight"],
           "Transformer/encoder_norm/bias": sd["layernorm.bias"]}
    hd = width // heads
    for i in range(depth):
        s, t = f"layers.{i}.", f"Transformer/encoderblock_{i}/"
        mha = t + "MultiHeadDotProductAttention_1/"
        out[t + "LayerNorm_0/scale"] = sd[s + "layernorm_before.weight"]
        out[t + "LayerNorm_0/bias"] = sd[s + "layernorm_before.bias"]
        out[t + "LayerNorm_2/scale"] = sd[s + "layernorm_after.weight"]
        out[t + "LayerNorm_2/bias"] = sd[s + "layernorm_after.bias"]
        for name, short in (("query", "q"), ("key", "k"), ("value", "v")):
            out[mha + f"{name}/kernel"] = sd[s + f"attention.{short}_proj.weight"].T.reshape(
                width, heads, hd)
            out[mha + f"{name}/bias"] = sd[s + f"attention.{short}_proj.bias"].reshape(heads, hd)
        out[mha + "out/kernel"] = sd[s + "attention.o_proj.weight"].T.reshape(heads, hd, width)
        out[mha + "out/bias"] = sd[s + "attention.o_proj.bias"]
        for d, fc in ((0, "fc1"), (1, "fc2")):
            out[t + f"MlpBlock_3/Dense_{d}/kernel"] = sd[s + f"mlp.{fc}.weight"].T
            out[t + f"MlpBlock_3/Dense_{d}/bias"] = sd[s + f"mlp.{fc}.bias"]
    if "pooler.dense.weight" in sd:
        out["pre_logits/kernel"] = sd["pooler.dense.weight"].T
        out["pre_logits/bias"] = sd["pooler.dense.bias"]
    if "classifier.weight" in sd:
        out["head/kernel"] = sd["classifier.weight"].T
        out["head/bias"] = sd["classifier.bias"]
    return out


def vit_jax_to_big_vision(arrays, *, scan, class_token, prefix="params/"):
    """Original keys -> big_vision keys: prefix, sub-module numbering, posemb, optional scan."""
    out = {}
    for key, value in arrays.items():
        if key == "Transformer/posembed_input/pos_embedding":
            out["pos_embedding"] = value[:, 1:] if "cls" in arrays else value
            continue
        if key == "cls" and not class_token:
            continue
        for old, new in (("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"),
                         ("LayerNorm_2", "LayerNorm_1"), ("MlpBlock_3", "MlpBlock_0")):
            key = key.replace(old, new)
        out[key] = value
    if scan:
        blocks = sorted({k.split("/")[1] for k in out if k.startswith("Transformer/encoderblock_")},
                        key=lambda b: int(b.split("_")[1]))
        rests = {k.split("/", 2)[2] for k in out if k.startswith("Transformer/encoderblock_0/")}
        for rest in rests:
            out[f"Transformer/encoderblock/{rest}"] = np.stack(
                [out.pop(f"Transformer/{b}/{rest}") for b in blocks])
    out = {prefix + k: v for k, v in out.items()}
    out["opt/state/mu/embedding/kernel"] = np.zeros(3)  # optimizer state: ignored
    return out


def hf_logits(model, images, **kwargs):
    with torch.no_grad():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2), **kwargs)
    return out.logits.numpy() if hasattr(out, "logits") else out


def ours(model, images):
    return keras.ops.convert_to_numpy(model(images))


def images(size, n=2, seed=1):
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).uniform(-1, 1, (n, h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def peer():
    return hf_vit()


@pytest.fixture(scope="module")
def npz_path(peer, tmp_path_factory):
    path = tmp_path_factory.mktemp("npz") / "vit.npz"
    np.savez(path, **hf_to_vit_jax(state(peer)))
    return str(path)


def test_original_npz_matches_hugging_face_at_224(peer, npz_path):
    model = keras_vit.build(TINY, num_classes=CLASSES, weights=npz_path)
    assert read_checkpoint(npz_path).layout == "vit_jax"
    assert model.get_layer("encoderblock_0").gelu == "tanh"  # taken from the JAX checkpoint
    x = images(224)
    expected, got = hf_logits(peer, x), ours(model, x)
    assert np.abs(expected).max() > 0.3 and np.abs(expected[0] - expected[1]).max() > 1e-2
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_resampled_to_384_matches_hugging_face_both_ways(peer, npz_path):
    x = images(384)
    # Bilinear (the reference): the peer gets the table resampled by vit_jax's own code.
    sd = state(peer)
    table = sd["vit.embeddings.position_embeddings"]
    grid = scipy.ndimage.zoom(table[0, 1:].reshape(14, 14, D), (24 / 14, 24 / 14, 1), order=1)
    sd["vit.embeddings.position_embeddings"] = np.concatenate(
        [table[:, :1], grid.reshape(1, -1, D)], axis=1)
    peer384 = hf_vit(image_size=384)
    peer384.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    bilinear = keras_vit.build(TINY, image_size=384, num_classes=CLASSES, weights=npz_path)
    expected_bilinear = hf_logits(peer384, x)
    np.testing.assert_allclose(ours(bilinear, x), expected_bilinear, atol=TOL, rtol=0)
    # Bicubic: Hugging Face's own interpolate_pos_encoding.
    bicubic = keras_vit.build(TINY, image_size=384, num_classes=CLASSES)
    load_checkpoint(bicubic, npz_path, interpolation="bicubic")
    expected_bicubic = hf_logits(peer, x, interpolate_pos_encoding=True)
    np.testing.assert_allclose(ours(bicubic, x), expected_bicubic, atol=TOL, rtol=0)
    # The two methods give different models: each comparison could have failed.
    assert np.abs(expected_bicubic - expected_bilinear).max() > 1e-3


def test_non_square_resolution_matches_hugging_face(peer, npz_path):
    x = images((224, 320))
    model = keras_vit.build(TINY, image_size=(224, 320), num_classes=CLASSES)
    load_checkpoint(model, npz_path, interpolation="bicubic")
    assert model.get_layer("patch_encoder").pos_embedding.shape == (1, 1 + 14 * 20, D)
    np.testing.assert_allclose(ours(model, x), hf_logits(peer, x, interpolate_pos_encoding=True),
                               atol=TOL, rtol=0)


def test_big_vision_gap_scan_checkpoint_matches_hugging_face_without_class_token(
        peer, tmp_path):
    """big_vision GAP: no class token; the peer masks its class token out of every attention."""
    arrays = vit_jax_to_big_vision(hf_to_vit_jax(state(peer)), scan=True, class_token=False)
    path = tmp_path / "bv_gap.npz"
    np.savez(path, **arrays)
    checkpoint = read_checkpoint(path)
    assert checkpoint.layout == "big_vision" and not checkpoint.class_token
    assert checkpoint.ignored == ["opt/state/mu/embedding/kernel"]
    model = keras_vit.build(TINY, num_classes=CLASSES, weights=str(path))
    assert model.get_layer("pool").mode == "gap"  # taken from the checkpoint
    x = images(224)
    sd = state(peer)
    sd["vit.embeddings.position_embeddings"][:, 0] = 0.0
    peer.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    mask = torch.ones(2, 197)
    mask[:, 0] = 0  # no token attends to the class token
    with torch.no_grad():
        hidden = peer.vit(torch.from_numpy(x).permute(0, 3, 1, 2),
                          attention_mask=mask).last_hidden_state
        expected = peer.classifier(hidden[:, 1:].mean(1)).numpy()
    np.testing.assert_allclose(ours(model, x), expected, atol=TOL, rtol=0)


def test_big_vision_token_checkpoint_has_no_class_slot_in_its_table(peer, tmp_path):
    """big_vision 'tok' pooling: position embeddings added before the class token is prepended."""
    arrays = hf_to_vit_jax(state(peer))
    arrays["Transformer/posembed_input/pos_embedding"][:, 0] = 0.0  # the peer's equivalent
    bv = vit_jax_to_big_vision(arrays, scan=False, class_token=True, prefix="params/img/")
    assert bv["params/img/pos_embedding"].shape == (1, 196, D)
    path = tmp_path / "bv_tok.npz"
    np.savez(path, **bv)
    model = keras_vit.build(TINY, num_classes=CLASSES, weights=str(path))
    sd = state(peer)
    sd["vit.embeddings.position_embeddings"][:, 0] = 0.0
    local = hf_vit()
    local.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    x = images(224)
    np.testing.assert_allclose(ours(model, x), hf_logits(local, x), atol=TOL, rtol=0)


def test_pre_logits_are_kept_and_match_the_hugging_face_pooler(tmp_path):
    """i21k files carry pre_logits (Dense + tanh); HF ViTModel's pooler is that layer."""
    base = hf_vit(model_class=transformers.ViTModel, seed=3)
    arrays = hf_to_vit_jax(state(base))
    arrays["head/kernel"] = np.random.default_rng(0).normal(size=(D, 7)).astype(np.float32)
    arrays["head/bias"] = np.ones(7, np.float32)
    path = tmp_path / "i21k.npz"
    np.savez(path, **arrays)
    with pytest.warns(CheckpointWarning, match="7-class head is not loaded: the model was "
                                               "built with include_top=False"):
        features = keras_vit.build(TINY, include_top=False, weights=str(path))  # head dropped
    assert features.get_layer("pre_logits").units == D
    x = images(224)
    with torch.no_grad():
        expected = base(torch.from_numpy(x).permute(0, 3, 1, 2)).pooler_output.numpy()
    np.testing.assert_allclose(ours(features, x), expected, atol=TOL, rtol=0)
    # representation_size=0 drops pre_logits, as the reference's fine-tuning does; the
    # file's head read pre_logits, so it starts from zeros even with the same 7 classes.
    with pytest.warns(CheckpointWarning) as caught:
        dropped = keras_vit.build(TINY, num_classes=7, representation_size=0, weights=str(path))
    messages = " ".join(str(w.message) for w in caught)
    assert "pre_logits layer that the model lacks: it is dropped" in messages
    assert "head reads pre_logits, which is dropped: the model's 7-class head starts from zeros" \
        in messages
    assert "pre_logits" not in [layer.name for layer in dropped.layers]
    for weight in dropped.get_layer("head").weights:
        assert not np.any(keras.ops.convert_to_numpy(weight))
    with torch.no_grad():
        tokens = base(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    features = keras.Model(dropped.inputs[0], dropped.pool.output)
    np.testing.assert_allclose(ours(features, x), tokens[:, 0], atol=TOL, rtol=0)


def test_head_is_kept_when_classes_match_and_zeroed_with_a_warning_otherwise(peer, npz_path):
    kept = keras_vit.build(TINY, num_classes=CLASSES, weights=npz_path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(kept.get_layer("head").kernel),
                                  state(peer)["classifier.weight"].T)
    with pytest.warns(CheckpointWarning, match="head has 5 classes and the model 3"):
        fresh = keras_vit.build(TINY, num_classes=3, weights=npz_path)
    randomize_weights(fresh)  # a trained model: loading must really reset the head
    with pytest.warns(CheckpointWarning, match="initialised to zeros"):
        load_checkpoint(fresh, npz_path)
    assert not np.any(keras.ops.convert_to_numpy(fresh.get_layer("head").kernel))
    assert not np.any(keras.ops.convert_to_numpy(fresh.get_layer("head").bias))
    np.testing.assert_array_equal(  # everything else loaded
        keras.ops.convert_to_numpy(fresh.get_layer("encoder_norm").gamma),
        state(peer)["vit.layernorm.weight"])


def test_missing_extra_and_misshaped_keys_name_the_key_and_both_shapes(npz_path, tmp_path):
    arrays = dict(np.load(npz_path))
    model = keras_vit.build(TINY, num_classes=CLASSES)
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.weights]

    missing = {k: v for k, v in arrays.items()
               if k != "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, str(tmp_path / "missing.npz"))
    assert ("missing: 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel', the model "
            "expects (32, 64)") in str(err.value)

    bad = dict(arrays, **{"Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel":
                          np.zeros((48, D), np.float32), "extra/thing": np.zeros((2, 3))})
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, str(tmp_path / "bad.npz"))
    message = str(err.value)
    assert ("shape mismatch: 'Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel' has shape "
            "(48, 32) in the file; the model expects (64, 32)") in message
    assert "extra: 'extra/thing' (2, 3) is not in the model" in message
    # Nothing was assigned by the failed loads.
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), b)

    # strict=False: missing / extra keys warn, the rest loads; a wrong shape still raises.
    with pytest.warns(CheckpointWarning, match="Dense_0/kernel"):
        load_checkpoint(model, str(tmp_path / "missing.npz"), strict=False)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.get_layer("encoder_norm").gamma),
        arrays["Transformer/encoder_norm/scale"])
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(model, str(tmp_path / "bad.npz"), strict=False)

    wrong_variant = keras_vit.build(Variant("w", 48, DEPTH, HEADS, MLP, PATCH),
                                    num_classes=CLASSES)
    with pytest.raises(CheckpointError, match=r"'embedding/kernel' has shape \(16, 16, 3, 32\) "
                                              r"in the file; the model expects \(16, 16, 3, 48\)"):
        load_checkpoint(wrong_variant, npz_path)


def test_class_token_mismatch_is_explained(npz_path):
    gap = keras_vit.build(TINY, num_classes=CLASSES, pooling="gap")
    with pytest.raises(CheckpointError, match=r"extra: 'cls' \(1, 1, 32\).*pooling='token'"):
        load_checkpoint(gap, npz_path)


def test_pickled_arrays_are_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"embedding/kernel": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="allow_pickle=False"):
        read_checkpoint(path)


def test_unreadable_and_unknown_files(tmp_path):
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        read_checkpoint(tmp_path / "cut.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="no 'embedding/kernel'"):
        read_checkpoint(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        keras_vit.build(TINY, weights=str(tmp_path / "absent.npz"))
    with pytest.raises(FileNotFoundError, match="No weights file .*absent.weights.h5"):
        keras_vit.build(TINY, weights=str(tmp_path / "absent.weights.h5"))
    (tmp_path / "w.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match="Unknown checkpoint format"):
        keras_vit.build(TINY, weights=str(tmp_path / "w.onnx"))
    with pytest.raises(CheckpointError, match="Unknown checkpoint name 'augreg_foo'"):
        keras_vit.build(TINY, weights="augreg_foo")


def test_save_npz_round_trip_and_keras_weights_files_still_load(tmp_path):
    model = randomize_weights(keras_vit.build(TINY, image_size=64, num_classes=CLASSES,
                                              representation_size=16))
    x = images(64)
    written = save_npz(model, tmp_path / "ours")  # numpy adds .npz; the returned name has it
    assert written == str(tmp_path / "ours.npz")
    again = keras_vit.build(TINY, image_size=64, num_classes=CLASSES, weights=written)
    np.testing.assert_array_equal(ours(again, x), ours(model, x))
    model.save_weights(tmp_path / "ours.weights.h5")
    h5 = keras_vit.build(TINY, image_size=64, num_classes=CLASSES, representation_size=16,
                         weights=str(tmp_path / "ours.weights.h5"))
    np.testing.assert_array_equal(ours(h5, x), ours(model, x))


@pytest.mark.parametrize("size", [(16, 64), (32, 96)])  # 1x4 grid (4 = 2x2 tokens), 2x6
def test_save_npz_keeps_a_non_square_grid(tmp_path, size):
    model = randomize_weights(keras_vit.build(TINY, image_size=size, num_classes=CLASSES))
    x = images(size)
    save_npz(model, tmp_path / "wide.npz")
    # No image_size: the model takes the checkpoint's resolution (its position grid).
    again = keras_vit.build(TINY, num_classes=CLASSES, weights=str(tmp_path / "wide.npz"))
    assert tuple(again.inputs[0].shape[1:3]) == size
    np.testing.assert_array_equal(ours(again, x), ours(model, x))


def test_big_vision_sincos2d_checkpoint_gets_the_fixed_table(peer, tmp_path):
    """big_vision posemb="sincos2d" stores no table: the loader writes the fixed one for the
    model's grid (no resampling needed at any resolution)."""
    from keras_vit.checkpoints import posemb_sincos_2d

    arrays = vit_jax_to_big_vision(hf_to_vit_jax(state(peer)), scan=False, class_token=False)
    del arrays["params/pos_embedding"]
    np.savez(tmp_path / "sincos.npz", **arrays)
    assert read_checkpoint(tmp_path / "sincos.npz").sincos2d
    model = keras_vit.build(TINY, image_size=(224, 288), num_classes=CLASSES,
                            weights=str(tmp_path / "sincos.npz"))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.get_layer("patch_encoder").pos_embedding),
        posemb_sincos_2d(14, 18, D))
