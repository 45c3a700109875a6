"""Hugging Face and timm PyTorch weights (safetensors and state dicts) against Hugging Face ViT."""

import numpy as np
import pytest

import keras_vit
from keras_vit.checkpoints import (CheckpointError, CheckpointWarning, load_checkpoint,
                                   load_safetensors, read_checkpoint)
from tests.test_checkpoints import (CLASSES, D, DEPTH, TINY, TOL, hf_logits, hf_vit, images, ours,
                                    state)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def peer():
    return hf_vit(gelu="erf", seed=11)


@pytest.fixture(scope="module")
def hub_dir(peer, tmp_path_factory):
    """What the Hub holds: save_pretrained writes transformers-4 names and config.json."""
    folder = tmp_path_factory.mktemp("hub")
    peer.save_pretrained(folder)
    return folder


def test_hub_safetensors_match_hugging_face_at_224_and_384(peer, hub_dir):
    path = str(hub_dir / "model.safetensors")
    checkpoint = read_checkpoint(path)
    assert checkpoint.layout == "hf" and checkpoint.gelu == "erf"
    assert "vit.encoder.layer.0.attention.attention.query.weight" in {
        e.source_key for e in checkpoint.params.values()}  # the transformers-4 names
    # Hugging Face itself reads the file back to the same model.
    again = transformers.ViTForImageClassification.from_pretrained(hub_dir).eval()
    x = images(224)
    np.testing.assert_allclose(hf_logits(again, x), hf_logits(peer, x), atol=1e-6, rtol=0)

    model = keras_vit.build(TINY, num_classes=CLASSES, weights=path)
    assert model.get_layer("encoderblock_1").gelu == "erf"  # PyTorch weights: exact GELU
    expected = hf_logits(peer, x)
    assert np.abs(expected).max() > 0.3
    np.testing.assert_allclose(ours(model, x), expected, atol=TOL, rtol=0)

    x384 = images(384)
    model384 = keras_vit.build(TINY, image_size=384, num_classes=CLASSES)  # tanh GELU
    with pytest.warns(CheckpointWarning, match="GELU"):  # ... which the loader points out
        load_checkpoint(model384, path, interpolation="bicubic")
    model384 = keras_vit.build(TINY, image_size=384, num_classes=CLASSES, gelu="erf")
    load_checkpoint(model384, path, interpolation="bicubic")
    np.testing.assert_allclose(ours(model384, x384),
                               hf_logits(peer, x384, interpolate_pos_encoding=True),
                               atol=TOL, rtol=0)


def test_transformers5_state_dict_and_vit_model_pooler(peer, tmp_path):
    torch.save(peer.state_dict(), tmp_path / "pytorch_model.bin")  # layers.{i}.attention.q_proj
    model = keras_vit.build(TINY, num_classes=CLASSES, weights=str(tmp_path / "pytorch_model.bin"))
    x = images(224)
    np.testing.assert_allclose(ours(model, x), hf_logits(peer, x), atol=TOL, rtol=0)

    base = hf_vit(gelu="erf", seed=12, model_class=transformers.ViTModel)
    torch.save({"state_dict": base.state_dict()}, tmp_path / "base.pt")  # wrapped, as trainers do
    features = keras_vit.build(TINY, include_top=False, weights=str(tmp_path / "base.pt"))
    assert features.get_layer("pre_logits").units == D  # the pooler is pre_logits
    with torch.no_grad():
        expected = base(torch.from_numpy(x).permute(0, 3, 1, 2)).pooler_output.numpy()
    np.testing.assert_allclose(ours(features, x), expected, atol=TOL, rtol=0)


def hf_to_timm(sd):
    """HF (transformers 5) -> timm vit_* names (timm `_load_weights`: qkv = [q; k; v] rows)."""
    sd = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in sd.items()}
    out = {"cls_token": sd["embeddings.cls_token"],
           "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
           "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
    for i in range(DEPTH):
        s, t = f"layers.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[t + f"attn.qkv.{p}"] = np.concatenate(
                [sd[s + f"attention.{n}_proj.{p}"] for n in ("q", "k", "v")], axis=0)
            out[t + f"attn.proj.{p}"] = sd[s + f"attention.o_proj.{p}"]
            out[t + f"norm1.{p}"] = sd[s + f"layernorm_before.{p}"]
            out[t + f"norm2.{p}"] = sd[s + f"layernorm_after.{p}"]
            out[t + f"mlp.fc1.{p}"] = sd[s + f"mlp.fc1.{p}"]
            out[t + f"mlp.fc2.{p}"] = sd[s + f"mlp.fc2.{p}"]
    return out


def test_timm_state_dict_matches_hugging_face(peer, tmp_path):
    timm = {k: torch.from_numpy(v) for k, v in hf_to_timm(state(peer)).items()}
    safetensors_torch.save_file(timm, tmp_path / "timm.safetensors")
    torch.save(timm, tmp_path / "timm.pth")
    x = images(224)
    expected = hf_logits(peer, x)
    for name in ("timm.safetensors", "timm.pth"):
        assert read_checkpoint(tmp_path / name).layout == "timm"
        model = keras_vit.build(TINY, num_classes=CLASSES, weights=str(tmp_path / name))
        np.testing.assert_allclose(ours(model, x), expected, atol=TOL, rtol=0)
    # A timm model with something keras-vit does not have is refused by name.
    timm["fc_norm.weight"] = torch.ones(D)
    safetensors_torch.save_file(timm, tmp_path / "fc_norm.safetensors")
    with pytest.raises(CheckpointError, match=r"extra: 'fc_norm.weight' \(32,\)"):
        keras_vit.build(TINY, num_classes=CLASSES, weights=str(tmp_path / "fc_norm.safetensors"))


def test_errors_use_the_file_s_own_names_and_layouts(peer, tmp_path):
    sd = dict(peer.state_dict())
    del sd["vit.layers.1.mlp.fc1.weight"]
    sd["vit.layers.0.mlp.fc2.weight"] = torch.zeros(D, 48)  # (out, in): in should be 64
    torch.save(sd, tmp_path / "broken.bin")
    with pytest.raises(CheckpointError) as err:
        keras_vit.build(TINY, num_classes=CLASSES, weights=str(tmp_path / "broken.bin"))
    message = str(err.value)
    assert ("missing: 'vit.layers.1.mlp.fc1.weight', the model expects (32, 64) (as "
            "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel)") in message
    assert ("shape mismatch: 'vit.layers.0.mlp.fc2.weight' has shape (32, 48) in the file "
            "((48, 32) in Keras layout); the model expects (64, 32)") in message


def test_safetensors_reader_matches_the_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"f32": torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32)),
               "f16": torch.from_numpy(rng.normal(size=(5,)).astype(np.float16)),
               "bf16": torch.from_numpy(rng.normal(size=(2, 3)).astype(np.float32)).bfloat16(),
               "f64": torch.from_numpy(rng.normal(size=(2,))),
               "i64": torch.arange(6).reshape(2, 3), "scalar": torch.tensor(1.5)}
    path = tmp_path / "t.safetensors"
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    arrays = load_safetensors(path)
    assert set(arrays) == set(tensors)
    for name, tensor in tensors.items():
        expected = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
        assert arrays[name].shape == tuple(tensor.shape)
        np.testing.assert_array_equal(arrays[name], expected)
    assert arrays["bf16"].dtype == np.float32 and arrays["i64"].dtype == np.int64
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_safetensors(tmp_path / "junk.safetensors")
