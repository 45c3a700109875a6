"""The custom layers against direct NumPy computations of what the paper describes."""

import math

import keras
import numpy as np
import pytest

from keras_vit.layers import (DropPath, MultiHeadSelfAttention, PatchEncoder, Patches,
                              TokenPooling, TransformerBlock, gelu)
from tests.conftest import randomize_weights


def numpy_patches(images, p):
    b, h, w, c = images.shape
    out = []
    for r in range(h // p):
        for col in range(w // p):
            out.append(images[:, r * p:(r + 1) * p, col * p:(col + 1) * p, :].reshape(b, -1))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("shape,p", [((2, 32, 32, 3), 8), ((1, 16, 24, 3), 4), ((2, 14, 28, 1), 14)])
def test_patches_match_row_major_flattening(shape, p):
    images = np.random.default_rng(0).normal(size=shape).astype("float32")
    got = keras.ops.convert_to_numpy(Patches(p)(images))
    np.testing.assert_array_equal(got, numpy_patches(images, p))


def test_patches_flatten_in_flax_kernel_order():
    # A patch projected by the (P*P*C, D) matrix equals the Flax conv with kernel (P, P, C, D).
    rng = np.random.default_rng(1)
    images = rng.normal(size=(1, 8, 8, 3)).astype("float32")
    kernel = rng.normal(size=(4, 4, 3, 5)).astype("float32")
    conv = np.einsum("hwc,hwcd->d", images[0, 4:8, 0:4], kernel)  # patch at row 1, col 0
    projected = keras.ops.convert_to_numpy(Patches(4)(images))[0, 2] @ kernel.reshape(-1, 5)
    np.testing.assert_allclose(projected, conv, rtol=1e-5)


def test_patches_error_names_sizes_and_fix():
    with pytest.raises(ValueError) as err:
        Patches(16)(np.zeros((1, 225, 230, 3), "float32"))
    message = str(err.value)
    for fragment in ("225x230", "patch size 16", "224 or 240", "height 225", "width 230"):
        assert fragment in message


def test_patch_encoder_prepends_class_token_and_adds_positions():
    encoder = PatchEncoder(6)
    patches = np.random.default_rng(2).normal(size=(2, 4, 12)).astype("float32")
    randomize_weights(keras.Sequential([keras.Input((4, 12)), encoder]))
    kernel, bias, cls, pos = (keras.ops.convert_to_numpy(w) for w in
                              (encoder.kernel, encoder.bias, encoder.cls, encoder.pos_embedding))
    want = np.concatenate([np.broadcast_to(cls, (2, 1, 6)), patches @ kernel + bias], 1) + pos
    np.testing.assert_allclose(keras.ops.convert_to_numpy(encoder(patches)), want, atol=1e-6)
    assert pos.shape == (1, 5, 6)


def test_patch_encoder_without_class_token_has_n_positions():
    encoder = PatchEncoder(6, class_token=False)
    out = encoder(np.zeros((2, 4, 12), "float32"))
    assert out.shape == (2, 4, 6) and encoder.pos_embedding.shape == (1, 4, 6)
    assert not hasattr(encoder, "cls")


def numpy_attention(x, layer):
    w = {v.path.split("/")[-1]: keras.ops.convert_to_numpy(v) for v in layer.weights}
    q = np.einsum("btd,dhk->bthk", x, w["query_kernel"]) + w["query_bias"]
    k = np.einsum("btd,dhk->bthk", x, w["key_kernel"]) + w["key_bias"]
    v = np.einsum("btd,dhk->bthk", x, w["value_kernel"]) + w["value_bias"]
    logits = np.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqt,bthk->bqhk", probs, v)
    return np.einsum("bqhk,hkd->bqd", out, w["out_kernel"]) + w["out_bias"], probs


def test_attention_fused_and_explicit_paths_match_numpy():
    layer = MultiHeadSelfAttention(num_heads=4)
    x = np.random.default_rng(3).normal(size=(2, 7, 16)).astype("float32")
    layer.build(x.shape)
    randomize_weights(layer, scale=0.2)
    want, probs = numpy_attention(x.astype("float64"), layer)
    fused = keras.ops.convert_to_numpy(layer(x))
    explicit, scores = layer(x, return_attention_scores=True)
    np.testing.assert_allclose(fused, want, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(explicit), want, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scores), probs, atol=1e-6)


def test_attention_weight_shapes_are_the_flax_checkpoint_shapes():
    layer = MultiHeadSelfAttention(num_heads=12)
    layer.build((None, 197, 768))
    shapes = {v.path.split("/")[-1]: tuple(v.shape) for v in layer.weights}
    assert shapes == {"query_kernel": (768, 12, 64), "query_bias": (12, 64),
                      "key_kernel": (768, 12, 64), "key_bias": (12, 64),
                      "value_kernel": (768, 12, 64), "value_bias": (12, 64),
                      "out_kernel": (12, 64, 768), "out_bias": (768,)}


def test_attention_kernels_are_xavier_uniform_over_input_and_output_fans():
    layer = MultiHeadSelfAttention(num_heads=12)
    layer.build((None, 197, 768))
    limit = math.sqrt(6 / (768 + 768))
    q = keras.ops.convert_to_numpy(layer.query_kernel)
    assert np.abs(q).max() <= limit and np.abs(q).max() > 0.99 * limit
    np.testing.assert_allclose(q.std(), limit / math.sqrt(3), rtol=0.02)


def test_gelu_forms_match_their_formulas():
    x = np.linspace(-6, 6, 101).astype("float32")
    exact = 0.5 * x * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x]))
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gelu(x, "erf")), exact, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gelu(x, "tanh")), tanh, atol=1e-6)
    with pytest.raises(ValueError, match="gelu must be one of"):
        gelu(x, "relu")


def test_transformer_block_is_pre_layernorm_residual():
    block = TransformerBlock(num_heads=2, mlp_dim=32, gelu="erf")
    x = np.random.default_rng(4).normal(size=(2, 5, 8)).astype("float32")
    block.build(x.shape)
    randomize_weights(block, scale=0.2)

    def layer_norm(v, ln):
        g, b = (keras.ops.convert_to_numpy(w) for w in (ln.gamma, ln.beta))
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-6) * g + b

    assert block.norm_1.epsilon == 1e-6 and block.norm_2.epsilon == 1e-6
    y = x + numpy_attention(layer_norm(x, block.norm_1), block.attention)[0]
    d0, d1 = block.mlp.dense_0, block.mlp.dense_1
    h = layer_norm(y, block.norm_2) @ keras.ops.convert_to_numpy(d0.kernel) + \
        keras.ops.convert_to_numpy(d0.bias)
    h = keras.ops.convert_to_numpy(gelu(h, "erf"))
    want = y + h @ keras.ops.convert_to_numpy(d1.kernel) + keras.ops.convert_to_numpy(d1.bias)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(block(x)), want, atol=1e-4)


def test_class_token_only_block_equals_the_full_blocks_first_token():
    # What `build` runs as the last block of a class-token model: the class token's
    # queries over every token's keys and values, its MLP alone.
    block = TransformerBlock(num_heads=2, mlp_dim=32)
    x = np.random.default_rng(5).normal(size=(3, 6, 8)).astype("float32")
    block.build(x.shape)
    randomize_weights(block, scale=0.3)
    full, full_scores = block(x, return_attention_scores=True)
    first, scores = block(x, return_attention_scores=True, class_token_only=True)
    assert first.shape == (3, 1, 8) and scores.shape == (3, 2, 1, 6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(first),
                               keras.ops.convert_to_numpy(full)[:, :1], atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scores),
                               keras.ops.convert_to_numpy(full_scores)[:, :, :1], atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(block(x, class_token_only=True)),
                               keras.ops.convert_to_numpy(full)[:, :1], atol=1e-5)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    layer = DropPath(0.25, seed=1)
    x = np.ones((4000, 3, 2), "float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), x)
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    per_sample = y.reshape(4000, -1)
    assert set(np.unique(per_sample)) <= {0.0, np.float32(1 / 0.75)}
    assert (per_sample == per_sample[:, :1]).all()  # the whole sample is kept or dropped
    assert abs(y.mean() - 1.0) < 0.05
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropPath(1.0)


def test_drop_path_rate_holds_in_bfloat16():
    # The early blocks' small rates (0.1 / 11 at B/16) must hold under mixed_bfloat16: a mask
    # drawn in bfloat16 dropped 1.5% of samples at a 1% rate.
    layer = DropPath(0.01, seed=3, dtype="mixed_bfloat16")
    y = keras.ops.convert_to_numpy(
        keras.ops.cast(layer(np.ones((200_000, 1), "float32"), training=True), "float32"))
    assert abs((y == 0).mean() - 0.01) < 0.0015


def test_token_pooling_modes():
    tokens = np.arange(24, dtype="float32").reshape(1, 4, 6)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(TokenPooling("token")(tokens)),
                                  tokens[:, 0])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(TokenPooling("gap")(tokens)),
                               tokens.mean(1))
    with pytest.raises(ValueError, match="pooling must be one of"):
        TokenPooling("max")


@pytest.mark.parametrize("layer", [
    Patches(4), PatchEncoder(8, class_token=False), MultiHeadSelfAttention(2, 0.1),
    TransformerBlock(2, 16, 0.1, 0.1, 0.2, "erf"), DropPath(0.1, seed=3), TokenPooling("gap")])
def test_layers_round_trip_through_config(layer):
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    assert type(clone) is type(layer) and clone.get_config() == layer.get_config()


# --- Keras' own kinds of checks, over every layer (tests/layer_checks.py) --------------------

from keras_vit.layers import BottleneckUnit, MlpBlock, ResNetStem, StdConv2D  # noqa: E402
from tests.layer_checks import run_layer_checks  # noqa: E402

EVERY_LAYER = {
    "patches": (lambda dtype: Patches(4, dtype=dtype), (8, 12, 3), {}, False),
    "patch_encoder": (lambda dtype: PatchEncoder(8, dtype=dtype), (6, 12), {}, True),
    "patch_encoder_gap": (lambda dtype: PatchEncoder(8, class_token=False, dtype=dtype),
                          (6, 12), {}, True),
    "patch_encoder_deit": (lambda dtype: PatchEncoder(8, distillation_token=True, dtype=dtype),
                           (6, 12), {}, True),
    "attention": (lambda dtype: MultiHeadSelfAttention(2, dtype=dtype), (5, 8), {}, True),
    "attention_with_scores": (lambda dtype: MultiHeadSelfAttention(2, dtype=dtype), (5, 8),
                              {"return_attention_scores": True}, True),
    "attention_two_tokens": (lambda dtype: MultiHeadSelfAttention(2, dtype=dtype), (5, 8),
                             {"output_tokens": 2}, True),
    "mlp": (lambda dtype: MlpBlock(16, 0.1, "erf", dtype=dtype), (5, 8), {}, True),
    "block": (lambda dtype: TransformerBlock(2, 16, 0.1, 0.1, 0.1, dtype=dtype), (5, 8), {},
              True),
    "block_class_token": (lambda dtype: TransformerBlock(2, 16, dtype=dtype), (5, 8),
                          {"class_token_only": True}, True),
    "block_with_scores": (lambda dtype: TransformerBlock(2, 16, dtype=dtype), (5, 8),
                          {"return_attention_scores": True}, True),
    "drop_path": (lambda dtype: DropPath(0.1, seed=1, dtype=dtype), (5, 8), {}, False),
    "pool_token": (lambda dtype: TokenPooling("token", dtype=dtype), (5, 8), {}, False),
    "pool_gap": (lambda dtype: TokenPooling("gap", dtype=dtype), (5, 8), {}, False),
    "pool_distillation": (lambda dtype: TokenPooling("distillation", dtype=dtype), (5, 8), {},
                          False),
    "std_conv": (lambda dtype: StdConv2D(4, 3, 2, dtype=dtype), (8, 8, 3), {}, True),
    "bottleneck": (lambda dtype: BottleneckUnit(32, 2, dtype=dtype), (4, 4, 32), {}, True),
    "resnet_stem": (lambda dtype: ResNetStem((), width=32, patch_size=1, dtype=dtype),
                    (16, 16, 3), {}, True),
}


@pytest.mark.parametrize("name", sorted(EVERY_LAYER))
def test_every_layer_passes_keras_layer_checks(name):
    make, shape, kwargs, trainable = EVERY_LAYER[name]
    run_layer_checks(make, shape, call_kwargs=kwargs, trainable=trainable)
