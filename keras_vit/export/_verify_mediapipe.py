"""Runs exported .tflite files with MediaPipe Tasks' ImageClassifier, in a process of its own.

    python _verify_mediapipe.py IMAGES.npy RESULT.json FILE.tflite [FILE.tflite ...]

Run by path by `keras_vit.export` (this file imports no part of keras_vit). TensorFlow is made
unimportable first: MediaPipe imports it when it is there (5-6 s) and needs none of it. A
process of its own, with a time limit, because a classifier that fails can hang its process
when it is collected. RESULT.json gets, per file, the top-1 index and category name MediaPipe
gives for each image, or the error it raised. IMAGES.npy: uint8 RGB images at the model size
(MediaPipe resizes other sizes itself, bilinear without antialiasing: not the training path).
"""

import json
import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # this folder holds keras_vit modules; keep them off the import path
for _name in ("tensorflow", "keras", "keras_vit"):
    sys.modules[_name] = None

import numpy as np  # noqa: E402


def main(images_path, result_path, *files):
    import mediapipe as mp
    from mediapipe.tasks import python as mp_tasks
    from mediapipe.tasks.python import vision

    images = np.load(images_path)
    results = {}
    for path in files:
        try:
            options = vision.ImageClassifierOptions(
                base_options=mp_tasks.BaseOptions(model_asset_path=path), max_results=1)
            with vision.ImageClassifier.create_from_options(options) as classifier:
                top = []
                for image in images:
                    answer = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB,
                                                          data=np.ascontiguousarray(image)))
                    best = answer.classifications[0].categories[0]
                    top.append([int(best.index), best.category_name])
            results[path] = {"top1": top}
        except Exception as err:  # noqa: BLE001 - report what MediaPipe said, per file
            results[path] = {"error": f"{type(err).__name__}: {str(err).strip()[:500]}"}
    with open(result_path, "w") as f:
        json.dump({"mediapipe": mp.__version__, "files": results}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
