"""Bad input, everywhere: each wrong type or value, impossible size, damaged or odd file, empty or
single-class folder and non-finite setting gets a clear error in the project's words (the
problem and the fix; never a traceback or TensorFlow's op text) and leaves nothing on disk."""

import math
import zipfile

import numpy as np
import pytest

import keras_vit
from keras_vit import cli
from keras_vit.errors import CheckpointError, ConfigError, DataError, NotAnImageError
from keras_vit.variants import Variant

TINY = Variant("t", width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8)
FOREIGN = ("Traceback", "Op:", "function_node", "pickled", "allow_pickle", "Errno")


def png_bytes(seed=0, size=16):
    import tensorflow as tf

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return tf.io.encode_png(pixels).numpy()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Damaged and odd files of each format, and a good model to load."""
    root = tmp_path_factory.mktemp("bad")
    good = keras_vit.build(TINY, image_size=16, num_classes=2)
    good.save(root / "good.keras")
    (root / "text.npz").write_text("these are not the weights you are looking for\n")
    with zipfile.ZipFile(root / "empty.npz", "w"):
        pass
    (root / "cut.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 20)
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (root / "cut.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    (root / "weights.txt").write_text("1 2 3")
    (root / "damaged.keras").write_bytes((root / "good.keras").read_bytes()[:300])
    (root / "text.keras").write_text("not a model")
    (root / "garbage.tflite").write_bytes(b"TFL3 but not really a flatbuffer" * 4)
    (root / "garbage.onnx").write_bytes(b"\x08\x07garbage")
    (root / "saved_model").mkdir()
    (root / "saved_model" / "saved_model.pb").write_bytes(b"not a protobuf")
    image = png_bytes()
    (root / "photo.png").write_bytes(image)
    (root / "cut.png").write_bytes(image[:40])
    (root / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 30)
    (root / "cut.gif").write_bytes(b"GIF89a\x10\x00")
    (root / "cut.bmp").write_bytes(b"BM" + b"\x00" * 10)
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("a text file with an image's name")
    (root / "a_file").write_text("a file, not a folder")
    return root


def folder(root, layout):
    """An image folder from {relative path: bytes}."""
    for name, data in layout.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


# --- the Python API ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_channels=0), ValueError, "num_channels must be a positive integer, got 0"),
    (dict(image_size=0), ValueError, "image_size must be a positive int"),
    (dict(image_size=(224,)), ValueError, r"image_size must be a positive int or \(height"),
    (dict(image_size=225), ValueError, "225x225 is not divisible by the patch size 16.*224"),
    (dict(num_classes=0), ValueError, "num_classes must be a positive integer.*include_top"),
    (dict(num_classes=2.5), ValueError, "num_classes must be a positive integer, got 2.5"),
    (dict(dropout_rate=1.5), ValueError, r"dropout_rate must be a number in \[0, 1\)"),
    (dict(drop_path_rate=math.nan), ValueError, r"drop_path_rate must be a number in \[0, 1\)"),
    (dict(pooling="max"), ValueError, "pooling must be one of"),
    (dict(gelu="relu"), ValueError, "gelu must be one of"),
    (dict(depth=0), ValueError, "depth must be a positive integer"),
    (dict(patch_size=0), ValueError, "patch_size must be a positive integer"),
    (dict(classifier_activation="sparkle"), ValueError,
     "classifier_activation 'sparkle' is not a Keras activation.*softmax"),
    (dict(normalization="weird"), ValueError, "normalization must be one of"),
    (dict(dtype="float8"), ValueError, "dtype 'float8' is not a Keras dtype policy.*mixed_bfloat16"),
])
def test_build_refuses_what_cannot_be_a_vit(kwargs, error, message):
    with pytest.raises(error, match=message):
        keras_vit.build("B/16", **kwargs)


def test_build_refuses_unknown_variants_and_types():
    with pytest.raises(ValueError, match="Unknown ViT variant 'Q/16'.*B/16"):
        keras_vit.build("Q/16")
    with pytest.raises(TypeError, match="variant must be a string such as 'B/16'"):
        keras_vit.build(16)


@pytest.mark.parametrize("images, kwargs, message", [
    (np.zeros((16, 16)), {}, r"preprocess takes images shaped \(height, width, channels\)"),
    (np.zeros(5), {}, r"got shape \(5,\)"),
    (np.zeros((2, 16, 16, 3)), dict(image_size=-1), "image_size must be a positive int"),
    (np.zeros((2, 16, 16, 3)), dict(normalization=[1, 2]), "normalization must be one of"),
])
def test_preprocess_refuses_what_is_not_an_image_batch(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_vit.preprocess(images, **kwargs)


@pytest.mark.parametrize("name, message", [
    ("text.npz", r"text\.npz is not an \.npz archive \(a zip of \.npy arrays\)"),
    ("empty.npz", "empty.npz"),
    ("cut.npz", r"cut\.npz is not a readable \.npz file \(truncated or corrupt"),
    ("garbage.safetensors", "garbage.safetensors"),
    ("cut.weights.h5", r"cut\.weights\.h5 is not a readable Keras weights file"),
    ("weights.txt", r"Unknown checkpoint format.*\.npz, \.safetensors"),
])
def test_damaged_checkpoints_are_named(files, name, message):
    with pytest.raises((CheckpointError, OSError)) as err:
        keras_vit.build(TINY, image_size=16, num_classes=2, weights=str(files / name))
    assert __import__("re").search(message, str(err.value)), str(err.value)
    assert not any(word in str(err.value) for word in FOREIGN), str(err.value)


@pytest.mark.parametrize("name, message", [
    ("damaged.keras", r"damaged\.keras is not a readable \.keras file"),
    ("text.keras", r"text\.keras is not a readable \.keras file"),
    ("missing.keras", r"missing\.keras: no such file"),
])
def test_damaged_model_files_are_named(files, name, message):
    with pytest.raises((ValueError, OSError), match=message) as err:
        keras_vit.load_model(files / name)
    assert not any(word in str(err.value) for word in FOREIGN), str(err.value)


@pytest.mark.parametrize("name, message", [
    ("garbage.tflite", r"garbage\.tflite is not a TFLite model keras-vit can run"),
    ("damaged.keras", r"damaged\.keras is not a readable \.keras file"),
    ("saved_model", r"saved_model is not a SavedModel TensorFlow can load"),
])
def test_predictor_names_a_damaged_model(files, name, message):
    from keras_vit.predict import Predictor

    with pytest.raises(ValueError, match=message) as err:
        Predictor(files / name)
    assert not any(word in str(err.value) for word in FOREIGN), str(err.value)


@pytest.mark.parametrize("name, message", [
    ("cut.png", "damaged or truncated PNG data"), ("cut.jpg", "damaged or truncated JPEG data"),
    ("cut.gif", "damaged or truncated GIF data"), ("cut.bmp", "damaged or truncated BMP data"),
    ("empty.jpg", "an empty file"), ("notes.png", "not an image"),
])
def test_damaged_images_are_named(files, name, message):
    from keras_vit.images import read_image_file

    with pytest.raises(NotAnImageError, match=message) as err:
        read_image_file(files / name)
    assert str(err.value).startswith(str(files / name))


@pytest.mark.parametrize("changes, message", [
    (dict(learning_rate=math.nan), "--learning-rate must be a finite number"),
    (dict(learning_rate=0.0), "--learning-rate must be > 0"),
    (dict(weight_decay=math.inf), "--weight-decay must be a finite number"),
    (dict(epochs=0), "--epochs must be >= 1"),
    (dict(batch_size=2.5), "--batch-size must be a finite whole number"),
    (dict(image_size="abc"), "--image-size 'abc' is not a size"),
    (dict(validation_split=1.5), "--validation-split must be < 1"),
    (dict(label_smoothing=-0.1), "--label-smoothing must be >= 0"),
    (dict(schedule="step"), "--schedule must be one of cosine, linear"),
    (dict(micro_batches=0), "--micro-batches must be auto or a whole number >= 1"),
    (dict(distillation="hard"), "--distillation hard needs a --teacher"),
    (dict(teacher="runs/cnn"), "--teacher is given but --distillation is none"),
])
def test_training_settings_that_cannot_run_are_refused(changes, message):
    from keras_vit.training.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes).resolved()


def test_export_and_attention_refuse_what_does_not_fit(files, tmp_path):
    model = keras_vit.load_model(files / "good.keras")
    with pytest.raises(ValueError, match="a_file is a file: give a folder to export into"):
        keras_vit.export_model(model, files / "a_file", class_names=["a", "b"])
    plain = __import__("keras").Sequential([__import__("keras").Input((16, 16, 3)),
                                            __import__("keras").layers.Flatten()])
    with pytest.raises(TypeError, match="attention_map needs a keras_vit.ViT"):
        keras_vit.attention_map(plain, np.zeros((16, 16, 3), np.uint8))


# --- the command line ------------------------------------------------------------------------

def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("flags, message", [
    (["--learning-rate", "nan"], "argument --learning-rate: expected a finite number"),
    (["--epochs", "0"], "argument --epochs: expected a whole number of at least 1"),
    (["--batch-size", "-1"], "argument --batch-size: expected a whole number of at least 1"),
    (["--micro-batches", "two"], "argument --micro-batches"),
    (["--precision", "float8"], "argument --precision: invalid choice"),
])
def test_cli_flags_of_the_wrong_kind_stop_at_once(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--out", str(tmp_path / "run"), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "0"], "--image-size '0' is not a size"),
    (["--variant", "Q/16"], r"Unknown ViT variant 'Q/16'.*--patch-size"),
    (["--validation-split", "1.5"], "--validation-split must be < 1"),
    (["--teacher", "runs/cnn"], "--teacher is given but --distillation is none"),
    (["--data", "mnist"], "Unknown --data 'mnist'"),
])
def test_cli_settings_that_cannot_run_are_one_line(flags, message, capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), *flags)
    assert code == 2 and __import__("re").search(message, err), err
    assert err.startswith("keras-vit train: error:") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_data_folders_that_cannot_train(tmp_path, capsys):
    image = png_bytes()
    cases = {
        "missing": (None, "does not exist"),
        "one_class": ({"cat/a.png": image, "cat/b.png": image}, "has 1 class sub-folder"),
        "empty_class": ({"cat/a.png": image, "cat/b.png": image, "dog/.keep": b""},
                        "class folder dog/ holds no readable image"),
        "all_broken": ({"cat/a.png": image[:30], "dog/b.png": b"nope"},
                       "No readable images"),
        "broken_class": ({"cat/a.png": image, "dog/b.png": b"nope"},
                         "class folder dog/ holds no readable image"),
    }
    for name, (layout, message) in cases.items():
        data = tmp_path / name
        if layout is not None:
            folder(data, layout)
        out = tmp_path / "runs" / name
        code, err = run_cli(capsys, "train", "--data", f"folder:{data}", "--out", str(out),
                            "--epochs", "1", "--no-export")
        assert code == 2 and message in err, (name, err)
        assert not any(word in err for word in FOREIGN), (name, err)
        assert not out.exists(), name  # nothing left behind
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_out_onto_a_file_and_damaged_weights(files, tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--out", str(files / "a_file"), "--epochs", "1")
    assert code == 2 and "--out" in err and "is a file" in err and "Errno" not in err
    code, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--variant", "Ti/16",
                        "--image-size", "16", "--patch-size", "8", "--weights",
                        str(files / "text.npz"))
    assert code == 2 and "is not an .npz archive" in err and "pickled" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["predict", "{files}/garbage.tflite", "{files}/photo.png"], "is not a TFLite model"),
    (["predict", "{files}/damaged.keras", "{files}/photo.png"], "is not a readable .keras file"),
    (["predict", "{files}/garbage.onnx", "{files}/photo.png"], "is not an ONNX model"),
    (["predict", "{files}/good.keras", "{files}/cut.png"], "damaged or truncated PNG data"),
    (["export", "{files}/damaged.keras", "--out", "{tmp}/ex"], "is not a readable .keras file"),
    (["export", "{files}/good.keras", "--out", "{files}/a_file"], "is a file: give a folder"),
    (["export", "{files}/a_file", "--out", "{tmp}/ex"], "is not a .keras file or a run folder"),
    (["attention-map", "{files}/photo.png", "--model", "{files}/text.npz"],
     "is not an .npz archive"),
    (["attention-map", "{files}/photo.png", "--model", "{files}/damaged.keras"],
     "is not a readable .keras file"),
])
def test_cli_damaged_models_and_files_are_one_line(files, tmp_path, capsys, argv, message):
    argv = [a.format(files=files, tmp=tmp_path) for a in argv]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and message in err, err
    assert err.splitlines()[0].startswith(f"keras-vit {argv[0]}: ")
    assert not any(word in err for word in FOREIGN), err
    assert not (tmp_path / "ex").exists()


def test_variants_refuses_impossible_sizes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["variants", "--image-size", "0"])
    assert "expected a whole number of at least 1" in capsys.readouterr().err


def test_a_saved_model_fed_garbage_names_the_input(files, tmp_path):
    import tensorflow as tf

    model = keras_vit.load_model(files / "good.keras")
    keras_vit.export_model(model, tmp_path / "sm", class_names=["a", "b"],
                           formats=("savedmodel",), verify=False)
    served = tf.saved_model.load(str(tmp_path / "sm" / "1")).signatures["serving_default"]
    for garbage in (b"", b"GIF89a", (files / "cut.png").read_bytes()):
        with pytest.raises(tf.errors.InvalidArgumentError):
            served(image_bytes=tf.constant([png_bytes(), garbage]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes\[1\] is not a "
                                                             "decodable image"):
        served(image_bytes=tf.constant([png_bytes(), b"plain text"]))
