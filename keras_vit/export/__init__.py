"""`keras-vit export RUN_DIR --out exported/NAME`: deployable files, each verified.

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

Every file is checked against the Keras model on the run's held-out images: the SavedModel
in a fresh process with TensorFlow only (max |dp| <= 1e-5), the float32 TFLite and ONNX files
within 1e-4, the quantised files by top-1 agreement and accuracy. A failing check raises
`ExportVerificationError` after printing the table. Files are written and verified in
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

from keras_vit.cli import positive_int
from keras_vit.export._report import (ExportReport, ExportVerificationError, FormatResult,
                                      format_report, print_report)
from keras_vit.export._tflite import VARIANTS as TFLITE_VARIANTS
from keras_vit.export._tflite import tflite_filename

__all__ = ["ExportReport", "ExportVerificationError", "FORMATS", "FormatResult",
           "TFLITE_VARIANTS", "add_arguments", "export_run", "format_report", "print_report",
           "run"]

FORMATS = ("savedmodel", "tflite", "onnx")
SAVEDMODEL_TOLERANCE = 1e-5
TFLITE_FLOAT32_TOLERANCE = 1e-4
ONNX_TOLERANCE = 1e-4
LABELS_FILE = "labels.txt"
REPORT_FILE = "report.json"
_VERIFY_SCRIPT = Path(__file__).with_name("_verify_savedmodel.py")


def export_run(run_dir, out_dir, *, name=None, version=1, formats=("savedmodel", "tflite"),
               verify=True, tflite_variants=TFLITE_VARIANTS, top_k=5,
               max_calibration_images=200, verbose=True):
    """Exports a finished run to TF Serving / TFLite (/ ONNX) files and verifies each.

    Args:
        run_dir: the run folder (config.json, model.keras, samples.npz).
        out_dir: where the files go (`exported/NAME`); created if missing.
        name: file-name stem of the TFLite / ONNX files; defaults to `out_dir`'s name.
        version: the SavedModel's TF Serving version folder (`out_dir/<version>/`); an
            existing SavedModel of that version is replaced.
        formats: any of "savedmodel", "tflite", "onnx".
        verify: compare every file with the Keras model on the run's held-out images
            (needs samples.npz with test_images) and raise on a mismatch.
        tflite_variants: any of "float32", "float16", "dynamic_int8", "int8".
        top_k: how many classes the SavedModel's top_k_* outputs hold (at most all).
        max_calibration_images: training images the int8 calibration reads.
        verbose: print progress and the report table.

    Returns:
        An `ExportReport` (`print_report(report)` prints its table; `report.to_dict()`).

    Raises:
        ExportVerificationError: an exported file disagrees with the Keras model.
        FileNotFoundError: `run_dir` is not a finished run.
        ValueError: bad arguments, or data a check needs is missing from the run.
    """
    formats = _check_choices("formats", formats, FORMATS)
    tflite_variants = _check_choices("tflite_variants", tflite_variants, TFLITE_VARIANTS)
    version = int(version)
    if version < 1:
        raise ValueError(f"version must be a positive integer (TF Serving's version folder), "
                         f"got {version}")
    if "onnx" in formats:
        from keras_vit.export._onnx import require_onnx
        require_onnx()  # before the slow steps
    log = _Log(verbose)

    with _float32_policy():
        from keras_vit.run_dir import load_run

        run = load_run(run_dir)
        test = _held_out(run, verify)  # data checks first, before the slow steps
        if "tflite" in formats and "int8" in tflite_variants:
            from keras_vit.export._tflite import require_calibration

            require_calibration(run.samples.get("calibration_images"))  # before slow steps
        class_names = [str(c) for c in run.config["class_names"]]
        image_size = tuple(int(s) for s in run.config["image_size"])
        out = Path(out_dir)
        name = name or out.name
        if "savedmodel" in formats:
            _check_version_folder(out / str(version))  # before the slow steps
        model = _float32_model(run)
        if model.outputs[0].shape[-1] != len(class_names):
            raise ValueError(f"{run_dir}: the model has {model.outputs[0].shape[-1]} outputs but "
                             f"config.json lists {len(class_names)} class names")

        from keras_vit.export._graph import InferenceModel

        infer = InferenceModel(model, image_size, name="inference")
        infer(np.zeros((1, *image_size, 3), np.float32))  # builds it (export needs that)
        report = ExportReport(name=name, out_dir=str(out), version=None, saved_model_dir=None,
                              class_names=class_names, image_size=image_size,
                              num_test_images=0 if test is None else len(test["images"]),
                              verified=bool(verify))
        reference = None
        if verify:
            reference = _keras_reference(model, image_size, test, run.path)
            report.results.append(reference["result"])

        # Everything is written and verified in a hidden staging folder (TF Serving loads
        # only numbered folders) and moved into `out` only once it passed: a failed or
        # interrupted export leaves the files already there as they were.
        stage = out / f".staging-{name}"
        _remove(stage)  # what an interrupted export left
        stage.mkdir(parents=True)
        try:
            (stage / LABELS_FILE).write_text("".join(f"{c}\n" for c in class_names))
            if "savedmodel" in formats:
                from keras_vit.export._graph import write_saved_model

                sm_dir = stage / str(version)
                log(f"Writing the TF Serving SavedModel (version {version}) ...", flush=True)
                write_saved_model(infer, class_names, sm_dir, top_k=top_k)
                report.version, report.saved_model_dir = version, str(sm_dir)
                result = FormatResult("savedmodel", str(sm_dir), _dir_size(sm_dir),
                                      tolerance=SAVEDMODEL_TOLERANCE if verify else None)
                if verify:
                    log("Verifying it in a fresh process with TensorFlow only ...", flush=True)
                    _verify_saved_model(sm_dir, class_names, test, reference, result)
                report.results.append(result)

            if "tflite" in formats:
                report.results += _export_tflite(infer, stage, name, tflite_variants, run, test,
                                                 reference, max_calibration_images, log)
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
        if verbose:
            print_report(report)
        raise ExportVerificationError(
            "Export verification FAILED for " + ", ".join(r.format for r in report.failures)
            + f": the exported files do not give the Keras model's answers. Nothing in {out} "
            f"was replaced; the failed files are in {failed}.\n" + format_report(report))
    _publish(stage, out, name, version, report)
    if verbose:
        print_report(report)
    return report


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

def _keras_reference(model, image_size, test, run_path):
    """The Keras model's probabilities on the held-out images, preprocessed as in training."""
    import tensorflow as tf

    from keras_vit.model import class_probabilities
    from keras_vit.preprocessing import preprocess

    @tf.function(reduce_retracing=True)
    def probabilities(pixels):
        return class_probabilities(model, model(preprocess(pixels, image_size), training=False))

    def run(pixels):
        pixels = np.asarray(pixels)
        return np.concatenate([probabilities(tf.constant(pixels[i:i + 64])).numpy()
                               for i in range(0, len(pixels), 64)])

    probs = run(test["images"])
    from keras_vit.export._tflite import median_ms

    one = tf.constant(test["images"][:1])
    latency = median_ms(lambda: probabilities(one).numpy())
    model_file = Path(run_path) / "model.keras"
    result = FormatResult("keras", str(model_file),
                          model_file.stat().st_size if model_file.is_file() else 0,
                          accuracy=_accuracy(probs, test["labels"]), latency_ms=latency,
                          notes="the reference: model.keras, keras_vit.preprocess, softmax")
    return {"probabilities": probs, "run": run, "result": result}


def _held_out(run, verify):
    images = run.samples.get("test_images")
    if images is None or len(images) == 0:
        if verify:
            raise ValueError(
                f"{run.path}/samples.npz has no test_images: verification compares every "
                "exported file with the Keras model on held-out images. Re-run training (it "
                "writes them) or export with verify=False (--no-verify).")
        return None
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{run.path}/samples.npz test_images must be uint8 [n, H, W, 3], "
                         f"got {images.dtype} {images.shape}")
    labels = run.samples.get("test_labels")
    return {"images": images,
            "labels": None if labels is None else np.asarray(labels).astype(np.int64)}


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

    run = reference["run"]
    encoded = _encoded_variants(test["images"])
    # The Keras side decodes with the same TensorFlow decoders, one image at a time.
    expected_bytes = np.concatenate([
        run(tf.io.decode_image(b, channels=3, expand_animations=False).numpy()[None])
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

def _export_tflite(infer, out, name, variants, run, test, reference, max_calibration, log):
    from keras_vit.export import _tflite
    from keras_vit.export._graph import write_fixed_size_saved_model

    calibration = run.samples.get("calibration_images")
    results = []
    with tempfile.TemporaryDirectory(prefix="keras_vit_tflite_") as tmp:
        write_fixed_size_saved_model(infer, Path(tmp) / "fixed")
        for variant in variants:
            path = out / tflite_filename(name, variant)
            log(f"Converting to TFLite ({variant}) -> {path} ...", flush=True)
            cal = None if calibration is None else np.asarray(calibration)[:max_calibration]
            with _tflite.quiet_stderr():
                content = _tflite.convert(Path(tmp) / "fixed", variant, cal)
            _tflite.check_builtin_only(content, path.name)
            path.write_bytes(content)
            result = FormatResult(f"tflite_{variant}", str(path), path.stat().st_size,
                                  tolerance=TFLITE_FLOAT32_TOLERANCE
                                  if variant == "float32" and reference else None)
            if reference is not None:
                _verify_tflite(path, test, reference, result)
            results.append(result)
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


@contextlib.contextmanager
def _quiet_if_tflite():
    from keras_vit.export._tflite import quiet_stderr

    with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
        yield


# --- ONNX ----------------------------------------------------------------------------------

def _export_onnx(infer, out, name, test, reference, log):
    from keras_vit.export import _onnx

    path = out / f"{name}.onnx"
    log(f"Exporting ONNX -> {path} ...", flush=True)
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


@contextlib.contextmanager
def _float32_policy():
    """Export traces in float32 whatever policy training left set globally."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _float32_model(run):
    """The run's model with float32 layers: a mixed-precision model is cloned layer by layer
    with float32 policies (same structure, call arguments and weights, whatever the build
    took from a checkpoint) and given the same weights."""
    model = run.model
    policies = {layer.dtype_policy.name for layer in model._flatten_layers(include_self=True)}
    if policies <= {"float32"}:
        return model
    import keras

    def float32_layer(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    rebuilt = keras.models.clone_model(model, clone_function=float32_layer)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


class _Log:
    """Progress lines with the time since the export started."""

    def __init__(self, verbose):
        import time

        self.verbose, self.clock, self.start = verbose, time.perf_counter, time.perf_counter()

    def __call__(self, message, **kwargs):
        if self.verbose:
            print(f"[{self.clock() - self.start:6.1f}s] {message}", flush=True)


# --- CLI -----------------------------------------------------------------------------------

def add_arguments(parser):
    parser.add_argument("run_dir", help="a finished run folder (config.json, model.keras, "
                                        "samples.npz), e.g. runs/digits")
    parser.add_argument("--out", help="output folder, e.g. exported/digits "
                                      "(default: exported/<run folder name>)")
    parser.add_argument("--name", help="file-name stem of the TFLite/ONNX files "
                                       "(default: the --out folder's name)")
    parser.add_argument("--version", type=int, default=1,
                        help="TF Serving version folder of the SavedModel (default: 1)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS,
                        default=["savedmodel", "tflite"],
                        help="what to write (default: savedmodel tflite)")
    parser.add_argument("--tflite-variants", nargs="+", choices=TFLITE_VARIANTS,
                        default=list(TFLITE_VARIANTS),
                        help="TFLite files to write (default: all four)")
    parser.add_argument("--top-k", type=positive_int, default=5,
                        help="classes in the SavedModel's top_k_* outputs (default: 5)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip comparing the files with the Keras model (not recommended)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the report (table and notes)")


def run(args):
    out = args.out or str(Path("exported") / Path(args.run_dir).resolve().name)
    try:
        report = export_run(args.run_dir, out, name=args.name, version=args.version,
                            formats=tuple(args.formats),
                            tflite_variants=tuple(args.tflite_variants), top_k=args.top_k,
                            verify=not args.no_verify, verbose=not args.quiet)
    except ExportVerificationError as e:  # exit 1: exported, but not the Keras model's answers
        print(f"keras-vit export: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, ImportError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"keras-vit export: error: {e}", file=sys.stderr)  # exit 2: could not export
        return 2
    if args.quiet:
        print_report(report)
    return 0
