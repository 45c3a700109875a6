"""Checks an exported SavedModel in a fresh process that has TensorFlow and nothing else.

    python _verify_savedmodel.py SAVED_MODEL_DIR DATA.npz RESULT.json

Run by path (not as a module of keras_vit) by `keras_vit.export`: this file imports no
part of keras_vit, and makes `keras` and `keras_vit` unimportable before TensorFlow is
imported, so the SavedModel is loaded and run exactly as on a TF Serving machine where
neither is installed. DATA.npz holds the held-out inputs and the probabilities the Keras
model gave for them; RESULT.json receives what was measured. Exits 0 when it could
measure (the caller judges the numbers), 1 when the SavedModel could not be run.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder holds keras_vit modules; keep them off the import path
for _name in ("keras", "keras_vit", "tf_keras"):
    sys.modules[_name] = None  # `import keras` now raises ImportError

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

BATCH = 64


def _run(fn, key, inputs):
    outs = {}
    for start in range(0, len(inputs), BATCH):
        result = fn(**{key: tf.constant(inputs[start:start + BATCH])})
        for name, value in result.items():
            outs.setdefault(name, []).append(value.numpy())
    return {name: np.concatenate(parts) for name, parts in outs.items()}


def _check_outputs(outs, expected, class_names, labels=None):
    probs = outs["probabilities"]
    problems = []
    if probs.shape != expected.shape:
        return {"max_abs_diff": None, "problems": [f"probabilities shape {probs.shape}, "
                                                   f"expected {expected.shape}"]}
    k = outs["top_k_indices"].shape[1]
    want_scores = -np.sort(-probs, axis=1)[:, :k]
    if not np.array_equal(outs["top_k_scores"], want_scores):
        problems.append("top_k_scores are not the k largest probabilities")
    if not np.array_equal(np.take_along_axis(probs, outs["top_k_indices"], 1),
                          outs["top_k_scores"]):
        problems.append("top_k_indices do not point at top_k_scores")
    names = np.asarray(class_names, dtype=object)[outs["top_k_indices"]]
    got = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(outs["top_k_labels"])
    if not np.array_equal(got, names):
        problems.append("top_k_labels are not the class names of top_k_indices")
    result = {"max_abs_diff": float(np.abs(probs - expected).max()),
              "agreement": float(np.mean(probs.argmax(1) == expected.argmax(1))),
              "n": int(len(probs)), "problems": problems}
    if labels is not None and len(labels) == len(probs):
        result["accuracy"] = float(np.mean(probs.argmax(1) == labels))
    return result


def _latency_ms(fn, key, one, repeats=10):
    x = tf.constant(one)
    for _ in range(3):
        fn(**{key: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(**{key: x})["probabilities"].numpy()
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


def main(saved_model_dir, data_path, result_path):
    with np.load(data_path, allow_pickle=False) as d:
        data = {k: d[k] for k in d.files}
    class_names = [str(c) for c in data["class_names"]]
    offsets = data["bytes_offsets"]
    blob = data["bytes_blob"].tobytes()
    encoded = [blob[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    labels = data.get("labels")

    loaded = tf.saved_model.load(saved_model_dir)
    sigs = loaded.signatures
    result = {"signatures": sorted(sigs.keys()), "tensorflow": tf.__version__}
    result["serving_default"] = _check_outputs(
        _run(sigs["serving_default"], "image_bytes", np.array(encoded, dtype=object)),
        data["expected_bytes"], class_names)
    result["predict_images_uint8"] = _check_outputs(
        _run(sigs["predict_images_uint8"], "images", data["pixels"]),
        data["expected_pixels"], class_names, labels)
    result["predict_images"] = _check_outputs(
        _run(sigs["predict_images"], "images", data["pixels"].astype(np.float32)),
        data["expected_pixels"], class_names, labels)
    result["predict_images_resized"] = _check_outputs(
        _run(sigs["predict_images"], "images", data["resized"]),
        data["expected_resized"], class_names)

    try:
        sigs["serving_default"](image_bytes=tf.constant([encoded[0], b"not an image"]))
        result["malformed"] = "no error for malformed bytes"
    except tf.errors.InvalidArgumentError as e:
        message = e.message
        result["malformed"] = ("ok" if "image_bytes[1] is not a decodable image" in message
                               else f"unexpected message: {message[:300]}")

    result["latency_ms"] = {
        "predict_images_uint8": _latency_ms(sigs["predict_images_uint8"], "images",
                                            data["pixels"][:1]),
        "serving_default": _latency_ms(sigs["serving_default"], "image_bytes",
                                       np.array(encoded[:1], dtype=object)),
    }
    result["keras_modules_loaded"] = sorted(
        m for m, mod in sys.modules.items()
        if mod is not None and m.split(".")[0] in ("keras", "keras_vit", "tf_keras"))
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:4])  # (run by keras_vit.export with exactly these three arguments)
