"""keras_vit.build: the paper's ViT, its variants, serialization, mixed precision, a peer."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit.layers import PatchEncoder, Patches, TransformerBlock
from keras_vit.variants import parse_variant
from tests import processes
from tests.conftest import randomize_weights

REFERENCE_PARAMS = {  # google-research/vision_transformer models_test.py, 224x224, 1000 classes
    "Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656, "B/32": 88_224_232,
    "L/16": 304_326_632, "H/14": 632_045_800,
}


def small(**kwargs):
    args = dict(image_size=16, patch_size=4, num_classes=5)
    args.update(kwargs)
    return keras_vit.build("Ti/16", **args)


def images(n=2, size=16, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype("float32")


@pytest.mark.parametrize("variant", ["Ti/16", "S/16", "B/16", "B/32"])
def test_parameter_counts_equal_the_reference(variant):
    model = keras_vit.build(variant)
    assert model.count_params() == REFERENCE_PARAMS[variant]
    assert keras_vit.count_parameters(variant) == REFERENCE_PARAMS[variant]


@pytest.mark.parametrize("variant", ["L/16", "H/14"])
def test_large_variant_counts_from_their_real_layers(variant):
    # Building L/16 and H/14 whole takes 10-20 s of random initialisation on 2 cores: build
    # one of each distinct layer at full size instead and add them up as the model stacks them.
    v = parse_variant(variant)
    grid = 224 // v.patch_size
    encoder = PatchEncoder(v.width)
    encoder.build((None, grid * grid, v.patch_size**2 * 3))
    block = TransformerBlock(v.num_heads, v.mlp_dim)
    block.build((None, grid * grid + 1, v.width))
    norm_and_head = 2 * v.width + v.width * 1000 + 1000
    total = encoder.count_params() + v.depth * block.count_params() + norm_and_head
    assert total == REFERENCE_PARAMS[variant] == keras_vit.count_parameters(variant)


@pytest.mark.parametrize("kwargs", [
    dict(), dict(pooling="gap"), dict(representation_size=24), dict(image_size=(16, 24)),
    dict(include_top=False), dict(num_channels=1)])
def test_count_parameters_agrees_with_built_models(kwargs):
    model = small(**kwargs)
    args = dict(image_size=kwargs.get("image_size", 16), patch_size=4,
                num_classes=5 if kwargs.get("include_top", True) else 0,
                class_token=kwargs.get("pooling", "token") == "token",
                representation_size=kwargs.get("representation_size"),
                num_channels=kwargs.get("num_channels", 3))
    assert model.count_params() == keras_vit.count_parameters("Ti/16", **args)


def test_variant_table_lists_every_size_with_reference_counts():
    rows = {r["name"]: r for r in keras_vit.variants()}
    for name, params in REFERENCE_PARAMS.items():
        assert rows[name]["params"] == params
    assert (rows["B/16"]["width"], rows["B/16"]["depth"], rows["B/16"]["heads"],
            rows["B/16"]["mlp_dim"]) == (768, 12, 12, 3072)
    assert (rows["H/14"]["width"], rows["H/14"]["depth"], rows["H/14"]["heads"]) == (1280, 32, 16)


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        keras_vit.build("XL/16")
    assert "XL/16" in str(err.value) and "B/16" in str(err.value) and "Ti/16" in str(err.value)
    with pytest.raises(ValueError, match="patch_size"):
        keras_vit.build("B")


def test_image_not_divisible_by_patch_says_how_to_fix():
    with pytest.raises(ValueError, match=r"30x32 is not divisible by the patch size 8.*24 or 32"):
        keras_vit.build("Ti/8", image_size=(30, 32))
    with pytest.raises(ValueError, match=r"not divisible by the patch size 14"):
        keras_vit.count_parameters("Ti/14", image_size=32)  # no count for an unbuildable model
    rows = {r["name"]: r["params"] for r in keras_vit.variants(image_size=384)}
    assert rows["H/14"] is None and rows["B/16"] == 86_859_496


@pytest.mark.parametrize("image_size, patch_size, message", [
    (32.0, None, "image_size must be a positive int or \\(height, width\\)"),
    ((32, 0), None, "image_size must be a positive int"),
    ((None, 32), None, "Image height must be known"),
    (32, 8.5, "patch_size must be a positive integer, got 8.5"),
])
def test_bad_sizes_are_named(image_size, patch_size, message):
    with pytest.raises(ValueError, match=message):
        keras_vit.build("Ti/16", image_size=image_size, patch_size=patch_size)
    assert keras_vit.build("Ti/16", image_size=np.int64(32), patch_size=np.int64(8),
                           depth=1).input_shape == (None, 32, 32, 3)


def test_builds_the_paper_model_shapes():
    model = keras_vit.build("S/16", image_size=32, num_classes=10, patch_size=4)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    encoder = model.get_layer("patch_encoder")
    assert encoder.pos_embedding.shape == (1, 65, 384) and encoder.cls.shape == (1, 1, 384)
    blocks = [layer for layer in model.layers if isinstance(layer, TransformerBlock)]
    assert len(blocks) == 12 and blocks[0].mlp.mlp_dim == 1536 and blocks[0].num_heads == 6
    assert model.get_layer("encoder_norm").epsilon == 1e-6
    assert model.name == "vit_s4"


def test_initialisation_follows_the_reference():
    model = keras_vit.build("Ti/16", image_size=64, num_classes=7)
    encoder = model.get_layer("patch_encoder")
    pos = keras.ops.convert_to_numpy(encoder.pos_embedding)
    assert abs(pos.std() - 0.02) < 0.002
    assert not keras.ops.convert_to_numpy(encoder.cls).any()
    head = model.get_layer("head")
    assert not keras.ops.convert_to_numpy(head.kernel).any()
    mlp = model.get_layer("encoderblock_0").mlp
    dense_0 = keras.ops.convert_to_numpy(mlp.dense_0.kernel)
    limit = np.sqrt(6 / (192 + 768))
    assert 0.99 * limit < np.abs(dense_0).max() <= limit  # Xavier-uniform
    assert 0 < np.abs(keras.ops.convert_to_numpy(mlp.dense_0.bias)).max() < 1e-5  # normal(1e-6)
    # pre_logits: Flax nn.Dense's default, lecun_normal: std 1/sqrt(fan_in) after truncating
    # a normal (of std 1/sqrt(fan_in)/0.8796) at two of its standard deviations.
    pre_logits = keras_vit.build("B/16", image_size=32, representation_size=768)
    kernel = keras.ops.convert_to_numpy(pre_logits.get_layer("pre_logits").kernel)
    assert abs(kernel.std() - 1 / np.sqrt(768)) < 0.001
    assert 0.99 < np.abs(kernel).max() / (2 / np.sqrt(768) / 0.87962566) <= 1.0001


def test_non_square_images_and_patch_override():
    model = small(image_size=(16, 24))
    assert model.get_layer("patch_encoder").pos_embedding.shape == (1, 4 * 6 + 1, 192)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 24, 3)).astype("float32")
    assert model(x).shape == (2, 5)


def test_gap_pooling_has_no_class_token_and_averages_tokens():
    model = randomize_weights(small(pooling="gap"))
    encoder = model.get_layer("patch_encoder")
    assert not encoder.class_token and encoder.pos_embedding.shape == (1, 16, 192)
    features = keras_vit.feature_model(model)(images())
    np.testing.assert_allclose(features["pooled"], np.mean(features["tokens"], axis=1), atol=1e-6)


def test_include_top_false_and_representation_layer():
    features = small(include_top=False)
    assert features.output_shape == (None, 192)
    model = small(representation_size=32)
    pre_logits = model.get_layer("pre_logits")
    assert pre_logits.units == 32 and pre_logits.activation.__name__ == "tanh"
    assert model.get_layer("head").kernel.shape == (32, 5)


def test_classifier_activation_softmax():
    model = randomize_weights(small(classifier_activation="softmax"))
    np.testing.assert_allclose(np.sum(model(images()), axis=-1), 1.0, atol=1e-5)


def test_stochastic_depth_rises_linearly_over_depth():
    model = small(drop_path_rate=0.11)
    rates = [model.get_layer(f"encoderblock_{i}").drop_path.rate for i in range(12)]
    np.testing.assert_allclose(rates, np.linspace(0, 0.11, 12), atol=1e-7)


def test_regularisation_is_active_only_in_training():
    model = randomize_weights(small(dropout_rate=0.2, attention_dropout_rate=0.2,
                                    drop_path_rate=0.2))
    x = images()
    np.testing.assert_array_equal(model(x), model(x))  # inference is deterministic
    assert np.abs(model(x, training=True) - model(x)).max() > 1e-3


def test_feature_model_shares_layers_and_returns_intermediates():
    model = randomize_weights(small(representation_size=16))
    extractor = keras_vit.feature_model(model)
    x = images()
    out = extractor(x)
    assert len(out["block_outputs"]) == 12 and len(out["attention_weights"]) == 12
    assert out["tokens"].shape == (2, 17, 192)
    assert out["attention_weights"][0].shape == (2, 3, 17, 17)
    np.testing.assert_allclose(np.sum(out["attention_weights"][5], -1), 1.0, atol=1e-5)
    logits = model.get_layer("head")(out["pooled"])
    np.testing.assert_allclose(logits, model(x), atol=1e-5)
    # ... although the model's last block computes the class token alone (it is all the
    # head reads), while the extractor runs it over every token.
    assert model.get_layer("encoder_norm").output.shape == (None, 1, 192)
    # The last block's output, normed, is the token features.
    np.testing.assert_allclose(model.get_layer("encoder_norm")(out["block_outputs"][-1]),
                               out["tokens"], atol=1e-5)
    # Same weights, not copies: changing the model changes the extractor.
    head_in = model.get_layer("pre_logits")
    head_in.kernel.assign(head_in.kernel * 2)
    assert np.abs(extractor(x)["pooled"] - out["pooled"]).max() > 1e-4
    assert extractor.count_params() == model.count_params() - model.get_layer("head").count_params()


def test_feature_model_saves_and_keeps_its_models_precision(tmp_path):
    model = randomize_weights(small(depth=2))
    x = images()
    extractor = keras_vit.feature_model(model)
    expected = extractor(x)
    extractor.save(tmp_path / "features.keras")
    code = ("import sys, numpy as np, keras, keras_vit; "
            "f = keras.saving.load_model(sys.argv[1]); "
            "np.save(sys.argv[3], f(np.load(sys.argv[2]))['attention_weights'][1])")
    np.save(tmp_path / "x.npy", x)
    result = processes.run([sys.executable, "-c", code, str(tmp_path / "features.keras"),
                            str(tmp_path / "x.npy"), str(tmp_path / "a.npy")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"),
                                  keras.ops.convert_to_numpy(expected["attention_weights"][1]))
    # Made while another global policy is in force, it still computes in the model's float32.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    later = keras_vit.feature_model(model)(x)
    np.testing.assert_allclose(later["tokens"], expected["tokens"], atol=1e-6)


def test_summary_names_are_readable():
    lines = []
    small().summary(print_fn=lines.append)
    text = "\n".join(lines)
    for name in ("patches (Patches)", "patch_encoder (PatchEncoder)", "encoderblock_11",
                 "encoder_norm", "head (Dense)"):
        assert name in text


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["gap", "token"])
def test_keras_file_round_trip_in_a_fresh_process(tmp_path, pooling):
    model = randomize_weights(small(gelu="erf", pooling=pooling, representation_size=8,
                                    dropout_rate=0.1, drop_path_rate=0.1))
    x = images()
    path = tmp_path / "vit.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, keras, keras_vit; "
            "m = keras.saving.load_model(sys.argv[1]); "
            "np.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0)); "
            "print(m.get_layer('encoderblock_3').get_config()['gelu'], "
            "m.get_layer('encoder_norm').output.shape[1])")
    result = processes.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.npy"),
                            str(tmp_path / "y.npy")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # A loaded class-token model keeps computing the last block for the class token alone.
    assert result.stdout.split()[-2:] == ["erf", "16" if pooling == "gap" else "1"]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), model.predict(x, verbose=0))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_runs_with_float32_logits(policy):
    reference = randomize_weights(small(depth=2), scale=0.02)
    model = small(depth=2, dtype=policy)  # the policy given to the model: no global state
    assert keras.config.dtype_policy().name == "float32"
    model.set_weights(reference.get_weights())
    assert all(w.dtype == "float32" for w in model.weights)
    assert {block.compute_dtype for block in model.blocks} == {policy.split("_")[1]}
    logits = model(images())
    assert logits.dtype == "float32"
    tolerance = 0.05 if policy == "mixed_bfloat16" else 0.01
    np.testing.assert_allclose(logits, reference(images()), atol=tolerance)
    # And it trains: one step of fit under the policy (a loss-scale optimizer for float16).
    model.compile(optimizer="adam", jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(images(8), np.arange(8) % 5, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert (type(model.optimizer).__name__ == "LossScaleOptimizer") == (policy == "mixed_float16")


def test_matches_keras_hub_vit_backbone_with_the_same_weights():
    keras_hub = pytest.importorskip("keras_hub")
    ours = randomize_weights(keras_vit.build("Ti/16", image_size=32, patch_size=8,
                                             include_top=False, gelu="erf"))
    peer = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=12,
                                        num_heads=3, hidden_dim=192, mlp_dim=768)
    emb = peer.get_layer("vit_patching_and_embedding")
    encoder = ours.get_layer("patch_encoder")
    emb.patch_embedding.kernel.assign(np.reshape(encoder.kernel, (8, 8, 3, 192)))
    emb.patch_embedding.bias.assign(encoder.bias)
    emb.class_token.assign(encoder.cls)
    emb.position_embedding.embeddings.assign(encoder.pos_embedding[0])
    peer_encoder = peer.get_layer("vit_encoder")
    for i, theirs in enumerate(peer_encoder.encoder_layers):
        mine = ours.get_layer(f"encoderblock_{i}")
        pairs = [(theirs.layer_norm_1, mine.norm_1), (theirs.layer_norm_2, mine.norm_2),
                 (theirs.mlp.dense_1, mine.mlp.dense_0), (theirs.mlp.dense_2, mine.mlp.dense_1)]
        for a, b in pairs:
            a.set_weights(b.get_weights())
        att = mine.attention
        theirs.mha.set_weights([att.query_kernel, att.query_bias, att.key_kernel, att.key_bias,
                                att.value_kernel, att.value_bias, att.out_kernel, att.out_bias])
    peer_encoder.layer_norm.set_weights(ours.get_layer("encoder_norm").get_weights())
    x = images(3, 32)
    tokens = keras_vit.feature_model(ours)(x)["tokens"]
    np.testing.assert_allclose(tokens, peer(x), atol=1e-5)
    np.testing.assert_allclose(ours(x), peer(x)[:, 0], atol=1e-5)


@pytest.mark.slow
def test_runs_on_the_torch_backend_with_the_same_numbers(tmp_path):
    pytest.importorskip("torch")
    model = randomize_weights(small(gelu="erf"))
    model.save_weights(tmp_path / "w.weights.h5")
    np.save(tmp_path / "x.npy", images())
    code = ("import sys, json, numpy as np, keras_vit, keras; "
            "m = keras_vit.build('Ti/16', image_size=16, patch_size=4, num_classes=5, gelu='erf', "
            "weights=sys.argv[1]); "
            "y = keras.ops.convert_to_numpy(m(np.load(sys.argv[2]))); "
            "np.save(sys.argv[3], y); print(json.dumps(keras.backend.backend()))")
    env = {**__import__("os").environ, "KERAS_BACKEND": "torch"}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w.weights.h5"),
                             str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == "torch"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model(images()), atol=1e-5)
