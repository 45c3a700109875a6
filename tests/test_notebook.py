"""The notebook path: a `ViT` with named parts, the paper's recipe from Python, `fit`, and a
verified export of any trained model (`export_model`, `keras-vit export FILE.keras`), also of
files written by keras-vit 0.1."""

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit.variants import Variant

LEGACY = Path(__file__).parent / "data" / "legacy_v0_1"  # written by keras-vit 0.1 (its script)
TINY = Variant("tiny", width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=8)
FAST = dict(formats=("savedmodel", "tflite"), tflite_variants=("float32",))


def colour_data(n, seed, size=16):
    """Images whose class is their dominant colour channel."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.integers(0, 120, (n, size, size, 3))
    x[np.arange(n), :, :, labels] += 120
    return x.astype(np.uint8), labels


@pytest.fixture(scope="module")
def fitted():
    """A ViT fitted in a notebook's way: build, compile with the recipe, fit."""
    keras.utils.set_random_seed(0)
    model = keras_vit.build(TINY, image_size=16, num_classes=3, gelu="erf")
    images, labels = colour_data(96, seed=0)
    model.compile(optimizer=keras_vit.recipes.finetune_optimizer(model, total_steps=30,
                                                                 learning_rate=0.05),
                  loss=keras_vit.recipes.loss(sparse=True), metrics=["accuracy"])
    history = model.fit(model.preprocess(images), labels, batch_size=32, epochs=10, verbose=0)
    return model, history


def test_vit_is_a_functional_model_with_named_parts(fitted):
    model, _ = fitted
    assert isinstance(model, keras_vit.ViT) and isinstance(model, keras.Model)
    assert model.patches.patch_size == 8 and model.patch_encoder.width == 16
    assert len(model.blocks) == 2 and model.blocks[-1].num_heads == 2
    assert model.head.units == 3 and model.pre_logits is None and model.head_dist is None
    assert (model.variant, model.image_size, model.grid) == (TINY, (16, 16), (2, 2))
    assert model.normalization.name == "vit" and model.gelu == "erf"
    # The parts are the model's layers, not copies.
    assert model.blocks[0] is model.get_layer("encoderblock_0")


def test_the_recipe_trains_in_a_notebook(fitted):
    model, history = fitted
    assert history.history["loss"][-1] < history.history["loss"][0]
    images, labels = colour_data(60, seed=1)
    predicted = np.argmax(model.predict(model.preprocess(images), verbose=0), axis=-1)
    assert np.mean(predicted == labels) > 0.8
    optimizer = model.optimizer
    assert isinstance(optimizer, keras_vit.optimizers.SGD) and optimizer.momentum == 0.9
    assert optimizer.global_clipnorm == 1.0


def test_pretrain_optimizer_is_the_papers():
    model = keras_vit.build(TINY, image_size=16, num_classes=3)
    optimizer = keras_vit.recipes.pretrain_optimizer(model, total_steps=100)
    optimizer.build(model.trainable_variables)
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.weight_decay) == (0.9, 0.999, 0.1)
    decayed = {v.path for v in model.trainable_variables if optimizer._use_weight_decay(v)}
    assert decayed == {v.path for v in model.trainable_variables if v.name.endswith("kernel")}
    schedule = optimizer.learning_rate  # the current value; the schedule itself:
    rates = [float(keras_vit.recipes.schedule(1e-3, 100)(s)) for s in (0, 2, 5, 52, 99)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3) and rates[4] < 1e-5
    assert float(schedule) >= 0
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        keras_vit.recipes.pretrain_optimizer(model, total_steps=100, learning_rate=float("nan"))


def test_config_round_trip_and_dtype_policy():
    model = keras_vit.build(TINY, image_size=(16, 24), num_classes=3, representation_size=8,
                            dtype="mixed_bfloat16", normalization="imagenet")
    clone = keras_vit.ViT.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert clone.dtype_policy.name == "mixed_bfloat16"
    assert {block.dtype_policy.name for block in clone.blocks} == {"mixed_bfloat16"}
    assert clone.normalization == model.normalization
    clone.set_weights(model.get_weights())
    x = model.preprocess(colour_data(2, seed=3, size=24)[0][:, :16])
    out = clone(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"  # a float32 head
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out),
                               keras.ops.convert_to_numpy(model(x)), atol=1e-6)
    # Building set no global state.
    assert keras.config.dtype_policy().name == "float32"


def test_keras_vit_0_1_files_load_as_vit_with_the_same_answers():
    expected = np.load(LEGACY / "expected.npz")
    probe = keras_vit.preprocess(expected["probe"])
    notebook = keras_vit.load_model(LEGACY / "notebook_vit.keras")
    assert isinstance(notebook, keras_vit.ViT) and notebook.name == "vit_tiny"
    # The logits were saved on another CPU: its kernels may round the last bit differently
    # (1.2e-7 on an AVX-512 machine); any weight 1% off moves them by 1.4e-5 or more.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(notebook(probe)),
                               expected["notebook_logits"], rtol=0, atol=1e-6)
    from keras_vit.run_dir import load_run

    run = load_run(LEGACY / "run")
    assert isinstance(run.model, keras_vit.ViT) and run.model.variant.is_hybrid
    np.testing.assert_allclose(keras.ops.convert_to_numpy(run.model(probe)),
                               expected["run_logits"], rtol=0, atol=1e-6)
    # keras.saving.load_model gives the plain functional model of 0.1; the library's parts
    # then say how to get a ViT.
    plain = keras.saving.load_model(LEGACY / "notebook_vit.keras")
    with pytest.raises(TypeError, match="keras_vit.load_model"):
        keras_vit.feature_model(plain)


@pytest.mark.slow
def test_export_model_exports_a_notebook_model_verified(fitted, tmp_path):
    model, _ = fitted
    images, labels = colour_data(16, seed=5)
    report = keras_vit.export_model(model, tmp_path / "flowers", class_names=["r", "g", "b"],
                                    test_images=images, test_labels=labels, **FAST)
    assert report.checked_on == "held-out images" and report.num_test_images == 16
    assert report.result("savedmodel").max_abs_diff <= 1e-5
    assert report.result("tflite_float32").max_abs_diff <= 1e-4
    assert report.result("keras").accuracy == report.result("tflite_float32").accuracy > 0.8
    assert (tmp_path / "flowers" / "labels.txt").read_text() == "r\ng\nb\n"
    from keras_vit.predict import Predictor

    predictor = Predictor(tmp_path / "flowers" / "flowers_float32.tflite")
    decoded = [(b"", image) for image in images[:4]]
    assert [top[0][0] for top in predictor.predict_decoded(decoded, top_k=1)] == [
        "rgb"[i] for i in np.argmax(model.predict(model.preprocess(images[:4]), verbose=0), -1)]


@pytest.mark.slow
def test_export_model_without_images_verifies_on_made_up_ones_and_skips_int8(fitted, tmp_path):
    model, _ = fitted
    report = keras_vit.export_model(model, tmp_path / "m", class_names=["r", "g", "b"],
                                    formats=("tflite",), tflite_variants=("float32", "int8"))
    assert report.checked_on == "images made here" and report.num_test_images == 32
    assert [r.format for r in report.results] == ["keras", "tflite_float32"]
    assert any("made here" in note for note in report.notes)
    assert any("int8 file was skipped" in note for note in report.notes)
    assert report.result("tflite_float32").accuracy is None  # no labels: none claimed
    saved = json.loads((tmp_path / "m" / "report.json").read_text())
    assert saved["checked_on"] == "images made here"


@pytest.mark.slow
def test_an_untrained_head_is_warned_about(tmp_path, caplog):
    model = keras_vit.build(TINY, image_size=16, num_classes=3)  # zero head: constant outputs
    caplog.set_level("WARNING", logger="keras_vit")
    report = keras_vit.export_model(model, tmp_path / "zero", class_names=["a", "b", "c"],
                                    formats=("tflite",), tflite_variants=("float32",))
    assert any("barely vary" in note and "untrained" in note for note in report.notes)
    assert "barely vary" in caplog.text


@pytest.mark.parametrize("change, error, message", [
    (dict(class_names=None), ValueError, "needs class_names"),
    (dict(class_names=["a", "b"]), ValueError, "has 3 classes but 2 class names"),
    (dict(class_names="abc"), TypeError, "class_names must be a list"),
    (dict(version=0), ValueError, "version must be a positive integer"),
    (dict(test_images=np.zeros((2, 16, 16, 3), np.float32)), ValueError,
     "must be uint8 RGB images"),
    (dict(formats=("pickle",)), ValueError, "formats must be"),
])
def test_export_model_says_what_is_wrong(fitted, tmp_path, change, error, message):
    model, _ = fitted
    args = dict(class_names=["r", "g", "b"], **FAST)
    args.update(change)
    with pytest.raises(error, match=message):
        keras_vit.export_model(model, tmp_path / "bad", **args)
    assert not (tmp_path / "bad").exists()


def test_export_model_refuses_what_is_not_an_image_classifier(tmp_path):
    features = keras_vit.build(TINY, image_size=16, include_top=False)
    with pytest.raises(ValueError, match="include_top=False.*num_classes"):
        keras_vit.export_model(features, tmp_path / "f", class_names=["a"])
    tabular = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match=r"batch of RGB images \(batch, height, width, 3\)"):
        keras_vit.export_model(tabular, tmp_path / "t", class_names=["a", "b", "c"])


@pytest.mark.slow
def test_keras_file_exports_from_the_command_line(fitted, tmp_path, capsys):
    from keras_vit import cli

    model, _ = fitted
    model.save(tmp_path / "m.keras")
    (tmp_path / "labels.txt").write_text("red\ngreen\nblue\n")
    assert cli.main(["export", str(tmp_path / "m.keras"), "--out", str(tmp_path / "ex"),
                     "--labels", str(tmp_path / "labels.txt"), "--formats", "tflite",
                     "--tflite-variants", "float32"]) == 0
    assert (tmp_path / "ex" / "labels.txt").read_text() == "red\ngreen\nblue\n"
    assert "images made here" in capsys.readouterr().out  # the table says what it checked on
    # Without --labels: class_0.. and a warning saying how to name them.
    assert cli.main(["export", str(tmp_path / "m.keras"), "--out", str(tmp_path / "plain"),
                     "--formats", "tflite", "--tflite-variants", "float32"]) == 0
    assert "no --labels" in capsys.readouterr().err
    assert (tmp_path / "plain" / "labels.txt").read_text() == "class_0\nclass_1\nclass_2\n"
    (tmp_path / "two.txt").write_text("red\ngreen\n")
    assert cli.main(["export", str(tmp_path / "m.keras"), "--out", str(tmp_path / "bad"),
                     "--labels", str(tmp_path / "two.txt")]) == 2
    err = capsys.readouterr().err
    assert "names 2 classes but the model has 3" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_files_of_keras_vit_0_1_still_export(tmp_path):
    from keras_vit import cli

    run = tmp_path / "run"
    shutil.copytree(LEGACY / "run", run)
    assert cli.main(["export", str(run), "--out", str(tmp_path / "old_run"), *(
        "--formats savedmodel tflite --tflite-variants float32 int8".split())]) == 0
    report = json.loads((tmp_path / "old_run" / "report.json").read_text())
    assert {r["format"] for r in report["results"]} == {"keras", "savedmodel", "tflite_float32",
                                                        "tflite_int8"}
    assert cli.main(["export", str(LEGACY / "notebook_vit.keras"), "--out",
                     str(tmp_path / "old_file"), "--formats", "tflite", "--tflite-variants",
                     "float32"]) == 0
