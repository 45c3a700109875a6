"""Training data as tf.data pipelines: the embedded digits, image folders, TFDS (TensorFlow only).

Every source yields (uint8 RGB image at the model's size, int label). Images are
decoded and resized once by `keras_vit.images` (bilinear, antialiased, rounded back to
uint8) and cached; the exported serving graph runs the same functions, so a deployed model
sees exactly what training saw.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from keras_vit.errors import DataError
from keras_vit.images import decode_bytes, decode_image, resize_image, to_rgb

AUTOTUNE = tf.data.AUTOTUNE


def as_written(fn):
    """`fn` for `Dataset.map` and `flat_map`, traced as written. keras-vit's pipeline
    functions use TensorFlow ops and decide in Python only on Python values (or call
    tf.cond), so autograph's rewrite of their source, and of the Keras layers they call, is
    not needed: skipping it saves ~1 s of each run's start, ~2 s with augmentations
    (measured: the same weights, bit for bit). A user's augmentation layers run inside
    Keras' `Layer.__call__`, which autograph does not convert either way."""
    return tf.autograph.experimental.do_not_convert(fn)


@dataclasses.dataclass
class Data:
    """Splits of (uint8 [H, W, 3] image, int32 label) at the model's `image_size`.

    Every split is kept before decoding (`undecoded`: file paths, encoded bytes or small
    arrays; `decode` makes one element (image at its own size, label)), so training can
    shuffle and skip examples without decoding them and crop from full-size images.
    """

    undecoded: dict  # split name -> tf.data.Dataset
    decode: Callable
    image_size: tuple
    class_names: list
    sizes: dict  # split name -> number of examples
    skipped: list = dataclasses.field(default_factory=list)  # unreadable files, reported
    # The undecoded elements are small (paths, arrays): a split is shuffled whole, not
    # 10,000 at a time (TFDS: encoded images).
    small_elements: bool = True
    # (height, width) of training images as stored (before resizing), where known.
    source_sizes: list = dataclasses.field(default_factory=list)

    @property
    def typical_size(self):
        """The median (height, width) of the training images as stored, or None."""
        if not self.source_sizes:
            return None
        sizes = np.asarray(self.source_sizes)
        return int(np.median(sizes[:, 0])), int(np.median(sizes[:, 1]))

    def decode_and_resize(self, *example):
        image, label = self.decode(*example)
        return resize_image(image, self.image_size), label

    def split(self, name):
        return self.undecoded[name].map(as_written(self.decode_and_resize),
                                        num_parallel_calls=AUTOTUNE)

    train = property(lambda self: self.split("train"))
    validation = property(lambda self: self.split("validation"))
    test = property(lambda self: self.split("test"))


def _split_indices(labels, fractions, seed):
    """Stratified split of example indices into len(fractions) + 1 parts (the rest first)."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for i, fraction in enumerate(fractions, start=1):
            count = int(round(fraction * len(index)))
            parts[i].extend(index[start:start + count])
            start += count
        parts[0].extend(index[start:])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def keep_share(indices, labels, fraction, seed):
    """A stratified share of `indices` (at least one of each class present), in their order:
    the training images of a data-efficiency run (`train_fraction`); the held-out splits
    stay whole."""
    if fraction >= 1:
        return indices
    rng = np.random.default_rng([seed, 1])
    labels = np.asarray(labels)
    kept = []
    for label in np.unique(labels[indices]):
        members = indices[labels[indices] == label]
        count = max(1, int(round(fraction * len(members))))
        kept.extend(rng.choice(members, count, replace=False))
    return np.sort(np.asarray(kept, dtype=np.int64))


def load_digits(image_size, validation_split=0.1, test_split=0.2, seed=0, train_fraction=1.0):
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), shipped inside the
    scikit-learn package: real data that needs no download."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    images = np.repeat(gray[..., None], 3, axis=-1)
    labels = digits.target
    train, validation, test = _split_indices(labels, [validation_split, test_split], seed)
    train = keep_share(train, labels, train_fraction, seed)
    splits = {"train": train, "validation": validation, "test": test}
    arrays = {k: tf.data.Dataset.from_tensor_slices((images[v], labels[v].astype(np.int32)))
              for k, v in splits.items()}
    return Data(arrays, decode=lambda image, label: (image, label), image_size=image_size,
                class_names=[str(d) for d in range(10)],
                sizes={k: len(v) for k, v in splits.items()}, source_sizes=[(8, 8)])


def _check_image_file(path):
    """(None, (height, width)) for a readable image file, else (what is wrong with it, in
    words for the user, None)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return f"cannot be read ({err.strerror or err})", None
    image, problem = decode_bytes(data)
    return problem, None if image is None else [int(image.shape[0]), int(image.shape[1])]


_NOT_CLASSES = ("__MACOSX",)  # left by unzipping on macOS


def _folders(root):
    """Sub-folder names that can be classes or splits: not hidden, not unzip leftovers."""
    return sorted(p.name for p in root.iterdir() if p.is_dir()
                  and not p.name.startswith(".") and p.name not in _NOT_CLASSES)


SCAN_CACHE_DAYS = 30  # scan caches unused this long are deleted


def scan_cache_file(root):
    """Where a folder's scan keeps the files it found readable: $KERAS_VIT_CACHE (default
    $XDG_CACHE_HOME/keras_vit or ~/.cache/keras_vit)/folder_scans/<hash of the folder's
    absolute path>.json. Delete it to force a full scan."""
    base = os.environ.get("KERAS_VIT_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "keras_vit"
    key = hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:16]
    return Path(base) / "folder_scans" / f"{key}.json"


def _file_identity(path):
    """What must not change for a file's earlier verdict to hold: size, modification and
    status-change times (the latter set by every write, copy or extraction, never by
    hand), inode. None if the file cannot be stat'ed (a broken link): decode it."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _read_scan_cache(path):
    try:
        readable = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # none yet, or unreadable: scan everything
    try:
        os.utime(path)  # in use: not pruned
    except OSError:
        pass
    return readable if isinstance(readable, dict) else {}


def _write_scan_cache(path, root, readable):
    """Replaces the cache at once (a killed or concurrent write never leaves half of one)
    and deletes other folders' caches unused for SCAN_CACHE_DAYS."""
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
        with os.fdopen(handle, "w") as f:
            json.dump({"folder": str(Path(root).resolve()), "files": readable}, f)
        os.replace(partial, path)
        partial = None
        stale = time.time() - SCAN_CACHE_DAYS * 86400
        for other in path.parent.iterdir():
            if other != path and other.stat().st_mtime < stale:
                other.unlink()
    except OSError:
        pass  # a read-only or full disk only costs the next run a full scan
    finally:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)


def scan_folder(root):
    """Lists (path, label) of readable images in root/<class>/..., reporting the others.

    Every file is decoded once, so corrupt, truncated and non-image files are found
    before training and skipped, not fatal to an epoch. The files found readable are kept
    (see `scan_cache_file`) with their size, modification and status-change times and
    inode, so a resumed run, or the next run on the same folder, decodes only the files
    added or changed since and the ones that failed before.

    Returns:
        (paths, labels, class_names, skipped, sizes): skipped is a list of "path: reason",
        sizes the (height, width) of each readable image.

    Raises:
        DataError: no folder, fewer than 2 class folders, no readable image, or a class
            folder without one.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist. Point --data folder:PATH at a "
                        "folder with one sub-folder of images per class.")
    class_names = _folders(root)
    if len(class_names) < 2:
        raise DataError(f"Image folder {root} has {len(class_names)} class sub-folder(s); it needs "
                        "one sub-folder per class (at least 2), e.g. root/cat/*.jpg, root/dog/*.jpg.")
    files, keys = [], []  # keys: paths relative to the folder (it may be moved or mounted)
    for label, name in enumerate(class_names):
        for dirpath, _, filenames in os.walk(root / name):
            names = [f for f in sorted(filenames) if not f.startswith(".")]
            relative = os.path.relpath(dirpath, root)
            files += [(os.path.join(dirpath, f), label) for f in names]
            keys += [os.path.join(relative, f) for f in names]
    cache_file = scan_cache_file(root)
    known = _read_scan_cache(cache_file)  # key -> {"id": identity, "size": [h, w]}
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        identities = list(pool.map(_file_identity, [path for path, _ in files]))
        unknown = [i for i, (key, identity) in enumerate(zip(keys, identities))
                   if identity is None or not isinstance(known.get(key), dict)
                   or known[key].get("id") != identity]
        problems = [None] * len(files)
        sizes = [known[key]["size"] if isinstance(known.get(key), dict) else None
                 for key in keys]
        for i, (problem, size) in zip(unknown, pool.map(_check_image_file,
                                                        [files[i][0] for i in unknown])):
            problems[i], sizes[i] = problem, size
    # Only readable files are kept: a failure (maybe a passing I/O error) is checked again.
    readable = {key: {"id": identity, "size": size}
                for key, identity, problem, size in zip(keys, identities, problems, sizes)
                if problem is None and identity is not None}
    if readable != known:
        _write_scan_cache(cache_file, root, readable)
    good = [i for i, problem in enumerate(problems) if problem is None]
    skipped = [f"{files[i][0]}: {problem}" for i, problem in enumerate(problems) if problem]
    if not good:
        raise DataError(f"No readable images under {root} ({len(skipped)} files could not be "
                        "decoded as JPEG, PNG, BMP or GIF).")
    counts = np.bincount([files[i][1] for i in good], minlength=len(class_names))
    empty = [name for name, count in zip(class_names, counts) if count == 0]
    if empty:
        names = ", ".join(f"{e}/" for e in empty)
        raise DataError(f"{root}: the class folder{'s' if len(empty) > 1 else ''} {names} "
                        f"{'hold' if len(empty) > 1 else 'holds'} no readable image: every "
                        "class needs images (add some, or remove the folder to train without "
                        "that class).")
    paths = [files[i][0] for i in good]
    labels = np.asarray([files[i][1] for i in good])
    return paths, labels, class_names, skipped, [sizes[i] for i in good]


def _file_list(paths, labels):
    # A string tensor even for an empty split (--validation-split 0): [] alone is float32.
    return tf.data.Dataset.from_tensor_slices((tf.constant(list(paths), tf.string),
                                               labels.astype(np.int32)))


# Folder names (any case) that make an image folder's splits.
SPLIT_FOLDERS = {"train": ("train", "training"), "validation": ("validation", "val", "valid"),
                 "test": ("test", "testing")}


def _split_dirs(root):
    """{split: its folder or None}; raises DataError for two folders of one split, or split
    folders without a train folder (they would become classes)."""
    found = {split: [d for d in sorted(root.iterdir())
                     if d.is_dir() and d.name.lower() in names]
             for split, names in SPLIT_FOLDERS.items()}
    for split, dirs in found.items():
        if len(dirs) > 1:
            raise DataError(f"{root} has {' and '.join(d.name + '/' for d in dirs)}: two "
                            f"{split} folders; keep one.")
    if not found["train"] and (found["validation"] or found["test"]):
        others = [d.name + "/" for dirs in found.values() for d in dirs]
        raise DataError(f"{root} has {' and '.join(others)} but no train/ folder: put the "
                        "training images in train/CLASS/ beside them (or, for one folder per "
                        "class, rename the class folders named like splits).")
    return {split: dirs[0] if dirs else None for split, dirs in found.items()}


def load_folder(root, image_size, validation_split=0.1, test_split=0.1, seed=0,
                train_fraction=1.0):
    """An image folder with one sub-folder per class. If it holds a train/ folder (named
    as in `SPLIT_FOLDERS`, any case, with optional validation and test folders beside it,
    each with the same class folders), those are the splits and a missing one is drawn from
    train/; otherwise every split is drawn from the class folders, stratified by class."""
    root = Path(root).expanduser()
    split_dirs = _split_dirs(root) if root.is_dir() else {"train": None}
    if split_dirs["train"] is None:
        paths, labels, class_names, skipped, sizes = scan_folder(root)
        train, validation, test = _split_indices(labels, [validation_split, test_split], seed)
        splits = {name: ([paths[i] for i in idx], labels[idx])
                  for name, idx in (("train", train), ("validation", validation), ("test", test))}
    else:
        used = {d.name for d in split_dirs.values() if d is not None}
        strays = [name for name in _folders(root) if name not in used]
        if strays:
            raise DataError(
                f"{root} holds a train/ folder and other folders ({', '.join(strays)}): split "
                "folders are train/, val/ (or valid/, validation/) and test/, each holding the "
                "class folders; rename or move the others.")
        paths, labels, class_names, skipped, sizes = scan_folder(split_dirs["train"])
        given = {}
        for split in ("validation", "test"):
            if split_dirs[split] is not None:
                split_paths, split_labels, split_classes, split_skipped, _ = \
                    scan_folder(split_dirs[split])
                if split_classes != class_names:
                    raise DataError(f"{split_dirs['train']} and {split_dirs[split]} have "
                                    f"different class folders: {class_names} vs {split_classes}.")
                given[split] = (split_paths, split_labels)
                skipped += split_skipped
        drawn = [split for split in ("validation", "test") if split not in given]
        fractions = {"validation": validation_split, "test": test_split}
        train_idx, *drawn_idx = _split_indices(labels, [fractions[s] for s in drawn], seed)
        given.update({split: ([paths[i] for i in idx], labels[idx])
                      for split, idx in zip(drawn, drawn_idx)})
        splits = {"train": ([paths[i] for i in train_idx], labels[train_idx]),
                  "validation": given["validation"], "test": given["test"]}
    if train_fraction < 1:
        kept = keep_share(np.arange(len(splits["train"][0])), splits["train"][1],
                          train_fraction, seed)
        splits["train"] = ([splits["train"][0][i] for i in kept], splits["train"][1][kept])
    # Each split in a seeded random order, not class by class: the export calibrates int8
    # on the first training images and verifies on the first test images.
    rng = np.random.default_rng(seed)
    for name, (split_paths, split_labels) in splits.items():
        order = rng.permutation(len(split_paths))
        splits[name] = ([split_paths[i] for i in order], np.asarray(split_labels)[order])
    size_of = dict(zip(paths, sizes))
    return Data({name: _file_list(p, y) for name, (p, y) in splits.items()},
                decode=lambda path, label: (decode_image(tf.io.read_file(path)), label),
                image_size=image_size, class_names=class_names,
                sizes={name: len(p) for name, (p, _) in splits.items()}, skipped=skipped,
                source_sizes=[size_of[p] for p in splits["train"][0] if size_of.get(p)])


def load_tfds(name, image_size, data_dir=None, validation_split=0.1, test_split=0.1):
    """A TFDS image-classification dataset already prepared in `data_dir` (never downloads).
    Its train, validation and test splits are used; a missing validation or test split is
    cut from train (`validation_split`, `test_split` of it)."""
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    # Look for the prepared files first: answering "not prepared" must take no time, and
    # creating a TFDS builder imports its dataset code (seconds on a cold start).
    folder = Path(where).expanduser() / name.split(":")[0]
    if not any(folder.glob("**/dataset_info.json")):
        raise DataError(_not_prepared(name, folder, where))
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as err:  # tfds raises several types for unknown names
        raise DataError(f"TFDS has no dataset {name!r}: {str(err).splitlines()[0]}") from err
    if not builder.is_prepared():
        raise DataError(_not_prepared(name, builder.data_dir, where))
    info = builder.info
    image_key = next((k for k in ("image", "img") if k in info.features), None)
    label_key = "label" if "label" in info.features else None
    if image_key is None or label_key is None:
        raise DataError(f"TFDS dataset {name!r} has no image/label features "
                        f"({list(info.features)}); it is not an image-classification dataset.")
    splits = info.splits
    # A split the dataset lacks is cut from the end of train: the test split stays held out.
    drawn = {"validation": validation_split, "test": test_split}
    drawn = {split: int(round(100 * fraction)) for split, fraction in drawn.items()
             if split not in splits}
    start = 100 - sum(drawn.values())
    split_names = {"train": f"train[:{start}%]" if drawn else "train"}
    for split in ("validation", "test"):
        if split in drawn:
            split_names[split] = f"train[{start}%:{start + drawn[split]}%]"
            start += drawn[split]
        else:
            split_names[split] = split

    image_feature = info.features[image_key]

    def undecoded(example):
        return example[image_key], tf.cast(example[label_key], tf.int32)

    def decode(encoded, label):
        return to_rgb(image_feature.decode_example(encoded)), label

    datasets, sizes = {}, {}
    for split, spec in split_names.items():
        empty = drawn.get(split) == 0  # e.g. --validation-split 0: TFDS refuses empty slices
        datasets[split] = builder.as_dataset(
            split="train" if empty else spec, shuffle_files=False,
            decoders={image_key: tfds.decode.SkipDecoding()}).map(as_written(undecoded))
        if empty:
            datasets[split] = datasets[split].take(0)
        sizes[split] = 0 if empty else int(splits[spec].num_examples)
    data = Data(datasets, decode=decode, image_size=image_size,
                class_names=list(info.features[label_key].names), sizes=sizes,
                small_elements=False)
    shape = getattr(image_feature, "shape", (None, None))
    if shape[0] and shape[1]:  # a fixed size (cifar10: 32x32)
        data.source_sizes = [(int(shape[0]), int(shape[1]))]
    else:  # the first images tell
        data.source_sizes = [tuple(int(d) for d in image.shape[:2]) for image, _ in
                             datasets["train"].take(64).map(as_written(decode))
                             .as_numpy_iterator()]
    return data


def _not_prepared(name, folder, where):
    return (f"TFDS dataset {name!r} is not prepared in {folder}. Training never downloads. On "
            f"a machine with internet run `tfds build {name} --data_dir {where}` (or python -c "
            f"\"import tensorflow_datasets as tfds; tfds.load('{name}', data_dir='{where}')\"), "
            f"copy that folder here and pass --data-dir {where}.")


def load_data(spec, image_size, *, data_dir=None, validation_split=0.1, test_split=None, seed=0,
              train_fraction=1.0):
    """Loads "digits", "folder:PATH" or "tfds:NAME" at `image_size` (height, width).
    `train_fraction` < 1 keeps that share of the training split (stratified by class for
    digits and folders; the first examples of a TFDS split)."""
    image_size = tuple(image_size)
    if spec == "digits":
        return load_digits(image_size, validation_split, 0.2 if test_split is None else test_split,
                           seed, train_fraction)
    kind, _, value = spec.partition(":")
    if kind == "folder" and value:
        return load_folder(value, image_size, validation_split,
                           0.1 if test_split is None else test_split, seed, train_fraction)
    if kind == "tfds" and value:
        data = load_tfds(value, image_size, data_dir, validation_split,
                         0.1 if test_split is None else test_split)
        if train_fraction < 1:
            count = max(1, int(round(train_fraction * data.sizes["train"])))
            data.undecoded["train"] = data.undecoded["train"].take(count)
            data.sizes["train"] = count
        return data
    raise DataError(f"Unknown --data {spec!r}: use digits (embedded), folder:PATH (one "
                    "sub-folder per class) or tfds:NAME (with --data-dir).")


def estimated_cache_bytes(data, image_size):
    return sum(data.sizes.values()) * int(np.prod(image_size)) * 3


def random_resized_crop(image, min_area, seed):
    """A random box of `min_area`..1 of the image's area with aspect ratio 3/4..4/3 (the
    reference's inception crop: tf.image.sample_distorted_bounding_box; the whole image when
    10 tries find none). `seed`: 2 integers, the same box for the same seed."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(min_area, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, size)
    crop.set_shape([None, None, image.shape[-1]])  # tf.slice forgets the channels
    return crop


def training_batches(data, batch_size, *, seed, cache=True, crop_area=1.0, skip_batches=0,
                     augment=None):
    """Shuffled, repeated (endless) training batches of uint8 images and int labels, or what
    `augment(images, labels, batch_seed)` makes of them.

    Epoch k presents the train split in an order drawn from (`seed`, k) and batches run
    across epoch ends, so the stream from batch `skip_batches` on is built directly: it
    starts at that batch's epoch and skips within it before decoding (unless the decoded
    images are cached), and a resumed run continues the same stream at no cost.
    `crop_area` < 1: each image is a `random_resized_crop` of at least that share of its
    area, drawn from (`seed`, epoch, position), taken from the full-size decoded image (the
    cached, resized one when cached) and resized to the model's size. `augment` gets each
    batch's own seed, (`seed`, batch number), so its draws are the same in every run and in
    a resumed one (see `keras_vit.training.augment.make_augmenter`).
    """
    examples, decode = data.undecoded["train"], data.decode
    num_examples = int(examples.cardinality())
    if num_examples <= 0:
        raise ValueError(f"The training examples need a known, non-zero size (cardinality "
                         f"{num_examples}); give it with tf.data.experimental.assert_cardinality.")
    if cache:
        examples, decode = data.train.cache(), None
    # Decoded or encoded images are shuffled 10,000 at a time, file names and arrays all at once.
    buffer = num_examples if data.small_elements and not cache else min(num_examples, 10_000)
    first_epoch, offset = divmod(skip_batches * batch_size, num_examples)
    crop = crop_area < 1

    def epoch(k):
        if not tf.executing_eagerly():  # traced: clear this function's graph-level seed, so
            # the order depends on (seed, k) alone (a global seed of 0 would also make
            # TensorFlow compare the tensor seed as a Python bool)
            tf.random.set_seed(None)
        epoch_seed = seed * 1_000_003 + k
        shuffled = examples.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        if not crop:
            return shuffled
        return shuffled.enumerate().map(as_written(lambda i, example: (example, (epoch_seed, i))))

    def decode_crop_and_resize(example, crop_seed):
        image, label = decode(*example) if decode else example
        image = random_resized_crop(image, crop_area, tf.stack(crop_seed))
        return resize_image(image, data.image_size), label

    ds = tf.data.Dataset.counter(first_epoch).flat_map(as_written(epoch)).skip(offset)
    if crop or decode:  # (cached images without crops are ready: no per-image call)
        ds = ds.map(as_written(decode_crop_and_resize if crop else data.decode_and_resize),
                    num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    if augment is None:
        return ds
    return ds.enumerate(skip_batches).map(
        lambda number, batch: augment(*batch, tf.stack([tf.constant(seed, tf.int64), number])),
        num_parallel_calls=AUTOTUNE)


def evaluation_batches(ds, batch_size, cache=True):
    if cache:
        ds = ds.cache()
    return ds.batch(batch_size)


def steps_per_epoch(num_examples, batch_size):
    return max(1, math.floor(num_examples / batch_size))
