"""Export: SavedModel (TF Serving), TFLite (LiteRT) and ONNX round trips on a small model.

One module-scoped export (all formats, verification on) serves most assertions; the
exact-erf GELU model goes through the CLI once.
"""

import base64
import contextlib
import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from keras_vit.export import ExportVerificationError, export_run, format_report
from keras_vit.run_dir import save_run
from tests import processes
from tests.conftest import randomize_weights

# Every test here reads one full export (made once per session: shared_export).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


CLASS_NAMES = ["red", "green", "blue"]
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnx", "onnxruntime"))
ONNX_FORMATS = ("onnx",) if HAVE_ONNX else ()
needs_onnx = pytest.mark.skipif(
    not HAVE_ONNX, reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
SIZE = 32
ALL_VARIANTS = ("float32", "float16", "dynamic_int8", "int8")


# --- a small "trained" run ------------------------------------------------------------------

def color_images(n, seed):
    """Noisy images whose class is the dominant colour channel."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.integers(0, 150, (n, SIZE, SIZE, 3))
    x[np.arange(n), :, :, labels] += rng.integers(40, 106, (n, 1, 1))
    return x.astype(np.uint8), labels


def keras_probabilities(model, pixels, image_size=(SIZE, SIZE)):
    logits = model(keras_vit.preprocess(np.asarray(pixels), image_size), training=False)
    return np.asarray(keras.ops.softmax(logits, axis=-1))


def make_run(path, gelu="tanh"):
    """A run folder with a 3-block Ti/16 (32x32, patch 8, 3 classes; the export treats every
    block alike, so 3 check what 12 would, in a quarter of the time) whose random encoder feeds a
    head fitted in closed form (ridge regression on the pooled features), so predictions
    vary with the image; dropout and stochastic depth are on, as after real training."""
    build_kwargs = dict(variant="Ti/16", image_size=SIZE, patch_size=8, num_classes=3, depth=3,
                        gelu=gelu, dropout_rate=0.1, drop_path_rate=0.1)
    model = keras_vit.build(**build_kwargs)
    randomize_weights(model)
    train, train_labels = color_images(64, seed=0)
    test, true_labels = color_images(24, seed=1)
    features = keras_vit.feature_model(model)(keras_vit.preprocess(train))["pooled"]
    features = np.asarray(features, dtype=np.float64)
    mean = features.mean(0)
    centered = features - mean
    gram = centered.T @ centered
    targets = np.eye(3)[train_labels] - 1.0 / 3
    w = np.linalg.solve(gram + 1e-3 * np.trace(gram) / len(gram) * np.eye(len(gram)),
                        centered.T @ targets) * 2.0
    head = model.get_layer("head")
    head.kernel.assign(w.astype(np.float32))
    head.bias.assign((-(mean @ w)).astype(np.float32))
    # The last quarter of the labels is wrong on purpose: accuracy must then follow the labels.
    labels = true_labels.copy()
    labels[18:] = (labels[18:] + 1) % 3
    config = {"class_names": CLASS_NAMES, "image_size": [SIZE, SIZE], "data": "synthetic"}
    save_run(path, model, config, {"calibration_images": train, "test_images": test,
                                   "test_labels": labels})
    return model, test, labels


_SHARED = {}


def shared_export(tmp_path_factory):
    """The one full export (every format, verified) of a run made by `make_run`, shared by
    this module and test_predict.py (nothing may modify it): made once per test session, also
    across pytest-xdist's workers (the first makes it under a file lock, the others read it)."""
    if "exported" not in _SHARED:
        import fcntl

        base = tmp_path_factory.getbasetemp()
        root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_export"
        root.mkdir(exist_ok=True)
        out = root / "exported" / "tiny"
        with open(root / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / "done").exists():
                keras.utils.set_random_seed(0)
                make_run(root / "run")
                export_run(root / "run", out, formats=("savedmodel", "tflite", *ONNX_FORMATS))
                (root / "done").touch()
        from keras_vit.export import ExportReport

        with np.load(root / "run" / "samples.npz") as samples:
            test, labels = samples["test_images"], samples["test_labels"]
        model = keras_vit.load_model(root / "run" / "model.keras")
        _SHARED["exported"] = dict(root=root, run=root / "run", out=out, model=model,
                                   report=ExportReport.read_json(out / "report.json"),
                                   test=test, labels=labels,
                                   keras_probs=keras_probabilities(model, test))
    return _SHARED["exported"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def served(exported):
    loaded = tf.saved_model.load(str(exported["out"] / "1"))
    return loaded, loaded.signatures


# --- hand-written encoders (TensorFlow only writes PNG and JPEG) ------------------------------

def encode_bmp(image):
    """24-bit uncompressed BMP."""
    h, w, _ = image.shape
    pad = b"\0" * ((4 - (w * 3) % 4) % 4)
    pixels = b"".join(image[y, :, ::-1].tobytes() + pad for y in range(h - 1, -1, -1))
    header = b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + pixels


def encode_gif(indices, palette):
    """GIF of palette indices [h, w] with a 256-colour palette; LZW with literal codes only
    and a clear code every 250 codes, so every code is 9 bits wide."""
    h, w = indices.shape
    out = b"GIF89a" + struct.pack("<HHBBB", w, h, 0xF7, 0, 0) + palette.astype(np.uint8).tobytes()
    out += b"," + struct.pack("<HHHHB", 0, 0, w, h, 0)
    codes = []
    for i, px in enumerate(indices.ravel()):
        if i % 250 == 0:
            codes.append(256)
        codes.append(int(px))
    codes.append(257)
    data, bits, nbits = bytearray(), 0, 0
    for code in codes:
        bits |= code << nbits
        nbits += 9
        while nbits >= 8:
            data.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8
    if nbits:
        data.append(bits & 0xFF)
    out += bytes([8])
    for i in range(0, len(data), 255):
        out += bytes([len(data[i:i + 255])]) + bytes(data[i:i + 255])
    return out + b"\x00;"


def decode(data):
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


# --- files and report -----------------------------------------------------------------------

def test_layout_tf_serving_versions_tflite_files_labels(exported):
    out = exported["out"]
    assert (out / "1" / "saved_model.pb").is_file()
    assert (out / "1" / "variables" / "variables.index").is_file()
    for variant in ALL_VARIANTS:
        assert (out / f"tiny_{variant}.tflite").stat().st_size > 100_000
    assert (out / "tiny.onnx").is_file() == HAVE_ONNX
    assert (out / "labels.txt").read_text() == "red\ngreen\nblue\n"
    saved = json.loads((out / "report.json").read_text())
    assert [r["format"] for r in saved["results"]] == [
        "keras", "savedmodel", "tflite_float32", "tflite_float16", "tflite_dynamic_int8",
        "tflite_int8", *ONNX_FORMATS]
    assert saved["verified"] is True and saved["version"] == 1
    # One copy of the weights (Keras' own model.export writes two).
    weights = sum(w.numpy().nbytes for w in exported["model"].weights)
    assert _dir_size(out / "1") < 1.25 * weights


def _dir_size(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def test_report_numbers(exported):
    report, probs, labels = exported["report"], exported["keras_probs"], exported["labels"]
    keras_accuracy = float(np.mean(probs.argmax(1) == labels))
    assert 0.5 < keras_accuracy <= 0.75  # 6 of 24 labels are wrong on purpose
    assert len(set(probs.argmax(1))) == 3  # the model tells the classes apart
    assert report.result("keras").accuracy == pytest.approx(keras_accuracy)
    assert report.num_test_images == 24 and report.verified
    checked = [("savedmodel", 1e-5), ("tflite_float32", 1e-4)] + [(f, 1e-4) for f in ONNX_FORMATS]
    for fmt, tol in checked:
        r = report.result(fmt)
        assert r.tolerance == tol and r.max_abs_diff <= tol, r
        assert r.agreement == 1.0 and r.accuracy == pytest.approx(keras_accuracy)
    for fmt in ("tflite_float16", "tflite_dynamic_int8"):
        r = report.result(fmt)
        assert r.tolerance is None and 0 < r.max_abs_diff < 0.1
        assert r.agreement >= 0.9 and r.accuracy is not None
    # Full-integer int8 (LayerNorm statistics and softmax in 8 bits) loses more; it must
    # still follow the model well above chance (1/3), not collapse to one class.
    r = report.result("tflite_int8")
    assert r.tolerance is None and r.agreement >= 0.6 and r.accuracy is not None
    for r in report.results:
        assert r.size_bytes == (_dir_size(r.path) if Path(r.path).is_dir()
                                else Path(r.path).stat().st_size)
        assert r.latency_ms > 0
    sizes = {r.format: r.size_bytes for r in report.results}
    assert sizes["tflite_float16"] < 0.6 * sizes["tflite_float32"]
    assert sizes["tflite_int8"] < 0.35 * sizes["tflite_float32"]
    # Every TFLite file through MediaPipe Tasks' ImageClassifier: the class names of the
    # export, and the LiteRT interpreter's top-1 (the same runtime underneath).
    for variant in ALL_VARIANTS:
        r = report.result(f"tflite_{variant}")
        assert r.client == "MediaPipe" and r.client_agreement == r.agreement, r
    table = format_report(report)
    for r in report.results:
        assert r.format in table
    assert "verified on 24 held-out images" in table and "FAIL" not in table
    assert "MediaPipe 100.0%" in table


def test_quantised_agreement_in_report_matches_an_independent_run(exported):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(exported["out"] / "tiny_int8.tflite"))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert inp["dtype"] == np.uint8 and out["dtype"] == np.uint8
    interpreter.resize_tensor_input(inp["index"], [24, SIZE, SIZE, 3])
    interpreter.allocate_tensors()
    scale, zero = inp["quantization"]
    q = np.clip(np.round(exported["test"] / scale + zero), 0, 255).astype(np.uint8)
    interpreter.set_tensor(inp["index"], q)
    interpreter.invoke()
    top1 = interpreter.get_tensor(out["index"]).argmax(1)
    r = exported["report"].result("tflite_int8")
    assert r.agreement == pytest.approx(np.mean(top1 == exported["keras_probs"].argmax(1)))
    assert r.accuracy == pytest.approx(np.mean(top1 == exported["labels"]))


# --- SavedModel -----------------------------------------------------------------------------

def test_saved_model_cli_lists_the_signatures(exported):
    cli = Path(sys.executable).with_name("saved_model_cli")
    proc = subprocess.run([str(cli), "show", "--dir", str(exported["out"] / "1"), "--all"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    blocks = {b.split("']")[0]: b for b in text.split("signature_def['")[1:]}
    assert {"serving_default", "predict_images", "predict_images_uint8"} <= set(blocks)
    assert "inputs['image_bytes']" in blocks["serving_default"]
    assert "dtype: DT_STRING" in blocks["serving_default"].split("output(s)")[0]
    assert "dtype: DT_FLOAT" in blocks["predict_images"].split("output(s)")[0]
    assert "dtype: DT_UINT8" in blocks["predict_images_uint8"].split("output(s)")[0]
    assert "shape: (-1, -1, -1, 3)" in blocks["predict_images"]
    for sig in ("serving_default", "predict_images", "predict_images_uint8"):
        for name in ("probabilities", "top_k_scores", "top_k_indices", "top_k_labels"):
            assert f"outputs['{name}']" in blocks[sig], (sig, name)
        assert "Method name is: tensorflow/serving/predict" in blocks[sig]


def test_every_image_format_in_one_mixed_size_batch(exported, served):
    _, sigs = served
    rng = np.random.default_rng(5)
    rgb = color_images(6, seed=7)[0]
    grey = rng.integers(0, 256, (45, 30, 1)).astype(np.uint8)
    rgba = np.concatenate([rgb[1], np.full((SIZE, SIZE, 1), 128, np.uint8)], axis=-1)
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    indices = rng.integers(0, 256, (37, 51)).astype(np.uint8)
    big = np.repeat(np.repeat(rgb[3], 3, axis=0), 2, axis=1)  # 96 x 64
    files = {
        "png": tf.io.encode_png(rgb[0]).numpy(),
        "png_grey": tf.io.encode_png(grey).numpy(),
        "png_rgba": tf.io.encode_png(rgba).numpy(),
        "jpeg": tf.io.encode_jpeg(rgb[2], quality=90).numpy(),
        "jpeg_big": tf.io.encode_jpeg(big).numpy(),
        "bmp": encode_bmp(rgb[4][:20]),
        "gif": encode_gif(indices, palette),
    }
    # The hand-written encoders round-trip exactly, and channels become RGB.
    assert np.array_equal(decode(files["bmp"]), rgb[4][:20])
    assert np.array_equal(decode(files["gif"]), palette[indices])
    assert np.array_equal(decode(files["png_grey"]), np.repeat(grey, 3, axis=-1))
    assert np.array_equal(decode(files["png_rgba"]), rgb[1])
    out = sigs["serving_default"](image_bytes=tf.constant(list(files.values())))
    probs = out["probabilities"].numpy()
    expected = np.concatenate([keras_probabilities(exported["model"], decode(b)[None])
                               for b in files.values()])
    assert probs.shape == (7, 3)
    assert np.abs(probs - expected).max() <= 1e-5
    indices_out = out["top_k_indices"].numpy()
    assert out["top_k_scores"].shape == (7, 3)
    assert np.array_equal(out["top_k_scores"].numpy(), -np.sort(-probs, axis=1))
    labels = out["top_k_labels"].numpy()
    assert labels.dtype == object and labels[0, 0].decode() in CLASS_NAMES
    assert [[lab.decode() for lab in row] for row in labels] == \
        [[CLASS_NAMES[i] for i in row] for row in indices_out]


def test_tensor_signatures_float_and_uint8_any_size(exported, served):
    _, sigs = served
    model, test = exported["model"], exported["test"]
    expected = exported["keras_probs"]
    for batch in (1, 5):
        u8 = sigs["predict_images_uint8"](images=tf.constant(test[:batch]))["probabilities"]
        f32 = sigs["predict_images"](images=tf.constant(test[:batch].astype(np.float32)))
        assert np.abs(u8.numpy() - expected[:batch]).max() <= 1e-5
        assert np.abs(f32["probabilities"].numpy() - expected[:batch]).max() <= 1e-5
    other = np.random.default_rng(3).uniform(0, 255, (2, 48, 40, 3)).astype(np.float32)
    got = sigs["predict_images"](images=tf.constant(other))["probabilities"].numpy()
    assert np.abs(got - keras_probabilities(model, other)).max() <= 1e-5


def test_inference_mode_despite_dropout_in_the_model(exported, served):
    model = exported["model"]
    rates = [layer.rate for layer in model._flatten_layers()
             if isinstance(layer, (keras.layers.Dropout, keras_vit.layers.DropPath))]
    assert max(rates) >= 0.1  # a training-mode export would be random
    _, sigs = served
    x = tf.constant(exported["test"][:4])
    first = sigs["predict_images_uint8"](images=x)["probabilities"].numpy()
    second = sigs["predict_images_uint8"](images=x)["probabilities"].numpy()
    assert np.array_equal(first, second)


@pytest.mark.parametrize("data, index", [(b"this is not an image", 1), (b"", 1),
                                         (b"\x00" * 100, 0)])
def test_malformed_bytes_raise_invalid_argument(exported, served, data, index):
    _, sigs = served
    good = tf.io.encode_png(exported["test"][0]).numpy()
    batch = [good, data] if index == 1 else [data, good]
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        sigs["serving_default"](image_bytes=tf.constant(batch))
    assert f"image_bytes[{index}] is not a decodable image" in e.value.message
    assert "JPEG, PNG, BMP or GIF" in e.value.message
    # The model still serves after the error.
    ok = sigs["serving_default"](image_bytes=tf.constant([good]))["probabilities"].numpy()
    assert np.abs(ok - exported["keras_probs"][:1]).max() <= 1e-5


def test_truncated_image_raises_invalid_argument(exported, served):
    _, sigs = served
    png = tf.io.encode_png(exported["test"][0]).numpy()
    with pytest.raises(tf.errors.InvalidArgumentError):
        sigs["serving_default"](image_bytes=tf.constant([png[:60]]))


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    sys.modules["keras"] = None      # as on a TF Serving machine: no Keras,
    sys.modules["keras_vit"] = None  # no keras_vit
    import tensorflow as tf
    loaded = tf.saved_model.load(sys.argv[1])
    data = open(sys.argv[2], "rb").read()
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([data, data]))
    print(json.dumps({"probabilities": out["probabilities"].numpy().tolist(),
                      "labels": [x.decode() for x in out["top_k_labels"].numpy()[0]],
                      "keras": sorted(m for m, v in sys.modules.items()
                                      if v is not None and m.startswith("keras"))}))
""")


def test_saved_model_runs_in_a_fresh_process_with_tensorflow_only(exported, tmp_path):
    image = exported["test"][5]
    (tmp_path / "x.png").write_bytes(tf.io.encode_png(image).numpy())
    (tmp_path / "check.py").write_text(FRESH_PROCESS)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), str(exported["out"] / "1"),
         str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["keras"] == []
    probs = np.array(result["probabilities"])
    assert np.abs(probs - exported["keras_probs"][5]).max() <= 1e-5
    assert result["labels"][0] == CLASS_NAMES[int(exported["keras_probs"][5].argmax())]


def test_export_fails_loudly_when_the_saved_model_disagrees(exported, monkeypatch, tmp_path):
    import keras_vit.export as export_module

    original = export_module._keras_reference

    def off_by_a_little(*args, **kwargs):
        reference = original(*args, **kwargs)
        reference["probabilities"] = reference["probabilities"] + 1e-4
        run = reference["run"]
        reference["run"] = lambda pixels: run(pixels) + 1e-4
        return reference

    # Over a good export (as a TF Serving server would be watching it):
    out = tmp_path / "served"
    shutil.copytree(exported["out"], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(export_module, "_keras_reference", off_by_a_little)
    with pytest.raises(ExportVerificationError) as e:
        export_run(exported["run"], out, name="tiny", formats=("savedmodel",))
    assert "FAILED for savedmodel" in str(e.value)
    assert f"Nothing in {out} was replaced; the failed files are in {out / '.failed-tiny'}" \
        in str(e.value)
    assert "FAIL" in str(e.value).split("\n", 1)[1]  # the table comes with it
    # The served files are untouched; the failed ones are kept aside with their report.
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and ".failed-tiny" not in p.parts}
    assert after == before
    report = json.loads((out / ".failed-tiny" / "report.json").read_text())
    assert report["results"][1]["max_abs_diff"] > 1e-5
    assert (out / ".failed-tiny" / "1" / "saved_model.pb").is_file()
    assert not (out / ".staging-tiny").exists()


def test_an_export_that_crashes_leaves_the_last_one_as_it_was(exported, monkeypatch, tmp_path):
    from keras_vit.export import _tflite

    out = tmp_path / "served"
    shutil.copytree(exported["out"], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def converter_dies(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C (or a crash) in the middle of the export

    monkeypatch.setattr(_tflite, "convert", converter_dies)
    with pytest.raises(KeyboardInterrupt):
        export_run(exported["run"], out, name="tiny")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_export_replaces_the_files_of_the_last_one(exported, tmp_path):
    out = tmp_path / "served"
    shutil.copytree(exported["out"], out)
    report = export_run(exported["run"], out, name="tiny", formats=("tflite",),
                        tflite_variants=("float32",))
    files = sorted(p.name for p in out.iterdir())
    # The other TFLite variants (and ONNX) of the last export are gone, not left beside a
    # model they may not match; the SavedModel version folder is the user's to keep.
    assert files == ["1", "labels.txt", "report.json", "tiny_float32.tflite"]
    assert report.result("tflite_float32").path == str(out / "tiny_float32.tflite")
    saved = json.loads((out / "report.json").read_text())
    assert [r["format"] for r in saved["results"]] == ["keras", "tflite_float32"]


def test_verifier_reports_a_saved_model_that_does_not_load(tmp_path):
    from keras_vit.export import run_fresh_verifier

    (tmp_path / "1").mkdir()
    with pytest.raises(ExportVerificationError, match="could not be loaded and run"):
        run_fresh_verifier(tmp_path / "1", tmp_path / "missing.npz", tmp_path / "r.json")


# --- TFLite ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_tflite_builtin_ops_only_and_dynamic_batch(exported, variant):
    from keras_vit.export._tflite import LiteRTModel, op_names

    path = exported["out"] / f"tiny_{variant}.tflite"
    ops = op_names(path.read_bytes())
    assert "GELU" in ops and "FULLY_CONNECTED" in ops and "SOFTMAX" in ops
    assert not [op for op in ops if op.startswith("CUSTOM") or "Flex" in op], ops
    model = LiteRTModel(path)
    assert model.input["shape_signature"][0] == -1
    expected = exported["keras_probs"]
    full = model(exported["test"], batch_size=24)
    if variant == "float32":
        assert np.abs(full - expected).max() <= 1e-4
    elif variant in ("float16", "dynamic_int8"):
        assert np.abs(full - expected).max() <= 0.1
    for batch in (1, 3):  # the same images give the same answers at any batch size
        probs = model(exported["test"][:batch], batch_size=batch)
        assert probs.shape == (batch, 3)
        assert np.abs(probs - full[:batch]).max() <= 1e-5


# --- ONNX -----------------------------------------------------------------------------------

@needs_onnx
def test_onnx_round_trip_with_onnxruntime(exported):
    import onnxruntime as ort

    from keras_vit.export._onnx import op_types

    path = exported["out"] / "tiny.onnx"
    assert "Erfc" not in op_types(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    for batch in (2, 5):
        x = exported["test"][:batch].astype(np.float32)
        probs = session.run(["probabilities"], {"images": x})[0]
        assert np.abs(probs - exported["keras_probs"][:batch]).max() <= 1e-4


_ONNX_IN_A_NEW_PROCESS = """
import os, sys
import numpy as np
import keras_vit
tiny = keras_vit.build("Ti/16", image_size=16, patch_size=8, depth=1, num_classes=2)
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
keras_vit.export_model(tiny, sys.argv[1], class_names=["a", "b"], formats=("onnx",),
                       test_images=np.zeros((2, 16, 16, 3), np.uint8))
print("TF_CPP_MIN_LOG_LEVEL", os.environ["TF_CPP_MIN_LOG_LEVEL"])
"""


@needs_onnx
def test_onnx_export_leaves_the_environment_as_it_was(tmp_path):
    # tf2onnx sets TF_CPP_MIN_LOG_LEVEL=3 when first imported; every TensorFlow process the
    # caller starts afterwards would inherit it. In a process of its own: its first import.
    result = processes.run([sys.executable, "-c", _ONNX_IN_A_NEW_PROCESS, str(tmp_path / "x")],
                           timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TF_CPP_MIN_LOG_LEVEL 1" in result.stdout.splitlines()
    assert (tmp_path / "x" / "x.onnx").is_file()


# --- exact-erf GELU, through the CLI ----------------------------------------------------------

@pytest.fixture(scope="module")
def erf_export(tmp_path_factory):
    from keras_vit import cli

    root = tmp_path_factory.mktemp("erf")
    keras.utils.set_random_seed(0)
    model, test, _ = make_run(root / "run", gelu="erf")
    out = root / "exported" / "exact"
    argv = ["export", str(root / "run"), "--out", str(out), "--formats", "tflite",
            *ONNX_FORMATS, "--tflite-variants", "float32"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = cli.main(argv)
    return dict(rc=rc, out=out, model=model, test=test, printed=printed.getvalue())


def test_erf_gelu_exports_to_every_format(erf_export):
    assert erf_export["rc"] == 0
    out = erf_export["out"]
    report = json.loads((out / "report.json").read_text())
    by_format = {r["format"]: r for r in report["results"]}
    assert set(by_format) == {"keras", "tflite_float32", *ONNX_FORMATS}
    assert by_format["tflite_float32"]["max_abs_diff"] <= 1e-4
    if HAVE_ONNX:
        assert by_format["onnx"]["max_abs_diff"] <= 1e-4
    assert "verified on 24 held-out images" in erf_export["printed"]  # the table
    assert "tflite_float32" in erf_export["printed"]


def test_erf_gelu_is_the_exact_form_in_tflite(erf_export, exported):
    from keras_vit.export._tflite import LiteRTModel, gelu_forms

    model, test = erf_export["model"], erf_export["test"]
    assert model.get_layer("encoderblock_0").gelu == "erf"
    out = erf_export["out"]
    # The GELU ops keep their form: exact in the erf model, the tanh approximation in the
    # other (the flatbuffer's GeluOptions.approximate).
    assert gelu_forms((out / "exact_float32.tflite").read_bytes()) == {"erf"}
    assert gelu_forms((exported["out"] / "tiny_float32.tflite").read_bytes()) == {"tanh"}
    probs = LiteRTModel(out / "exact_float32.tflite")(test)
    assert np.abs(probs - keras_probabilities(model, test)).max() <= 1e-4


@needs_onnx
def test_erf_gelu_is_the_exact_form_in_onnx(erf_export, exported):
    from keras_vit.export._onnx import OnnxModel, op_types

    out = erf_export["out"]
    exact_ops, tanh_ops = op_types(out / "exact.onnx"), op_types(exported["out"] / "tiny.onnx")
    assert "Erf" in exact_ops and "Erfc" not in exact_ops
    assert "Erf" not in tanh_ops and "Tanh" in tanh_ops
    probs = OnnxModel(out / "exact.onnx")(erf_export["test"])
    expected = keras_probabilities(erf_export["model"], erf_export["test"])
    assert np.abs(probs - expected).max() <= 1e-4


# --- the TF Serving client script --------------------------------------------------------------

def _serving_client():
    path = Path(__file__).resolve().parents[1] / "scripts" / "serving_client.py"
    spec = importlib.util.spec_from_file_location("serving_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serving_client_predict_request_round_trip(exported, served):
    """The gRPC PredictRequest the client builds, fed to the SavedModel the way TF Serving
    feeds a request's named input tensors to the signature (no TF Serving server runs
    here), and the PredictResponse parsed back."""
    pytest.importorskip("tensorflow_serving.apis", reason="tensorflow-serving-api is not "
                        "installed: pip install -e '.[serving]'")
    from tensorflow_serving.apis import predict_pb2

    client = _serving_client()
    data = [tf.io.encode_png(exported["test"][0]).numpy(),
            tf.io.encode_jpeg(exported["test"][1], quality=95).numpy()]
    request = predict_pb2.PredictRequest.FromString(
        client.make_request(data, "tiny").SerializeToString())
    assert request.model_spec.name == "tiny"
    assert request.model_spec.signature_name == "serving_default"
    assert list(request.inputs) == ["image_bytes"]
    fed = tf.make_ndarray(request.inputs["image_bytes"])
    assert list(fed) == data
    outputs = served[1]["serving_default"](image_bytes=tf.constant(fed))
    response = predict_pb2.PredictResponse()
    for name, value in outputs.items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
    response = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    top = client.parse_response(response)
    decoded = [decode(b)[None] for b in data]
    for row, image in zip(top, decoded):
        probs = keras_probabilities(exported["model"], image)[0]
        assert [label for label, _ in row] == [CLASS_NAMES[i] for i in np.argsort(-probs)]
        assert row[0][1] == pytest.approx(probs.max(), abs=1e-5)


def test_serving_client_rest_body_is_b64_instances(exported):
    client = _serving_client()
    data = [tf.io.encode_png(exported["test"][0]).numpy(), b"\xff\xd8\xff..."]
    body = json.loads(client.rest_body(data))
    assert body["signature_name"] == "serving_default"
    assert [base64.b64decode(i["b64"]) for i in body["instances"]] == data
    reply = {"predictions": [{"top_k_labels": ["blue", "red", "green"],
                              "top_k_scores": [0.7, 0.2, 0.1], "probabilities": [0.2, 0.1, 0.7],
                              "top_k_indices": [2, 0, 1]}]}
    assert client.parse_rest(reply) == [[("blue", 0.7), ("red", 0.2), ("green", 0.1)]]


# --- errors ---------------------------------------------------------------------------------

def test_cli_errors_name_the_problem(tmp_path, capsys):
    from keras_vit import cli

    assert cli.main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a finished keras-vit run" in capsys.readouterr().err
    model = keras_vit.build("Ti/16", image_size=SIZE, patch_size=8, num_classes=3)
    save_run(tmp_path / "bare", model, {"class_names": CLASS_NAMES, "image_size": [SIZE, SIZE]},
             {"test_images": color_images(4, 0)[0]})
    assert cli.main(["export", str(tmp_path / "bare"), "--out", str(tmp_path / "o"),
                     "--formats", "tflite", "--tflite-variants", "int8"]) == 2
    assert "calibration images" in capsys.readouterr().err
    save_run(tmp_path / "nosamples", model,
             {"class_names": CLASS_NAMES, "image_size": [SIZE, SIZE]}, {})
    assert cli.main(["export", str(tmp_path / "nosamples"), "--out", str(tmp_path / "o")]) == 2
    assert "no test_images" in capsys.readouterr().err
    with pytest.raises(ValueError, match="formats"):
        export_run(tmp_path / "bare", tmp_path / "o", formats=("pickle",))


# --- a mixed-precision run exports in float32 with the structure it trained with --------------

def test_mixed_precision_run_exports_its_own_structure_in_float32(tmp_path):
    """A bfloat16 run whose build took GAP pooling, the exact GELU and a pre-logits layer
    (as from a checkpoint) exports as float32 with that same structure and its weights."""
    build_kwargs = dict(variant="Ti/16", image_size=SIZE, patch_size=8, num_classes=3,
                        depth=2, gelu="erf", pooling="gap", representation_size=16)
    keras.utils.set_random_seed(1)
    trained = keras_vit.build(**build_kwargs, dtype="mixed_bfloat16")
    randomize_weights(trained)
    test, labels = color_images(8, seed=2)
    save_run(tmp_path / "run", trained, {"class_names": CLASS_NAMES, "image_size": [SIZE, SIZE],
                                         "data": "synthetic"},
             {"test_images": test, "test_labels": labels})
    report = export_run(tmp_path / "run", tmp_path / "out", formats=("savedmodel",))
    assert report.verified  # against the float32 Keras model
    reference = keras_vit.build(**build_kwargs)  # float32, the same structure
    reference.set_weights(trained.get_weights())
    loaded = tf.saved_model.load(str(tmp_path / "out" / "1"))
    served = loaded.signatures["predict_images_uint8"](images=tf.constant(test))
    assert np.abs(served["probabilities"].numpy()
                  - keras_probabilities(reference, test)).max() <= 1e-5
