#!/usr/bin/env python3
"""Asks a TF Serving server for the top-5 classes of image files.

    # gRPC (port 8500), PredictRequest from tensorflow-serving-api
    python scripts/serving_client.py --model digits photo.jpg another.png
    # REST (port 8501), JSON with base64 image bytes
    python scripts/serving_client.py --rest --model digits photo.jpg

Needs `pip install -e '.[serving]'` (tensorflow-serving-api, grpcio) for gRPC; the REST
mode needs only the standard library. The server is the one started with

    docker run -p 8500:8500 -p 8501:8501 \
        -v "$PWD/exported/digits:/models/digits" -e MODEL_NAME=digits tensorflow/serving

and the model's `serving_default` signature decodes, resizes and normalises the images
itself, so the client sends the files' bytes as they are.
"""

import argparse
import base64
import json
import sys
import urllib.request
from pathlib import Path


def make_request(image_bytes, model_name, signature_name="serving_default", version=None):
    """A `PredictRequest` carrying the encoded images as the `image_bytes` string tensor."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    request.inputs["image_bytes"].CopyFrom(
        tf.make_tensor_proto(list(image_bytes), dtype=tf.string, shape=[len(image_bytes)]))
    return request


def parse_response(response):
    """PredictResponse -> per image, a list of (label, score), best first."""
    import tensorflow as tf

    labels = tf.make_ndarray(response.outputs["top_k_labels"])
    scores = tf.make_ndarray(response.outputs["top_k_scores"])
    return [[(lab.decode("utf-8"), float(s)) for lab, s in zip(row_l, row_s)]
            for row_l, row_s in zip(labels, scores)]


def predict_grpc(image_bytes, model_name, host="localhost:8500", timeout=30.0):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(host) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return parse_response(stub.Predict(make_request(image_bytes, model_name), timeout))


def rest_body(image_bytes, signature_name="serving_default"):
    """The JSON body of a REST predict call: TF Serving decodes {"b64": ...} to bytes."""
    return json.dumps({"signature_name": signature_name,
                       "instances": [{"b64": base64.b64encode(b).decode("ascii")}
                                     for b in image_bytes]})


def parse_rest(reply):
    """REST reply (row format) -> per image, a list of (label, score), best first."""
    return [list(zip(p["top_k_labels"], map(float, p["top_k_scores"])))
            for p in reply["predictions"]]


def predict_rest(image_bytes, model_name, url="http://localhost:8501", timeout=30.0):
    request = urllib.request.Request(
        f"{url}/v1/models/{model_name}:predict", data=rest_body(image_bytes).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return parse_rest(json.load(reply))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="JPEG/PNG/BMP/GIF files")
    parser.add_argument("--model", required=True, help="MODEL_NAME the server was started with")
    parser.add_argument("--rest", action="store_true", help="use the REST API (port 8501)")
    parser.add_argument("--host", default=None,
                        help="gRPC host:port (default localhost:8500) or REST URL "
                             "(default http://localhost:8501)")
    args = parser.parse_args(argv)
    data = [Path(p).read_bytes() for p in args.images]
    if args.rest:
        results = predict_rest(data, args.model, args.host or "http://localhost:8501")
    else:
        results = predict_grpc(data, args.model, args.host or "localhost:8500")
    for path, top in zip(args.images, results):
        print(path)
        for rank, (label, score) in enumerate(top, 1):
            print(f"  {rank}. {label}  {100 * score:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
