"""Named checkpoints: download once into the Keras cache, verified; a local server stands in
for the checkpoint bucket (127.0.0.1 only; tests never use the internet)."""

import base64
import hashlib
import http.server
import io
import json
import os
import threading

import numpy as np
import pytest

import keras_vit
from keras_vit.checkpoints import CheckpointError, fetch, named_checkpoints, save_npz
from keras_vit.checkpoints.registry import MIRROR_ENV, cache_dir, resolve
from keras_vit.variants import Variant
from tests.conftest import randomize_weights

TI16_I21K = "augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz"
# A one-block Ti/16 stands in for the real file (same name, so the table finds it).
SHALLOW_TI16 = Variant("Ti/16", 192, 1, 3, 768, 16)


class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}  # path -> (bytes, mode)
    hits = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path.lstrip("/")
        type(self).hits[path] = type(self).hits.get(path, 0) + 1
        if path not in self.files:
            self.send_error(404)
            return
        data, mode = self.files[path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        if mode.startswith("md5_"):
            md5 = base64.b64encode(hashlib.md5(b"other" if "bad" in mode else data).digest())
            if mode.endswith("joined"):  # one folded line
                self.send_header("x-goog-hash", f"crc32c=AAAAAA==,md5={md5.decode()}")
            else:  # as Cloud Storage sends them: one header per hash, crc32c first
                self.send_header("x-goog-hash", "crc32c=AAAAAA==")
                self.send_header("x-goog-hash", f"md5={md5.decode()}")
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if mode == "truncate" else data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def checkpoint_bytes():
    model = randomize_weights(keras_vit.build(SHALLOW_TI16, image_size=32, num_classes=10))
    buffer = io.BytesIO()
    save_npz(model, buffer)
    return buffer.getvalue(), model


@pytest.fixture
def mirror(server, tmp_path, monkeypatch):
    url, handler = server
    handler.files.clear()
    handler.hits.clear()
    monkeypatch.setenv(MIRROR_ENV, url)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return handler


def _cache_files():
    root = cache_dir()
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)


def test_build_downloads_once_into_the_keras_cache_and_verifies_it(mirror, checkpoint_bytes):
    data, original = checkpoint_bytes
    mirror.files[TI16_I21K] = (data, "md5_good")
    x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    model = keras_vit.build(SHALLOW_TI16, image_size=32, num_classes=10, weights="augreg_in21k")
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(original(x)))
    target = os.path.join(cache_dir(), "augreg", os.path.basename(TI16_I21K))
    assert cache_dir().startswith(os.environ["KERAS_HOME"])
    assert set(_cache_files()) == {"augreg/checksums.json", TI16_I21K}
    records = json.load(open(os.path.join(cache_dir(), "augreg", "checksums.json")))
    assert records[os.path.basename(TI16_I21K)]["sha256"] == hashlib.sha256(data).hexdigest()

    keras_vit.build(SHALLOW_TI16, image_size=32, num_classes=10, weights="augreg_in21k")
    assert mirror.hits[TI16_I21K] == 1  # the second build used the cache
    pinned = hashlib.sha256(data).hexdigest().upper()  # a pin in capitals checks the cache too
    assert fetch("augreg_in21k", "Ti/16", sha256=pinned, progress=False) == target

    with open(target, "r+b") as f:  # the cached file changes behind our back
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CheckpointError, match="changed or is corrupt. Delete it"):
        fetch("augreg_in21k", "Ti/16", progress=False)


@pytest.mark.parametrize("mode,sha256,message", [
    ("ok", "0" * 64, "Checksum mismatch for http://127.0.0.1"),
    ("truncate", None, "truncated"),
    ("md5_bad", None, "does not match the server's x-goog-hash"),
    ("md5_bad_joined", None, "does not match the server's x-goog-hash"),
])
def test_failed_downloads_raise_and_leave_no_file(mirror, checkpoint_bytes, mode, sha256,
                                                  message):
    mirror.files[TI16_I21K] = (checkpoint_bytes[0], mode)
    with pytest.raises(CheckpointError, match=message):
        fetch("augreg_in21k", "Ti/16", sha256=sha256, progress=False)
    assert _cache_files() == []  # no partial or unverified file left behind


def test_corrupt_archive_and_http_errors(mirror, checkpoint_bytes):
    data = bytearray(checkpoint_bytes[0])
    data[len(data) // 2] ^= 0xFF  # right length, broken content: the zip CRC catches it
    mirror.files[TI16_I21K] = (bytes(data), "ok")
    with pytest.raises(CheckpointError, match="CRC-32|not a complete .npz"):
        fetch("augreg_in21k", "Ti/16", progress=False)
    assert _cache_files() == []
    with pytest.raises(CheckpointError, match="HTTP Error 404") as caught:
        fetch("augreg_in21k_ft_in1k", "Ti/16", progress=False)
    assert "Offline?" not in str(caught.value)  # the server answered: no network advice
    assert _cache_files() == []


def test_named_table_and_name_resolution(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    rows = named_checkpoints()
    tags = {(r["tag"], r["variant"]) for r in rows}
    for variant in ("Ti/16", "S/32", "S/16", "B/32", "B/16", "L/16", "R+Ti/16", "R26+S/32",
                    "R50+L/32"):
        assert ("augreg_in21k", variant) in tags and ("augreg_in21k_ft_in1k", variant) in tags
    row = resolve("augreg_in21k_ft_in1k_384", "B/16")
    assert row["url"] == ("https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-"
                          "lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-"
                          "lr_0.01-res_384.npz")
    assert row["resolution"] == 384 and row["num_classes"] == 1000 and row["sha256"] is None
    assert resolve("orig_in21k", "R50+B/16")["url"].endswith("imagenet21k/R50%2BViT-B_16.npz")
    name = "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0"  # any AugReg file
    assert resolve(name)["variant"] == "S/16"
    assert resolve(name + ".npz", "S/16")["path"] == f"augreg/{name}.npz"
    with pytest.raises(CheckpointError, match="is a S/16 checkpoint, not B/16"):
        resolve(name, "B/16")
    with pytest.raises(CheckpointError, match="No published 'augreg_in1k' checkpoint for "
                                              "variant 'Ti/16'; 'augreg_in1k' exists for B/16"):
        keras_vit.build("Ti/16", weights="augreg_in1k")
    with pytest.raises(CheckpointError, match="needs a variant"):
        resolve("augreg_in21k")
