"""Published checkpoints by name, downloaded once into the Keras cache and verified.

Names are tags completed by the variant given to `build`:

| tag                       | file                                           | classes | res     |
|---------------------------|------------------------------------------------|---------|---------|
| augreg_in21k              | AugReg, ImageNet-21k pre-training              | 21843   | 224     |
| augreg_in21k_ft_in1k      | AugReg i21k, fine-tuned on ImageNet-1k         | 1000    | 224     |
| augreg_in21k_ft_in1k_384  | the same at 384                                | 1000    | 384     |
| augreg_in1k / _384        | AugReg ImageNet-1k pre-training, fine-tuned    | 1000    | 224/384 |
| orig_in21k                | the paper's i21k checkpoints (with pre_logits) | 21843   | 224     |
| orig_in21k_ft_in1k / _224 | the paper's i21k -> ImageNet-1k fine-tunes     | 1000    | 384/224 |

The AugReg choices (one recommended file per variant, from the paper's
index.csv) are those timm ships as `vit_*.augreg_*`; any other AugReg file can
be named by its file name (e.g. "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0").
`named_checkpoints()` lists the table.

Integrity: Google publishes no checksums for these files (the vision_transformer
README and AugReg index.csv list none), so the table's `sha256` is None and
verification works as follows:

1. while downloading: the byte count must equal Content-Length, and the MD5 in
   Google Cloud Storage's `x-goog-hash` response header (when sent) must match;
2. the archive must be a complete zip whose members all pass their CRC-32;
3. a pinned `sha256` (in the table, or `sha256=` given by the caller) must match;
4. otherwise the SHA-256 of the first good download is recorded in
   `checksums.json` in the cache folder and every later use of the cached file
   is checked against it (trust on first use).

A download goes to a temporary file in the cache folder and is renamed into
place only after all checks pass; on any failure the partial file is removed.
"""

import base64
import hashlib
import http.client
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile

from keras_vit.checkpoints.core import CheckpointError

BASE_URL = "https://storage.googleapis.com/vit_models/"
MIRROR_ENV = "KERAS_VIT_CHECKPOINT_MIRROR"  # replaces BASE_URL (e.g. an internal mirror)

_A = "augreg/"
_FT = "--imagenet2012-steps_20k-lr_{lr}-res_{res}"
_AUGREG_I21K = {
    "Ti/16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "S/32": "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "S/16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "B/32": "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0",
    "B/16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "B/8": "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "L/16": "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1",
    "R+Ti/16": "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "R26+S/32": "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0",
    "R50+L/32": "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0",
}
# (variant, resolution): (pre-training file, fine-tuning learning rate)
_AUGREG_I21K_FT = {
    ("Ti/16", 224): ("Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", "0.03"),
    ("Ti/16", 384): ("Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", "0.03"),
    ("S/32", 224): ("S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    ("S/32", 384): ("S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    ("S/16", 224): ("S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    ("S/16", 384): ("S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    ("B/32", 224): ("B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    ("B/32", 384): ("B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0", "0.03"),
    ("B/16", 224): ("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", "0.01"),
    ("B/16", 384): ("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", "0.01"),
    ("B/8", 224): ("B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", "0.01"),
    ("L/16", 224): ("L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1", "0.01"),
    ("L/16", 384): ("L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1", "0.01"),
    ("R+Ti/16", 224): ("R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", "0.03"),
    ("R+Ti/16", 384): ("R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", "0.03"),
    ("R26+S/32", 224): ("R26_S_32-i21k-300ep-lr_0.001-aug_light0-wd_0.03-do_0.1-sd_0.1", "0.03"),
    ("R26+S/32", 384): ("R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0", "0.03"),
    ("R50+L/32", 224): ("R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1", "0.01"),
    ("R50+L/32", 384): ("R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0", "0.01"),
}
_AUGREG_I1K = {
    "S/16": "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0",
    "B/32": "B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1",
    "B/16": "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1",
}
_ORIG = {"B/16": "ViT-B_16", "B/32": "ViT-B_32", "L/16": "ViT-L_16", "L/32": "ViT-L_32",
         "H/14": "ViT-H_14", "R50+B/16": "R50+ViT-B_16"}


def _table():
    rows = []

    def add(tag, variant, path, classes, res):
        rows.append({"tag": tag, "variant": variant, "path": path, "num_classes": classes,
                     "resolution": res, "sha256": None})

    for variant, stem in _AUGREG_I21K.items():
        add("augreg_in21k", variant, f"{_A}{stem}.npz", 21843, 224)
    for (variant, res), (stem, lr) in _AUGREG_I21K_FT.items():
        tag = "augreg_in21k_ft_in1k" + ("" if res == 224 else f"_{res}")
        add(tag, variant, f"{_A}{stem}{_FT.format(lr=lr, res=res)}.npz", 1000, res)
    for variant, stem in _AUGREG_I1K.items():
        for res in (224, 384):
            tag = "augreg_in1k" + ("" if res == 224 else f"_{res}")
            add(tag, variant, f"{_A}{stem}{_FT.format(lr='0.01', res=res)}.npz", 1000, res)
    for variant, stem in _ORIG.items():
        add("orig_in21k", variant, f"imagenet21k/{stem}.npz", 21843, 224)
        if variant != "H/14":
            add("orig_in21k_ft_in1k", variant, f"imagenet21k+imagenet2012/{stem}.npz", 1000, 384)
        if variant in ("B/16", "L/16"):
            add("orig_in21k_ft_in1k_224", variant, f"imagenet21k+imagenet2012/{stem}-224.npz",
                1000, 224)
    return rows


_ROWS = _table()
TAGS = tuple(dict.fromkeys(row["tag"] for row in _ROWS))
_AUGREG_FILE = re.compile(r"^(Ti|S|B|L|R_Ti|R26_S|R26_B|R50_L)_(\d+)-i(1k|21k|21k_30)-300ep-"
                          r"[A-Za-z0-9_.\-]+?(\.npz)?$")


def base_url():
    mirror = os.environ.get(MIRROR_ENV)
    return (mirror.rstrip("/") + "/") if mirror else BASE_URL


def named_checkpoints(variant=None):
    """The table of published checkpoints: dicts with tag, variant, url, num_classes,
    resolution and sha256 (None: not published; see the module docstring)."""
    rows = [dict(row, url=base_url() + urllib.parse.quote(row["path"])) for row in _ROWS]
    if variant is not None:
        rows = [row for row in rows if row["variant"] == _variant_name(variant)]
    return rows


def _variant_name(variant):
    return getattr(variant, "name", variant)


def _augreg_variant(stem):
    size, _, patch = stem.split("-")[0].rpartition("_")
    size = {"R_Ti": "R+Ti", "R26_S": "R26+S", "R26_B": "R26+B", "R50_L": "R50+L"}.get(size, size)
    return f"{size}/{patch}"


def is_name(weights):
    """True if `weights` is a published name rather than a path."""
    text = str(weights)
    return text in TAGS or bool(_AUGREG_FILE.match(os.path.basename(text)) and "/" not in text)


def resolve(name, variant=None):
    """The table row (with url) for a tag and variant, or for an AugReg file name."""
    variant = _variant_name(variant)
    if name in TAGS:
        if variant is None:
            raise CheckpointError(f"Checkpoint name {name!r} needs a variant, e.g. "
                                  f"build('B/16', weights={name!r}), or for an existing "
                                  f"model load_checkpoint(model, fetch({name!r}, 'B/16')).")
        for row in named_checkpoints():
            if row["tag"] == name and row["variant"] == variant:
                return row
        have = sorted(row["variant"] for row in _ROWS if row["tag"] == name)
        raise CheckpointError(f"No published {name!r} checkpoint for variant {variant!r}; "
                              f"{name!r} exists for {', '.join(have)}.")
    if _AUGREG_FILE.match(name):
        stem = name[:-4] if name.endswith(".npz") else name
        file_variant = _augreg_variant(stem)
        if variant is not None and variant != file_variant:
            raise CheckpointError(f"{name!r} is a {file_variant} checkpoint, not {variant}.")
        res = re.search(r"-res_(\d+)$", stem)
        row = {"tag": stem, "variant": file_variant, "path": f"{_A}{stem}.npz",
               "num_classes": 1000 if res else None, "resolution": int(res[1]) if res else 224,
               "sha256": None}
        return dict(row, url=base_url() + urllib.parse.quote(row["path"]))
    raise CheckpointError(f"Unknown checkpoint name {name!r}; names are {', '.join(TAGS)} "
                          "or an AugReg file name (see keras_vit.checkpoints.named_checkpoints()).")


def cache_dir():
    """`$KERAS_HOME/models/keras_vit` (default `~/.keras/models/keras_vit`)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models", "keras_vit")


def fetch(name, variant=None, *, sha256=None, cache=None, progress=True):
    """Downloads a named checkpoint once into the cache (verified) and returns its path."""
    row = resolve(name, variant)
    cache = cache or cache_dir()
    target = os.path.join(cache, *row["path"].split("/"))
    return download(row["url"], target, sha256=sha256 or row["sha256"], progress=progress)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _records_path(target):
    return os.path.join(os.path.dirname(os.path.abspath(target)), "checksums.json")


def _read_records(target):
    try:
        with open(_records_path(target)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _record(target, digest, url):
    records = _read_records(target)
    records[os.path.basename(target)] = {"sha256": digest, "url": url}
    path = _records_path(target)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".json.part")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(records, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_zip(path, url):
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"Download of {url} is not a complete .npz archive: {err}") from err
    if bad is not None:
        raise CheckpointError(f"Download of {url} is corrupt: member {bad!r} fails its CRC-32.")


def _goog_md5(headers):
    # Cloud Storage sends one x-goog-hash header per hash (crc32c first, then md5); a proxy
    # may fold them into one comma-separated line. Read them all.
    for part in ",".join(headers.get_all("x-goog-hash") or []).split(","):
        kind, _, value = part.strip().partition("=")
        if kind == "md5" and value:
            return base64.b64decode(value).hex()
    return None


def download(url, target, *, sha256=None, progress=True, timeout=60):
    """Downloads `url` to `target` unless a verified copy is there; returns `target`.

    See the module docstring for the checks. Raises `CheckpointError` (and
    leaves no file behind) on a failed, truncated or mismatching download.
    """
    sha256 = sha256.lower() if sha256 else None  # hex digests are compared as lowercase
    if os.path.exists(target):
        digest = _sha256(target)
        known = sha256 or _read_records(target).get(os.path.basename(target), {}).get("sha256")
        if known is None:  # placed there by hand: trust it now, check it from now on
            _record(target, digest, url)
        elif digest != known:
            raise CheckpointError(
                f"Cached checkpoint {target} has SHA-256 {digest}, but {known} was "
                f"{'expected' if sha256 else 'recorded when it was downloaded'}; the file "
                "changed or is corrupt. Delete it to download it again.")
        return target
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(target) + ".",
                               suffix=".part")
    try:
        digest, md5, received, length = hashlib.sha256(), hashlib.md5(), 0, None
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, \
                    os.fdopen(fd, "wb") as out:
                fd = None
                length = response.headers.get("Content-Length")
                length = int(length) if length is not None else None
                expected_md5 = _goog_md5(response.headers)
                if progress:
                    size = f" ({length / 1e6:.1f} MB)" if length else ""
                    logging.getLogger("keras_vit.checkpoints").info(
                        f"Downloading {url}{size} -> {target}")
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    md5.update(chunk)
                    received += len(chunk)
        except http.client.IncompleteRead as err:
            raise CheckpointError(f"Download of {url} is truncated: the connection closed "
                                  f"after {received + len(err.partial)} bytes"
                                  + (f" of {length}." if length else ".")) from err
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            unreached = isinstance(err, TimeoutError) or (
                isinstance(err, urllib.error.URLError)
                and not isinstance(err, urllib.error.HTTPError))
            raise CheckpointError(
                f"Download of {url} failed: {err}." + (
                    " Offline? Fetch the file where there is a network and pass its path "
                    "instead of the name (weights=PATH, --weights PATH), or set "
                    f"{MIRROR_ENV} to a mirror of {BASE_URL}." if unreached else "")) from err
        if length is not None and received != length:
            raise CheckpointError(f"Download of {url} is truncated: received {received} of "
                                  f"{length} bytes.")
        if expected_md5 is not None and md5.hexdigest() != expected_md5:
            raise CheckpointError(f"Download of {url} is corrupt: MD5 {md5.hexdigest()} does "
                                  f"not match the server's x-goog-hash {expected_md5}.")
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise CheckpointError(f"Checksum mismatch for {url}: SHA-256 {digest.hexdigest()}, "
                                  f"expected {sha256}.")
        if target.endswith(".npz"):
            _check_zip(tmp, url)
        os.replace(tmp, target)
        _record(target, digest.hexdigest(), url)
    finally:
        if fd is not None:
            os.close(fd)
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
