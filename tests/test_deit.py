"""DeiT: the distilled variants' shapes and counts (timm's), their checkpoints against Hugging
Face's PyTorch DeiT, and training with a teacher (hard and soft distillation)."""

import json

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit.variants import Variant

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# timm's counts at 1000 classes (deit_*_distilled_patch16_*).
TIMM_COUNTS = {("DeiT-Ti/16", 224): 5_910_800, ("DeiT-S/16", 224): 22_436_432,
               ("DeiT-B/16", 224): 87_338_192, ("DeiT-B/16", 384): 87_630_032}
D, HEADS, DEPTH, MLP, PATCH, CLASSES = 32, 4, 2, 64, 16, 5
TINY = Variant("DeiT-tiny/16", D, DEPTH, HEADS, MLP, PATCH, distilled=True)


@pytest.mark.parametrize("variant, size", sorted(TIMM_COUNTS))
def test_distilled_counts_equal_timms(variant, size):
    assert keras_vit.count_parameters(variant, image_size=size) == TIMM_COUNTS[variant, size]
    if variant == "DeiT-Ti/16":  # (the others are the same layers, larger)
        model = keras_vit.build(variant, image_size=size)
        assert model.count_params() == TIMM_COUNTS[variant, size]
        assert model.distilled and model.head_dist is not None
        assert model.patch_encoder.pos_embedding.shape == (1, 14 * 14 + 2, 192)
        assert (model.gelu, model.normalization.name) == ("erf", "imagenet")
    # Non-distilled DeiT is the plain ViT.
    plain = variant.replace("DeiT-", "")
    assert keras_vit.count_parameters(variant, image_size=size, distilled=False) == \
        keras_vit.count_parameters(plain, image_size=size)


def test_inference_is_the_mean_of_both_heads_and_training_sees_both():
    model = keras_vit.build(TINY, image_size=32, num_classes=CLASSES)
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.normal(0, 0.2, w.shape).astype("float32"))
    x = rng.uniform(-1, 1, (3, 32, 32, 3)).astype("float32")
    heads = keras_vit.distillation_model(model)(x)
    mean = (keras.ops.convert_to_numpy(heads["class"])
            + keras.ops.convert_to_numpy(heads["distillation"])) / 2
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), mean, atol=1e-5)
    assert not np.allclose(heads["class"], heads["distillation"])
    # Round trip, feature model and attention maps as for ViT.
    clone = keras_vit.ViT.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(x)), mean, atol=1e-5)
    tokens = keras_vit.feature_model(model)(x)["tokens"]
    assert tokens.shape == (3, 4 + 2, D)
    assert keras_vit.attention_map(model, np.zeros((32, 32, 3), np.uint8)).shape == (32, 32)
    bf16 = keras_vit.build(TINY, image_size=32, num_classes=CLASSES, dtype="mixed_bfloat16")
    assert keras.backend.standardize_dtype(bf16(x).dtype) == "float32"


def hf_deit(image_size=32, seed=0):
    config = transformers.DeiTConfig(
        hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP,
        image_size=image_size, patch_size=PATCH, num_labels=CLASSES, layer_norm_eps=1e-6,
        hidden_act="gelu", attn_implementation="eager")
    model = transformers.DeiTForImageClassificationWithTeacher(config).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "position" in name else 0.1
            value = (1 + 0.2 * rng.standard_normal(p.shape)) if (
                "layernorm" in name and name.endswith("weight")) else scale * rng.standard_normal(
                p.shape)
            p.copy_(torch.from_numpy(value.astype(np.float32)))
    return model


def hf_logits(model, pixels):
    """Hugging Face DeiT on ImageNet-normalised pixels (what its processor does)."""
    mean = np.array([0.485, 0.456, 0.406], np.float32) * 255
    std = np.array([0.229, 0.224, 0.225], np.float32) * 255
    x = (pixels.astype(np.float32) - mean) / std
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2)).logits.numpy()


def timm_layout(hf_state):
    """The same weights under timm's deit_*_distilled names (qkv fused, as timm stores them)."""
    sd, out = {k: v.numpy() for k, v in hf_state.items()}, {}
    out["cls_token"] = sd["deit.embeddings.cls_token"]
    out["dist_token"] = sd["deit.embeddings.distillation_token"]
    out["pos_embed"] = sd["deit.embeddings.position_embeddings"]
    out["patch_embed.proj.weight"] = sd["deit.embeddings.patch_embeddings.projection.weight"]
    out["patch_embed.proj.bias"] = sd["deit.embeddings.patch_embeddings.projection.bias"]
    for i in range(DEPTH):
        hf = next(p for p in (f"deit.encoder.layer.{i}.", f"deit.layers.{i}.")
                  if any(k.startswith(p) for k in sd))
        names = {k[len(hf):]: v for k, v in sd.items() if k.startswith(hf)}

        def get(*candidates):
            return next(names[c] for c in candidates if c in names)

        t = f"blocks.{i}."
        for part, hf_v4, hf_v5 in (("weight", "weight", "weight"), ("bias", "bias", "bias")):
            out[t + f"attn.qkv.{part}"] = np.concatenate([
                get(f"attention.attention.{q}.{hf_v4}", f"attention.{q[0]}_proj.{hf_v5}")
                for q in ("query", "key", "value")])
            out[t + f"attn.proj.{part}"] = get(f"attention.output.dense.{part}",
                                               f"attention.o_proj.{part}")
            out[t + f"norm1.{part}"] = get(f"layernorm_before.{part}")
            out[t + f"norm2.{part}"] = get(f"layernorm_after.{part}")
            out[t + f"mlp.fc1.{part}"] = get(f"intermediate.dense.{part}", f"mlp.fc1.{part}")
            out[t + f"mlp.fc2.{part}"] = get(f"output.dense.{part}", f"mlp.fc2.{part}")
    out["norm.weight"], out["norm.bias"] = sd["deit.layernorm.weight"], sd["deit.layernorm.bias"]
    out["head.weight"], out["head.bias"] = sd["cls_classifier.weight"], sd["cls_classifier.bias"]
    out["head_dist.weight"] = sd["distillation_classifier.weight"]
    out["head_dist.bias"] = sd["distillation_classifier.bias"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


@pytest.mark.parametrize("layout", ["hf_safetensors", "timm_state_dict"])
def test_deit_checkpoints_match_hugging_face_within_1e5(layout, tmp_path):
    from safetensors.torch import save_file

    peer = hf_deit()
    pixels = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    expected = hf_logits(peer, pixels)
    if layout == "hf_safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in peer.state_dict().items()}, str(path))
    else:
        path = tmp_path / "deit_tiny_distilled_patch16_224.pth"
        torch.save(timm_layout(peer.state_dict()), path)
    model = keras_vit.build(TINY, image_size=32, num_classes=CLASSES, weights=str(path))
    assert model.distilled and model.normalization.name == "imagenet" and model.gelu == "erf"
    got = keras.ops.convert_to_numpy(model(model.preprocess(pixels)))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # Strict: a distilled checkpoint does not load into a plain ViT without saying why.
    with pytest.raises(keras_vit.errors.CheckpointError, match="distilled DeiT checkpoint"):
        keras_vit.build(TINY, image_size=32, num_classes=CLASSES, distilled=False,
                        weights=str(path))
    # Another resolution: the position table (both leading tokens kept) is resampled.
    bigger = keras_vit.build(TINY, image_size=64, num_classes=CLASSES, weights=str(path))
    assert bigger.patch_encoder.pos_embedding.shape == (1, 16 + 2, D)
    # Hub files beside the weights name the preprocessing (Hugging Face's processor config).
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    assert keras_vit.build(TINY, image_size=32, num_classes=CLASSES,
                           weights=str(path)).normalization.name == "vit"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_with_a_teacher_hard_and_soft(tmp_path, capsys):
    from keras_vit import cli
    from keras_vit.training.config import TrainConfig

    common = dict(data="digits", variant="DeiT-Ti/4", image_size=16, depth=1, epochs=2,
                  batch_size=64, export=False, verbose=0, jit_compile="off", seed=1)
    # A teacher the command trains first (kept in the run folder), hard distillation.
    hard = keras_vit.train(TrainConfig(out=str(tmp_path / "hard"), teacher="resnet",
                                       distillation="hard", **common))
    config = json.loads((tmp_path / "hard" / "config.json").read_text())
    # A teacher worth learning from after 42 steps (stale batch statistics gave ~20%; 0.80
    # with TensorFlow's default threads, 0.799 with one).
    assert config["distillation"] == "hard" and config["teacher_test_accuracy"] > 0.7
    assert (tmp_path / "hard" / "teacher.keras").is_file()
    assert 0.0 <= hard.test_accuracy <= 1.0 and len(hard.history["loss"]) == 2
    student = keras_vit.load_model(tmp_path / "hard" / "model.keras")
    assert student.distilled and isinstance(student, keras_vit.ViT)  # the student alone
    # Its exports answer the mean of both heads (verified against Keras, which returns it).
    pixels = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3)).astype(np.uint8)
    report = keras_vit.export_model(student, tmp_path / "exported", class_names=list("0123456789"),
                                    test_images=pixels, tflite_variants=("float32",))
    assert report.verified
    heads = keras_vit.distillation_model(student)(student.preprocess(pixels))
    mean = (keras.ops.convert_to_numpy(heads["class"])
            + keras.ops.convert_to_numpy(heads["distillation"])) / 2
    import tensorflow as tf

    served = tf.saved_model.load(str(tmp_path / "exported" / "1")).signatures[
        "predict_images_uint8"](images=tf.constant(pixels))["probabilities"].numpy()
    np.testing.assert_allclose(served, keras.ops.convert_to_numpy(
        keras.ops.softmax(mean, axis=-1)), atol=1e-5)
    # The same teacher from a file, soft distillation, from the command line.
    assert cli.main(["train", "--out", str(tmp_path / "soft"), "--variant", "DeiT-Ti/4",
                     "--image-size", "16", "--depth", "1", "--epochs", "1", "--batch-size", "64",
                     "--no-export", "--verbose", "0", "--jit-compile", "off",
                     "--teacher", str(tmp_path / "hard" / "teacher.keras"),
                     "--distillation", "soft"]) == 0
    assert "test accuracy:" in capsys.readouterr().out
    # A teacher for other classes is refused before training.
    three = keras_vit.build("Ti/4", image_size=16, depth=1, num_classes=3)
    three.save(tmp_path / "three.keras")
    with pytest.raises(keras_vit.errors.ConfigError, match="has 3 outputs but digits has 10"):
        keras_vit.train(TrainConfig(out=str(tmp_path / "bad"), teacher=str(
            tmp_path / "three.keras"), distillation="hard", **common))
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_distillation_under_mirrored_resumes_after_a_kill(tmp_path):
    """A DeiT run with a teacher it trains first, on two replicas (MirroredStrategy on two
    logical CPUs), killed with SIGKILL mid-epoch and started again, ends with the weights of
    the same run never killed, given that teacher as a file (the student's random numbers do
    not depend on where its teacher came from); the teacher is trained once."""
    import os
    import re
    import sys

    from tests import processes
    from tests.conftest import kill_at_a_mid_epoch_backup

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    args = ["--variant", "DeiT-Ti/4", "--image-size", "8", "--depth", "1", "--epochs", "2",
            "--batch-size", "32", "--train-fraction", "0.5", "--checkpoint-every", "7",
            "--distillation", "hard", "--strategy", "mirrored",
            "--cpu-devices", "2", "--no-export", "--verbose", "0"]

    def command(out, teacher="resnet"):
        return [sys.executable, "-m", "keras_vit.cli", "train", "--out", str(out), *args,
                "--teacher", str(teacher)]

    out = tmp_path / "killed"
    kill_at_a_mid_epoch_backup(command(out), out, env)
    teacher_time = (out / "teacher.keras").stat().st_mtime
    resumed = processes.run(command(out), env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "Restored the backup at step" in resumed.stdout
    assert (out / "teacher.keras").stat().st_mtime == teacher_time  # not trained again
    # In a fresh interpreter, with its own hash seed (see tests/processes.py).
    whole = processes.run(command(tmp_path / "whole", out / "teacher.keras"), env=env,
                          timeout=600, fresh=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "2 replica" in whole.stdout or "2 replica" in whole.stderr

    def fingerprint(stdout):
        return re.search(r"weights fingerprint: (\w+)", stdout).group(1)

    assert fingerprint(resumed.stdout) == fingerprint(whole.stdout)
    config = json.loads((out / "config.json").read_text())
    assert config["replicas"] == 2 and config["teacher_test_accuracy"] > 0.5
