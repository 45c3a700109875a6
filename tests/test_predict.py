"""`keras-vit predict` on SavedModel, TFLite, ONNX and .keras models, files and folders."""

import json

import numpy as np
import pytest
import tensorflow as tf

from keras_vit import cli
from keras_vit.predict import NotAnImageError, Predictor, collect_images
from tests.test_export import (CLASS_NAMES, HAVE_ONNX, SIZE, color_images, encode_bmp,
                               keras_probabilities, shared_export)

# Every test here reads one full export (made once per session: shared_export).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    shared = shared_export(tmp_path_factory)  # the export test_export.py checks
    root, model = tmp_path_factory.mktemp("predict"), shared["model"]
    images, _ = color_images(4, seed=11)
    folder = root / "photos"
    (folder / "more").mkdir(parents=True)
    big = np.repeat(np.repeat(images[2], 2, axis=0), 3, axis=1)  # 64 x 96: resized
    files = {
        folder / "a.png": tf.io.encode_png(images[0]).numpy(),
        folder / "b.JPG": tf.io.encode_jpeg(images[1], quality=95).numpy(),
        folder / "more" / "c.png": tf.io.encode_png(big).numpy(),
        folder / "more" / "d.bmp": encode_bmp(images[3]),
    }
    for path, data in files.items():
        path.write_bytes(data)
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    paths = sorted(files)
    decoded = [tf.io.decode_image(files[p], channels=3).numpy() for p in paths]
    expected = np.concatenate([keras_probabilities(model, d[None]) for d in decoded])
    return dict(root=root, run=shared["run"], out=shared["out"], folder=folder, paths=paths,
                expected=expected)


def test_collect_images_walks_folders_and_keeps_explicit_files(setup):
    found = collect_images([setup["folder"]])
    assert found == setup["paths"]  # sorted, recursive, any case of extension, no .txt
    assert collect_images([setup["paths"][1]]) == [setup["paths"][1]]


@pytest.mark.parametrize("model_path, kind", [
    ("out/1", "savedmodel"), ("out", "savedmodel"), ("out/tiny_float32.tflite", "tflite"),
    pytest.param("out/tiny.onnx", "onnx", marks=pytest.mark.skipif(
        not HAVE_ONNX, reason="needs the onnx extra: pip install -e '.[onnx]'")),
    ("run/model.keras", "keras"), ("run", "keras")])
def test_every_model_kind_gives_the_keras_answers(setup, model_path, kind):
    base, _, rest = model_path.partition("/")
    path = setup[base] / rest if rest else setup[base]
    predictor = Predictor(path)
    assert predictor.kind == kind
    results = predictor.predict(setup["paths"], top_k=5)
    expected = setup["expected"]
    assert len(results) == 4
    assert all(len(top) == 3 for top in results)  # top-5 of 3 classes
    assert_keras_answers(results, expected)


def assert_keras_answers(results, expected):
    """Each image's (label, score) list is the Keras probabilities' classes in order."""
    for top, probs in zip(results, expected, strict=True):
        order = np.argsort(-probs)
        assert [label for label, _ in top] == [CLASS_NAMES[i] for i in order]
        assert np.abs(np.array([s for _, s in top]) - probs[order]).max() <= 1e-4


def test_many_images_run_full_batches_compiled_with_the_same_answers(setup, monkeypatch):
    # Past COMPILE_FROM_IMAGES images a Keras model's full batches go through its compiled
    # predict function (1.3-2x faster than eager calls once compiled); the smaller last
    # batch stays eager, as does everything below the threshold.
    from keras_vit import predict

    monkeypatch.setattr(predict, "COMPILE_FROM_IMAGES", 8)  # the fixture has 4 images
    predictor = Predictor(setup["run"])
    compiled_batches = []
    run_compiled = predictor._model.predict_on_batch
    monkeypatch.setattr(predictor._model, "predict_on_batch",
                        lambda x: compiled_batches.append(len(x)) or run_compiled(x))
    predictor.predict(setup["paths"], batch_size=5)
    assert compiled_batches == []
    results = predictor.predict(setup["paths"] * 3, top_k=5, batch_size=5)  # 5, 5, 2
    assert compiled_batches == [5, 5]
    assert_keras_answers(results, np.concatenate([setup["expected"]] * 3))


def test_full_integer_tflite_runs_with_uint8_input(setup):
    predictor = Predictor(setup["out"] / "tiny_int8.tflite")
    assert predictor._model.input_dtype == np.uint8
    results = predictor.predict(setup["paths"])
    top1 = [top[0][0] for top in results]
    want = [CLASS_NAMES[i] for i in setup["expected"].argmax(1)]
    assert sum(a == b for a, b in zip(top1, want)) >= 2
    for top in results:
        scores = [s for _, s in top]
        assert scores == sorted(scores, reverse=True) and 0.9 < sum(scores) < 1.1


def test_cli_prints_top5_with_class_names(setup, capsys):
    assert cli.main(["predict", str(setup["out"] / "1"), str(setup["folder"])]) == 0
    out = capsys.readouterr().out
    assert "SavedModel" in out
    blocks = out.strip().split("\n\n")[1:]
    assert [b.splitlines()[0] for b in blocks] == [str(p) for p in setup["paths"]]
    for block, probs in zip(blocks, setup["expected"]):
        lines = block.splitlines()[1:]
        assert [line.split()[0] for line in lines] == ["1.", "2.", "3."]
        assert lines[0].split()[1] == CLASS_NAMES[int(probs.argmax())]
        assert float(lines[0].split()[2].rstrip("%")) == pytest.approx(100 * probs.max(),
                                                                        abs=0.01)


def test_cli_json_and_top_k(setup, capsys):
    path = setup["out"] / "tiny_float32.tflite"
    assert cli.main(["predict", str(path), str(setup["paths"][0]), "--json", "--top-k", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and rows[0]["image"] == str(setup["paths"][0])
    assert [r["label"] for r in rows[0]["top_k"]] == \
        [CLASS_NAMES[i] for i in np.argsort(-setup["expected"][0])[:2]]


@pytest.mark.parametrize("model", ["tiny_float32.tflite", "1"])
def test_labels_file_overrides(setup, capsys, tmp_path, model):
    (tmp_path / "names.txt").write_text("R\nG\nB\n")
    assert cli.main(["predict", str(setup["out"] / model),
                     str(setup["paths"][0]), "--labels", str(tmp_path / "names.txt")]) == 0
    best = "RGB"[int(setup["expected"][0].argmax())]
    assert f"1. {best} " in capsys.readouterr().out


def test_unreadable_files_are_named_and_the_others_predicted(setup, capsys, tmp_path):
    # One damaged photo in a folder must not cost the predictions for the rest.
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(setup["folder"], folder)
    truncated = folder / "more" / "b2.png"
    truncated.write_bytes(setup["paths"][0].read_bytes()[:70])
    notes = setup["folder"] / "notes.txt"  # named explicitly: read, and refused
    model = str(setup["out"] / "tiny_float32.tflite")
    assert cli.main(["predict", model, str(folder), str(notes), "--json"]) == 1
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    good = [folder / p.relative_to(setup["folder"]) for p in setup["paths"]]
    assert [r["image"] for r in rows] == [str(p) for p in sorted(good + [truncated])] + \
        [str(notes)]  # in the order given, folders sorted
    errors = {r["image"]: r["error"] for r in rows if "error" in r}
    predicted = [r for r in rows if "top_k" in r]
    assert [r["image"] for r in predicted] == [str(p) for p in good]
    for row, probs in zip(predicted, setup["expected"]):
        assert row["top_k"][0]["label"] == CLASS_NAMES[int(probs.argmax())]
    assert f"{truncated}: damaged or truncated PNG data" in errors[str(truncated)]
    assert f"{notes}: not an image (expected a JPEG, PNG, BMP or GIF file)" in errors[str(notes)]
    assert f"skipped {truncated}: damaged or truncated PNG data" in captured.err
    assert "2 of 6 files could not be read" in captured.err
    assert cli.main(["predict", model, str(folder)]) == 1  # text: the 4 others, in order
    blocks = capsys.readouterr().out.strip().split("\n\n")[1:]
    assert [b.splitlines()[0] for b in blocks] == [str(p) for p in good]


def test_errors_are_clear(setup, capsys, tmp_path):
    model = str(setup["out"] / "tiny_float32.tflite")
    notes = setup["folder"] / "notes.txt"
    assert cli.main(["predict", model, str(notes), str(notes), "--json"]) == 2  # nothing to run
    captured = capsys.readouterr()
    assert "no image could be read" in captured.err
    assert f"{notes}: not an image (expected a JPEG, PNG, BMP or GIF file)" in captured.err
    assert [json.loads(line)["image"] for line in captured.out.splitlines()] == [str(notes)] * 2
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(setup["paths"][0].read_bytes()[:70])
    assert cli.main(["predict", model, str(truncated)]) == 2
    assert f"{truncated}: damaged or truncated PNG data" in capsys.readouterr().err
    (tmp_path / "two.txt").write_text("R\nG\n")  # the model has 3 classes
    assert cli.main(["predict", model, str(setup["paths"][0]),
                     "--labels", str(tmp_path / "two.txt")]) == 2
    assert (f"--labels {tmp_path / 'two.txt'} names 2 classes but the model has 3: give one "
            "name a line, in class order") in capsys.readouterr().err
    copy = tmp_path / "copy"  # names from beside the model: the fix is --labels
    copy.mkdir()
    (copy / "m.tflite").write_bytes((setup["out"] / "tiny_float32.tflite").read_bytes())
    (copy / "config.json").write_text(json.dumps({"class_names": ["R", "G"]}))
    assert cli.main(["predict", str(copy / "m.tflite"), str(setup["paths"][0])]) == 2
    assert (f"{copy / 'config.json'} names 2 classes but the model has 3: pass --labels with "
            "one name a line") in capsys.readouterr().err
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert cli.main(["predict", model, str(tmp_path / "empty.jpg")]) == 2
    assert "empty.jpg: an empty file" in capsys.readouterr().err
    assert cli.main(["predict", model, str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such file or folder" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert cli.main(["predict", model, str(tmp_path / "nothing")]) == 2
    assert "folder with no JPEG, PNG, BMP or GIF files" in capsys.readouterr().err
    assert cli.main(["predict", str(notes), str(setup["paths"][0])]) == 2
    assert "is not a model keras-vit can run" in capsys.readouterr().err
    with pytest.raises(NotAnImageError):
        Predictor(model).predict([notes])


def test_a_head_that_applies_softmax_is_not_softmaxed_again(tmp_path):
    # build(classifier_activation="softmax") outputs probabilities already: predict and the
    # export's inference graph must pass them through, not flatten them with a second softmax.
    import keras

    import keras_vit
    from keras_vit.export._graph import InferenceModel

    model = keras_vit.build("Ti/16", image_size=SIZE, patch_size=8, num_classes=3, depth=1,
                            classifier_activation="softmax")
    head = model.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 1, head.kernel.shape))
    model.save(tmp_path / "softmax.keras")
    images, _ = color_images(4, seed=3)
    expected = np.asarray(model(keras_vit.preprocess(images), training=False))
    assert expected.max() > 0.6  # peaked: a second softmax would flatten it towards 1/3
    got = Predictor(tmp_path / "softmax.keras").probabilities(list(images))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    graph = InferenceModel(model, (SIZE, SIZE))(keras.ops.convert_to_tensor(images, "float32"))
    np.testing.assert_allclose(np.asarray(graph), expected, atol=1e-5)


def test_counts_must_be_positive(setup, capsys):
    model = str(setup["out"] / "tiny_float32.tflite")
    with pytest.raises(SystemExit):
        cli.main(["predict", model, str(setup["paths"][0]), "--top-k", "0"])
    assert "--top-k: expected a whole number of at least 1, got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        Predictor(model).predict(setup["paths"][:1], top_k=-1)


def test_tflite_labels_come_from_its_metadata_and_old_files_still_predict(setup, tmp_path):
    from keras_vit.export._metadata import labels_in

    alone = tmp_path / "alone"
    alone.mkdir()  # no labels.txt beside it: the file's own metadata names the classes
    content = (setup["out"] / "tiny_float32.tflite").read_bytes()
    assert labels_in(content) == CLASS_NAMES
    (alone / "m.tflite").write_bytes(content)
    predictor = Predictor(alone / "m.tflite")
    assert predictor.class_names == CLASS_NAMES and "metadata" in predictor.class_names_source
    top = predictor.predict(setup["paths"][:2], top_k=1)
    assert all(label in CLASS_NAMES for (label, _), in top)
    # A file of keras-vit 0.1 (no metadata): predicts, names from labels.txt or class_N.
    old = tmp_path / "old"
    old.mkdir()
    legacy = without_metadata(content)
    assert labels_in(legacy) is None
    (old / "m.tflite").write_bytes(legacy)
    plain = Predictor(old / "m.tflite").predict(setup["paths"][:2], top_k=1)
    assert [s for (_, s), in plain] == pytest.approx([s for (_, s), in top], abs=1e-6)
    assert all(label.startswith("class_") for (label, _), in plain)
    (old / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    assert Predictor(old / "m.tflite").predict(setup["paths"][:2], top_k=1) == top


def without_metadata(content):
    """A .tflite file as keras-vit 0.1 wrote it: the converter's output, no TFLite Metadata."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    model.metadata = [m for m in model.metadata if m.name not in (b"TFLITE_METADATA",
                                                                  "TFLITE_METADATA")]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))  # no zip after it
