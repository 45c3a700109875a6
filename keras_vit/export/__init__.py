"""Deployable files from a trained model (`export_model`) or a run (`export_run`), each verified.

    exported/NAME/
      1/                          TF Serving SavedModel (version 1): signatures serving_default
                                  (encoded images), predict_images (float32), predict_images_uint8
      NAME_float32.tflite         LiteRT files, builtin ops only, dynamic batch size
      NAME_float16.tflite
      NAME_dynamic_int8.tflite
      NAME_int8.tflite            full integer (uint8 in / uint8 out), calibrated on training data
      NAME.onnx                   with formats including "onnx"
      labels.txt                  class names, one a line, in output order
      report.json                 what verification measured

Every file is checked against the Keras model on held-out images: the SavedModel in a fresh
process with TensorFlow only (max |dp| <= 1e-5), the float32 TFLite and ONNX files within
1e-4, the quantised files by top-1 agreement and accuracy. A failing check raises
`ExportVerificationError` with the table; progress and the table go to the
"keras_vit.export" logger. Files are written and verified in
`out/.staging-NAME/` and moved into `out/` only when every check passed (failed ones go to
`out/.failed-NAME/`), so what is already there is never replaced by an unverified export.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from keras_vit.export._report import (ExportReport, ExportVerificationError, FormatResult,
                                      format_report)
from keras_vit.export._tflite import VARIANTS as TFLITE_VARIANTS
from keras_vit.export._tflite import tflite_filename

__all__ = ["ExportReport", "ExportVerificationError", "FORMATS", "FormatResult",
           "TFLITE_VARIANTS", "export_model", "export_run", "format_report", "made_up_images"]

FORMATS = ("savedmodel", "tflite", "onnx")
SAVEDMODEL_TOLERANCE = 1e-5
TFLITE_FLOAT32_TOLERANCE = 1e-4
ONNX_TOLERANCE = 1e-4
LABELS_FILE = "labels.txt"
REPORT_FILE = "report.json"
_VERIFY_SCRIPT = Path(__file__).with_name("_verify_savedmodel.py")
_MEDIAPIPE_SCRIPT = Path(__file__).with_name("_verify_mediapipe.py")


def export_run(run_dir, out_dir, *, name=None, version=1, formats=("savedmodel", "tflite"),
               verify=True, tflite_variants=TFLITE_VARIANTS, top_k=5,
               max_calibration_images=200):
    """Exports a finished run (see `export_model`) with the images it keeps: held-out ones
    to verify on, training ones to calibrate int8.

    Args:
        run_dir: the run folder (config.json, model.keras, samples.npz).
        out_dir, name, version, formats, verify, tflite_variants, top_k,
        max_calibration_images: as `export_model`.

    Raises:
        FileNotFoundError: `run_dir` is not a finished run; and what `export_model` raises.
    """
    from keras_vit.run_dir import load_run

    run = load_run(run_dir)
    test = run.samples.get("test_images")
    if verify and (test is None or len(test) == 0):
        raise ValueError(
            f"{run.path}/samples.npz has no test_images: verification compares every "
            "exported file with the Keras model on held-out images. Re-run training (it "
            "writes them) or export with verify=False (--no-verify).")
    calibration = run.samples.get("calibration_images")
    if "tflite" in _check_choices("formats", formats, FORMATS) and "int8" in tflite_variants:
        from keras_vit.export._tflite import require_calibration

        require_calibration(calibration)  # before the slow steps
    return export_model(
        run.model, out_dir, class_names=run.class_names, name=name, version=version,
        formats=formats, verify=verify, tflite_variants=tflite_variants, top_k=top_k,
        test_images=test, test_labels=run.samples.get("test_labels"),
        calibration_images=calibration, max_calibration_images=max_calibration_images,
        model_file=run.path / "model.keras", image_size=run.image_size)


def export_model(model, out_dir, *, class_names, name=None, version=1,
                 formats=("savedmodel", "tflite"), verify=True, tflite_variants=TFLITE_VARIANTS,
                 test_images=None, test_labels=None, calibration_images=None,
                 normalization=None, outputs_probabilities=None, image_size=None, top_k=5,
                 max_calibration_images=200, model_file=None):
    """Exports a trained Keras image classifier to TF Serving / TFLite (/ ONNX), verifying
    every file against the Keras model before it is published.

    Any model that takes a batch of RGB images `(batch, H, W, 3)` and returns one score per
    class works: a `keras_vit.ViT` (its own normalisation is used) or another Keras model whose
    inputs are scaled as `keras_vit.preprocess` does (`normalization="vit"`, the default) or
    that scales its own input (`normalization="none"`: it gets pixels in [0, 255]).

    Args:
        model: the trained `keras.Model`.
        out_dir: where the files go (`exported/NAME`); created if missing.
        class_names: the class names, in output order (labels.txt, the SavedModel's
            top_k_labels).
        name: file-name stem of the TFLite / ONNX files; defaults to `out_dir`'s name.
        version: the SavedModel's TF Serving version folder (`out_dir/<version>/`); an
            existing SavedModel of that version is replaced.
        formats: any of "savedmodel", "tflite", "onnx".
        verify: compare every file with the Keras model and raise on a mismatch.
        tflite_variants: any of "float32", "float16", "dynamic_int8", "int8".
        test_images: uint8 `(n, H, W, 3)` held-out images to verify on (with `test_labels`,
            accuracy is reported too); resized to the model's size as training does. Without
            them, verification runs on 32 images made here (the report says so): agreement
            with Keras is checked, accuracy is not.
        calibration_images: uint8 training images for the full-integer int8 file. Without
            them it is calibrated on `test_images`; with neither, the int8 file is skipped
            (a note in the report says so): calibrating on made-up images would give it
            ranges real photos exceed.
        normalization: how the model's inputs are scaled from [0, 255] pixels ("vit",
            "imagenet", "none", {"mean", "std"}); default the ViT's own, else "vit".
        outputs_probabilities: whether the model's outputs already are probabilities
            (default: a ViT says; else whether its last layer has an activation).
        image_size: (height, width), default the model's input size.
        top_k: how many classes the SavedModel's top_k_* outputs hold (at most all).
        max_calibration_images: calibration images the int8 conversion reads.
        model_file: the `.keras` file the model came from (its size goes in the report).

    Returns:
        An `ExportReport` (`format_report(report)` gives its table; `report.to_dict()`).

    Raises:
        ExportVerificationError: an exported file disagrees with the Keras model.
        ValueError / TypeError: the model is not an image classifier, the class names do not
            fit it, or the arguments are wrong (the message says which and what to do).
    """
    formats = _check_choices("formats", formats, FORMATS)
    tflite_variants = _check_choices("tflite_variants", tflite_variants, TFLITE_VARIANTS)
    version = _check_version_number(version)
    class_names = _check_class_names(class_names)
    if "onnx" in formats:
        from keras_vit.export._onnx import require_onnx
        require_onnx()  # before the slow steps
    from keras_vit.images import as_normalization

    image_size = _check_image_classifier(model, class_names, image_size)
    if normalization is None:
        normalization = getattr(model, "normalization", None) or "vit"
    normalization = as_normalization(normalization)
    test = _check_images("test_images", test_images, image_size, test_labels)
    calibration = _check_images("calibration_images", calibration_images, image_size)
    calibration = None if calibration is None else calibration["images"]
    notes = []
    if verify and test is None:
        test = {"images": made_up_images(image_size), "labels": None, "made_up": True}
        notes.append(f"verified on {len(test['images'])} images made here (no held-out images "
                     "were given): agreement with Keras is checked, accuracy is not")
    if "tflite" in formats and "int8" in tflite_variants and calibration is None:
        if test is not None and not test.get("made_up"):
            calibration = test["images"]
            notes.append("int8 was calibrated on the verification images (pass "
                         "calibration_images= from the training data for an independent check)")
        else:
            tflite_variants = tuple(v for v in tflite_variants if v != "int8")
            notes.append("the full-integer int8 file was skipped: it needs calibration images "
                         "from the training data (calibration_images=, or --images)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: give a folder to export into (it is created if "
                         "missing).")
    name = name or out.name
    if "savedmodel" in formats:
        _check_version_folder(out / str(version))  # before the slow steps
    log = _Log()

    model = _float32_model(model)
    from keras_vit.export._graph import InferenceModel

    infer = InferenceModel(model, image_size, normalization, outputs_probabilities,
                           name="inference")
    infer(np.zeros((1, *image_size, 3), np.float32))  # builds it (export needs that)
    report = ExportReport(name=name, out_dir=str(out), version=None, saved_model_dir=None,
                          class_names=class_names, image_size=image_size,
                          num_test_images=0 if test is None else len(test["images"]),
                          verified=bool(verify), notes=notes,
                          checked_on="images made here" if test is not None and test.get(
                              "made_up") else "held-out images")
    reference = None
    if verify:
        reference = _keras_reference(infer, test, model_file, model)
        report.results.append(reference["result"])
        spread = _output_spread(reference["probabilities"])
        if spread < OUTPUTS_VARY_AT_LEAST:
            report.notes.append(
                f"the model's outputs barely vary over the {len(test['images'])} check images "
                f"(largest per-class standard deviation {spread:.1e}): agreement with them "
                "proves little. Is the head untrained (keras-vit heads start at zero)?")
            log.warning(report.notes[-1])

    # Everything is written and verified in a hidden staging folder (TF Serving loads only
    # numbered folders) and moved into `out` only once it passed: a failed or interrupted
    # export leaves the files already there as they were.
    stage = out / f".staging-{name}"
    _remove(stage)  # what an interrupted export left
    stage.mkdir(parents=True)
    try:
        (stage / LABELS_FILE).write_text("".join(f"{c}\n" for c in class_names))
        if "savedmodel" in formats:
            from keras_vit.export._graph import write_saved_model

            sm_dir = stage / str(version)
            log(f"Writing the TF Serving SavedModel (version {version}) ...")
            write_saved_model(infer, class_names, sm_dir, top_k=top_k)
            report.version, report.saved_model_dir = version, str(sm_dir)
            result = FormatResult("savedmodel", str(sm_dir), _dir_size(sm_dir),
                                  tolerance=SAVEDMODEL_TOLERANCE if verify else None)
            if verify:
                log("Verifying it in a fresh process with TensorFlow only ...")
                _verify_saved_model(sm_dir, class_names, test, reference, result)
            report.results.append(result)

        if "tflite" in formats:
            cal = None if calibration is None else calibration[:max_calibration_images]
            kind = f"ViT {model.variant.name}" if hasattr(model, "variant") else model.name
            description = (f"{kind} image classifier, {image_size[0]}x{image_size[1]} RGB, "
                           f"{len(class_names)} classes")
            report.results += _export_tflite(infer, stage, name, tflite_variants, cal, test,
                                             reference, log, class_names, description)
        if "onnx" in formats:
            report.results.append(_export_onnx(infer, stage, name, test, reference, log))
    except ExportVerificationError as err:  # e.g. the SavedModel does not load
        failed = _keep_failed(stage, out, name, report)
        raise ExportVerificationError(f"{err}\nNothing in {out} was replaced; the files "
                                      f"are in {failed}.") from err
    except BaseException:
        _remove(stage)
        raise

    if report.failures:
        failed = _keep_failed(stage, out, name, report)
        raise ExportVerificationError(
            "Export verification FAILED for " + ", ".join(r.format for r in report.failures)
            + f": the exported files do not give the Keras model's answers. Nothing in {out} "
            f"was replaced; the failed files are in {failed}.\n" + format_report(report))
    _publish(stage, out, name, version, report)
    log.info(format_report(report))
    return report


# Below this largest per-class standard deviation of the probabilities over the check images,
# the outputs are (nearly) constant and agreement proves little.
OUTPUTS_VARY_AT_LEAST = 1e-3


def _output_spread(probabilities):
    return float(np.asarray(probabilities).std(axis=0).max()) if len(probabilities) > 1 else 0.0


def made_up_images(image_size, count=32, seed=0):
    """uint8 RGB images to verify on when no real ones are given: smooth colour gradients,
    blobs and noise, so that a trained model's outputs vary between them."""
    rng = np.random.default_rng(seed)
    h, w = image_size
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    images = []
    for _ in range(count):
        gradient = (rng.uniform(-1, 1, 3)[None, None] * (rows / h)[..., None]
                    + rng.uniform(-1, 1, 3)[None, None] * (cols / w)[..., None])
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.5) * min(h, w)
        blob = (((rows - cy) ** 2 + (cols - cx) ** 2) < r * r)[..., None] * rng.uniform(-1, 1, 3)
        image = 127.5 + 80 * gradient + 60 * blob + rng.normal(0, 12, (h, w, 3))
        images.append(np.clip(np.round(image), 0, 255).astype(np.uint8))
    return np.stack(images)


def _check_version_number(version):
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(f"version must be a positive integer (TF Serving's version folder), "
                         f"got {version!r}.")
    return int(version)


def _check_class_names(class_names):
    if class_names is None:
        raise ValueError("export_model needs class_names: the name of each class, in the "
                         "order of the model's outputs (they go into labels.txt and the "
                         "SavedModel's top_k_labels).")
    if isinstance(class_names, str) or not hasattr(class_names, "__iter__"):
        raise TypeError(f"class_names must be a list of names, one per class, got "
                        f"{type(class_names).__name__}.")
    names = [str(c) for c in class_names]
    if not names:
        raise ValueError("class_names is empty: give one name per class of the model.")
    return names


def _check_image_classifier(model, class_names, image_size):
    """The model's (height, width) after checking it takes RGB image batches and returns one
    score per class name; a ValueError/TypeError saying what is wrong otherwise."""
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(f"export_model takes a keras.Model, got {type(model).__name__}.")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"{model.name} has {len(model.inputs)} inputs and "
                         f"{len(model.outputs)} outputs: export takes an image classifier "
                         "with one image input and one output of class scores.")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{model.name}'s input has shape {shape}: export takes models whose "
                         "input is a batch of RGB images (batch, height, width, 3).")
    size = tuple(image_size) if image_size is not None else shape[1:3]
    if None in size:
        raise ValueError(f"{model.name}'s input size is not fixed ({shape}): pass "
                         "image_size=(height, width).")
    out_shape = tuple(model.outputs[0].shape)
    if getattr(model, "include_top", True) is False or len(out_shape) != 2:
        raise ValueError(f"{model.name} returns {out_shape}, not one score per class: export "
                         "needs a classification head (a ViT built with include_top=False "
                         "returns features; build it with num_classes=N).")
    if out_shape[-1] != len(class_names):
        raise ValueError(f"{model.name} has {out_shape[-1]} classes but {len(class_names)} "
                         "class names were given: give one name per class, in output order.")
    return tuple(int(s) for s in size)


def _check_images(what, images, image_size, labels=None):
    if images is None:
        return None
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 RGB images (n, height, width, 3), got "
                         f"{images.dtype} {images.shape}.")
    if len(images) == 0:
        return None
    if tuple(images.shape[1:3]) != tuple(image_size):  # as training resizes them
        from keras_vit.images import resize_image

        images = resize_image(images, image_size).numpy()
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"test_labels has shape {labels.shape}; expected one label per "
                             f"test image ({len(images)},).")
    return {"images": images, "labels": labels}


def _check_version_folder(path):
    if path.exists() and not (path / "saved_model.pb").is_file() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not a SavedModel; not overwriting it "
                              "(move it away, or export with another --version).")


def _keep_failed(stage, out, name, report):
    """Moves a failed export's files to `out/.failed-NAME` (for a look) with its report."""
    failed = out / f".failed-{name}"
    _remove(failed)
    _relocate(report, stage, failed)
    report.write_json(stage / REPORT_FILE)
    stage.rename(failed)
    return failed


def _remove(path):
    if path.exists():
        shutil.rmtree(path)


def _relocate(report, old, new):
    """Points the report's paths from folder `old` to folder `new`."""
    def moved(path):
        return str(new / Path(path).relative_to(old)) if Path(path).is_relative_to(old) else path

    for result in report.results:
        result.path = moved(result.path)
    if report.saved_model_dir:
        report.saved_model_dir = moved(report.saved_model_dir)


def _publish(stage, out, name, version, report):
    """Moves a verified export from `stage` into `out`: each file replaced in one step
    (os.replace), the SavedModel version folder last, then report.json. TFLite/ONNX files of
    this name that this export did not write are removed, so the folder never mixes the
    files of two models; other SavedModel versions are left to the user."""
    ours = {tflite_filename(name, v) for v in TFLITE_VARIANTS} | {f"{name}.onnx"}
    written = {p.name for p in stage.iterdir() if p.is_file()}
    for stale in ours - written:
        (out / stale).unlink(missing_ok=True)
    for file_name in sorted(written):
        os.replace(stage / file_name, out / file_name)
    staged_version = stage / str(version)
    if staged_version.is_dir():
        target = out / str(version)
        _check_version_folder(target)
        _remove(target)
        staged_version.rename(target)
    _relocate(report, stage, out)
    report.write_json(out / REPORT_FILE)
    _remove(stage)


# --- Keras reference ---------------------------------------------------------------------

def _keras_reference(infer, test, model_file, model):
    """The Keras model's probabilities on the check images, preprocessed as in training."""
    import tensorflow as tf

    from keras_vit.export._tflite import median_ms

    @tf.function(reduce_retracing=True)
    def probabilities(pixels):
        return infer(pixels)

    def run(pixels):
        pixels = np.asarray(pixels)
        if tuple(pixels.shape[1:3]) != infer.image_size:
            from keras_vit.images import resize_pixels

            pixels = resize_pixels(pixels, infer.image_size)
        return np.concatenate([probabilities(tf.constant(pixels[i:i + 64], tf.float32)).numpy()
                               for i in range(0, len(pixels), 64)])

    probs = run(test["images"])
    one = tf.constant(test["images"][:1], tf.float32)
    latency = median_ms(lambda: probabilities(one).numpy())
    if model_file is not None and Path(model_file).is_file():
        path, size = str(model_file), Path(model_file).stat().st_size
    else:
        path, size = model.name, sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    result = FormatResult("keras", path, size, accuracy=_accuracy(probs, test["labels"]),
                          latency_ms=latency,
                          notes=f"the reference: the Keras model, {infer.normalization.name} "
                                "normalisation (keras_vit.images), probabilities")
    return {"probabilities": probs, "run": run, "result": result}


def _accuracy(probs, labels):
    if labels is None or len(labels) != len(probs):
        return None
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def _agreement(probs, reference):
    return float(np.mean(np.argmax(probs, axis=1) == np.argmax(reference, axis=1)))


# --- SavedModel ----------------------------------------------------------------------------

def _encoded_variants(images, count=16):
    """Held-out images encoded as PNG and JPEG at several sizes (a mixed-size batch)."""
    import tensorflow as tf

    encoded = []
    h, w = images.shape[1:3]
    for i, image in enumerate(images[:count]):
        kind = i % 4
        if kind == 2:  # bigger, nearest-neighbour
            image = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
        elif kind == 3:  # another aspect ratio
            image = tf.cast(tf.round(tf.image.resize(image, (h * 3 // 2, w * 5 // 4))),
                            tf.uint8).numpy()
        if kind in (0, 2):
            encoded.append(tf.io.encode_png(image).numpy())
        else:
            encoded.append(tf.io.encode_jpeg(image, quality=95).numpy())
    return encoded


def _verify_saved_model(sm_dir, class_names, test, reference, result):
    import tensorflow as tf

    from keras_vit.images import decode_image

    run = reference["run"]
    encoded = _encoded_variants(test["images"])
    # The Keras side decodes with the same TensorFlow decoders, one image at a time.
    expected_bytes = np.concatenate([run(decode_image(tf.constant(b)).numpy()[None])
                                     for b in encoded])
    resized = np.repeat(np.repeat(test["images"][:8], 2, axis=1), 3, axis=2).astype(np.float32)
    offsets = np.cumsum([0] + [len(b) for b in encoded])
    with tempfile.TemporaryDirectory(prefix="keras_vit_verify_") as tmp:
        data, out = Path(tmp) / "data.npz", Path(tmp) / "result.json"
        arrays = dict(
            class_names=np.array(class_names), bytes_offsets=offsets,
            bytes_blob=np.frombuffer(b"".join(encoded), dtype=np.uint8),
            expected_bytes=expected_bytes, pixels=test["images"],
            expected_pixels=reference["probabilities"], resized=resized,
            expected_resized=run(resized))
        if test["labels"] is not None:
            arrays["labels"] = test["labels"]
        np.savez(data, **arrays)
        measured = run_fresh_verifier(sm_dir, data, out)

    problems = [f"signatures {measured['signatures']} lack {s}"
                for s in ("serving_default", "predict_images", "predict_images_uint8")
                if s not in measured["signatures"]]
    diffs = {}
    for sig in ("serving_default", "predict_images_uint8", "predict_images",
                "predict_images_resized"):
        m = measured[sig]
        problems += [f"{sig}: {p}" for p in m["problems"]]
        diffs[sig] = m["max_abs_diff"] if m["max_abs_diff"] is not None else float("inf")
        if diffs[sig] > SAVEDMODEL_TOLERANCE:
            problems.append(f"{sig}: max |dp| {diffs[sig]:.2e} > {SAVEDMODEL_TOLERANCE:.0e}")
    if measured["malformed"] != "ok":
        problems.append(f"malformed bytes: {measured['malformed']}")
    if measured["keras_modules_loaded"]:
        problems.append(f"the fresh process imported {measured['keras_modules_loaded']}")
    result.max_abs_diff = max(diffs.values())
    result.agreement = measured["predict_images_uint8"]["agreement"]
    result.accuracy = measured["predict_images_uint8"].get("accuracy")
    result.latency_ms = measured["latency_ms"]["predict_images_uint8"]
    result.notes = (f"fresh process, TensorFlow {measured['tensorflow']} only; 4 checks "
                    f"(bytes: {len(encoded)} PNG/JPEG of mixed sizes, uint8, float32, resized "
                    f"float32), malformed bytes -> InvalidArgument; serving_default latency "
                    f"{measured['latency_ms']['serving_default']:.2f} ms")
    result.error = "; ".join(problems)
    return result


def run_fresh_verifier(sm_dir, data_path, result_path, timeout=900):
    """Runs `_verify_savedmodel.py` in a new Python process; returns its measurements."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sm_dir, data_path, result_path = (Path(p).resolve() for p in (sm_dir, data_path,
                                                                   result_path))
    proc = subprocess.run(
        [sys.executable, str(_VERIFY_SCRIPT), str(sm_dir), str(data_path), str(result_path)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=str(sm_dir.parent))
    if proc.returncode != 0 or not Path(result_path).is_file():
        raise ExportVerificationError(
            f"The SavedModel {sm_dir} could not be loaded and run in a fresh process with "
            f"TensorFlow only (exit code {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(Path(result_path).read_text())


# --- TFLite --------------------------------------------------------------------------------

def _export_tflite(infer, out, name, variants, calibration, test, reference, log, class_names,
                   description):
    from keras_vit import __version__
    from keras_vit.export import _metadata, _tflite
    from keras_vit.export._graph import write_fixed_size_saved_model

    results = []
    with tempfile.TemporaryDirectory(prefix="keras_vit_tflite_") as tmp:
        write_fixed_size_saved_model(infer, Path(tmp) / "fixed")
        for variant in variants:
            path = out / tflite_filename(name, variant)
            log(f"Converting to TFLite ({variant}) -> {path} ...")
            with _tflite.quiet_stderr():
                content = _tflite.convert(Path(tmp) / "fixed", variant, calibration)
            _tflite.check_builtin_only(content, path.name)
            # The metadata MediaPipe Tasks and the LiteRT support libraries read: without it
            # MediaPipe refuses float input and names no class.
            content = _metadata.add_metadata(
                content, class_names, name=f"{name} ({variant})", version=__version__,
                description=f"{description}; TFLite {variant}; made by keras-vit "
                            f"{__version__}")
            path.write_bytes(content)
            result = FormatResult(f"tflite_{variant}", str(path), path.stat().st_size,
                                  tolerance=TFLITE_FLOAT32_TOLERANCE
                                  if variant == "float32" and reference else None)
            problems = _tflite.client_contract_problems(content)
            if reference is not None:
                _verify_tflite(path, test, reference, result)
            if problems:
                result.error = "; ".join(filter(None, [result.error, *problems]))
            results.append(result)
    if reference is not None and results:
        _verify_with_mediapipe(results, test, reference, class_names, log)
    return results


def _verify_tflite(path, test, reference, result):
    from keras_vit.export._tflite import LiteRTModel

    with _quiet_if_tflite():
        model = LiteRTModel(path)
        probs = model(test["images"])
        # Dynamic batch size: one image alone must give what it gave inside the batch.
        single = model(test["images"][:1], batch_size=1)
        latency = model.latency_ms(test["images"][:1])
    batch_gap = float(np.abs(single[0] - probs[0]).max())
    result.max_abs_diff = float(np.abs(probs - reference["probabilities"]).max())
    result.agreement = _agreement(probs, reference["probabilities"])
    result.accuracy = _accuracy(probs, test["labels"])
    result.latency_ms = latency
    dtype = model.input_dtype.name
    result.notes = f"input {dtype}"
    if dtype != "float32":
        scale, zero = model.input["quantization"]
        result.notes += f" (scale {scale:g}, zero point {zero})"
    if batch_gap > 1e-5:
        result.error = f"batch 1 differs from batch {len(probs)} by {batch_gap:.2e}"
    return result


MEDIAPIPE_MISSING = ("MediaPipe client check skipped: mediapipe is not installed "
                     "(pip install 'keras-vit[mediapipe]')")


def _verify_with_mediapipe(results, test, reference, class_names, log, timeout=300):
    """Each .tflite file through MediaPipe Tasks' ImageClassifier (the on-device client), in a
    process of its own: its top-1 over the check images against Keras', its category names
    against the class names."""
    import importlib.util

    if importlib.util.find_spec("mediapipe") is None:
        for result in results:
            result.client = "skipped"
            result.notes = "; ".join(filter(None, [result.notes, MEDIAPIPE_MISSING]))
        return
    log("Running the TFLite files with MediaPipe's ImageClassifier ...")
    expected = np.argmax(reference["probabilities"], axis=1)
    with tempfile.TemporaryDirectory(prefix="keras_vit_mediapipe_") as tmp:
        images, out = Path(tmp) / "images.npy", Path(tmp) / "result.json"
        np.save(images, np.asarray(test["images"], np.uint8))
        try:
            proc = subprocess.run(
                [sys.executable, str(_MEDIAPIPE_SCRIPT), str(images), str(out),
                 *(r.path for r in results)], capture_output=True, text=True, timeout=timeout)
            failure = None if out.is_file() else (
                f"MediaPipe's check process ended with exit code {proc.returncode}: "
                f"{proc.stderr.strip()[-500:]}")
        except subprocess.TimeoutExpired:
            failure = f"MediaPipe's check process did not finish in {timeout} s"
        measured = {} if failure else json.loads(out.read_text())["files"]
    for result in results:
        result.client = "MediaPipe"
        answer = measured.get(result.path, {"error": failure})
        if "error" in answer:
            result.error = "; ".join(filter(None, [result.error,
                                                   f"MediaPipe: {answer['error']}"]))
            continue
        indices = np.array([i for i, _ in answer["top1"]])
        result.client_agreement = float(np.mean(indices == expected))
        names = [name for _, name in answer["top1"]]
        wrong = [n for i, n in zip(indices, names) if n != class_names[i]]
        if wrong:
            result.error = "; ".join(filter(None, [
                result.error, f"MediaPipe names the classes {sorted(set(wrong))[:3]}, not "
                              "the export's class names"]))


@contextlib.contextmanager
def _quiet_if_tflite():
    from keras_vit.export._tflite import quiet_stderr

    with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
        yield


# --- ONNX ----------------------------------------------------------------------------------

def _export_onnx(infer, out, name, test, reference, log):
    from keras_vit.export import _onnx

    path = out / f"{name}.onnx"
    log(f"Exporting ONNX -> {path} ...")
    _onnx.export_onnx(infer, path)
    result = FormatResult("onnx", str(path), path.stat().st_size,
                          tolerance=ONNX_TOLERANCE if reference else None)
    if reference is not None:
        from keras_vit.export._tflite import median_ms

        model = _onnx.OnnxModel(path)
        probs = model(test["images"])
        single = model(test["images"][:1])
        result.max_abs_diff = float(np.abs(probs - reference["probabilities"]).max())
        result.agreement = _agreement(probs, reference["probabilities"])
        result.accuracy = _accuracy(probs, test["labels"])
        result.latency_ms = median_ms(lambda: model(test["images"][:1]))
        result.notes = "onnxruntime CPU"
        gap = float(np.abs(single[0] - probs[0]).max())
        if gap > 1e-5:
            result.error = f"batch 1 differs from batch {len(probs)} by {gap:.2e}"
    return result


# --- helpers -------------------------------------------------------------------------------

def _check_choices(what, values, choices):
    values = (values,) if isinstance(values, str) else tuple(values)
    bad = [v for v in values if v not in choices]
    if bad or not values:
        raise ValueError(f"{what} must be a non-empty selection of {choices}, got {values}")
    return values


def _dir_size(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _float32_model(model):
    """The model with float32 layers (export traces in float32): a mixed-precision model is
    made again with float32 policies (a ViT from its config, another model layer by layer)
    and given the same weights."""
    import keras

    policies = {model.dtype_policy.name} | {layer.dtype_policy.name for layer in model.layers}
    if policies <= {"float32"}:
        return model
    from keras_vit.model import ViT

    if isinstance(model, ViT):
        rebuilt = ViT.from_config({**model.get_config(), "dtype": "float32"})
    else:
        def float32_layer(layer):
            return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

        rebuilt = keras.models.clone_model(model, clone_function=float32_layer)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


class _Log:
    """Progress lines (logging, logger "keras_vit.export") with the time since the start."""

    def __init__(self):
        import logging
        import time

        self.logger = logging.getLogger("keras_vit.export")
        self.clock, self.start = time.perf_counter, time.perf_counter()

    def __call__(self, message):
        self.logger.info(f"[{self.clock() - self.start:6.1f}s] {message}")

    def info(self, message):
        self.logger.info(message)

    def warning(self, message):
        self.logger.warning(message)
