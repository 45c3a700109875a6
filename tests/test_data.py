"""Image folders: every common format loads as RGB; unreadable files are reported and skipped."""

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from keras_vit.images import normalize, resize_image
from keras_vit.training.data import DataError, load_folder, scan_folder
from tests import processes


def write_image(path, mode, fmt, size=(12, 10), seed=0):
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
    if fmt == "GIF":
        image = image.convert("P")
    image.save(path, fmt)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    good = []
    for label in ("cat", "dog"):
        (root / label).mkdir()
        for i, (mode, fmt, ext) in enumerate([
                ("RGB", "JPEG", "jpg"), ("RGB", "PNG", "png"), ("L", "PNG", "png"),
                ("RGBA", "PNG", "png"), ("RGB", "BMP", "bmp"), ("RGB", "GIF", "gif"),
                ("L", "JPEG", "jpeg")] * 2):
            path = root / label / f"{label}_{i}.{ext}"
            write_image(path, mode, fmt, seed=i)
            good.append(path)
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(jpeg, "JPEG")
    bad = {
        root / "cat" / "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 3],
        root / "cat" / "noise.png": os.urandom(300),
        root / "dog" / "notes.txt": b"not an image at all\n",
        root / "dog" / "empty.jpg": b"",
    }
    for path, contents in bad.items():
        path.write_bytes(contents)
    return root, good, sorted(bad)


def test_scan_reports_each_unreadable_file_and_keeps_the_rest(image_folder):
    root, good, bad = image_folder
    paths, labels, class_names, skipped, sizes = scan_folder(root)
    assert class_names == ["cat", "dog"]
    assert sorted(paths) == sorted(str(p) for p in good)
    assert len(skipped) == 4
    assert sorted(line.split(": ")[0] for line in skipped) == [str(p) for p in bad]
    assert (np.bincount(labels) == [14, 14]).all()
    # Each readable image's stored size, for the defaults that fit the data.
    assert len(sizes) == len(paths) and all(len(size) == 2 and min(size) > 0 for size in sizes)


@pytest.fixture()
def counted_scan(image_folder, monkeypatch, tmp_path):
    """A copy of the image folder (tests change files), a fresh scan cache, and the list of
    files each scan decodes."""
    import shutil

    from keras_vit.training import data

    source, good, bad = image_folder
    root = tmp_path / "folder"
    shutil.copytree(source, root)
    monkeypatch.setenv("KERAS_VIT_CACHE", str(tmp_path / "cache"))
    decoded = []
    check = data._check_image_file
    monkeypatch.setattr(data, "_check_image_file", lambda path: decoded.append(path) or check(path))
    return (root, [root / p.relative_to(source) for p in good],
            [str(root / p.relative_to(source)) for p in bad], decoded)


def test_a_later_scan_decodes_only_files_added_changed_or_failed(counted_scan):
    # The readable files are kept with their size, times and inode, so a resumed run (or
    # the next run on the folder) does not decode every image again.
    from keras_vit.training import data

    root, good, bad, decoded = counted_scan
    first = scan_folder(root)
    assert len(decoded) == len(good) + len(bad) and data.scan_cache_file(root).exists()
    decoded.clear()
    again = scan_folder(root)
    assert sorted(decoded) == sorted(bad)  # failures are checked again, the rest is known
    assert again[0] == first[0] and again[3] == first[3] and (again[1] == first[1]).all()
    assert again[4] == first[4]  # the sizes come from the cache

    truncated, rewritten = good[0], good[1]
    truncated.write_bytes(truncated.read_bytes()[:100])
    stat = rewritten.stat()  # same size and modification time: only ctime/inode tell
    rewritten.write_bytes(b"\0" * stat.st_size)
    os.utime(rewritten, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    added = root / "dog" / "added.png"
    write_image(added, "RGB", "PNG")
    decoded.clear()
    third = scan_folder(root)
    assert sorted(decoded) == sorted(bad + [str(truncated), str(rewritten), str(added)])
    assert str(added) in third[0]
    for spoiled in (truncated, rewritten):
        assert str(spoiled) not in third[0]
        assert any(line.startswith(f"{spoiled}: ") for line in third[3])


def test_a_failed_read_is_not_remembered(counted_scan, monkeypatch):
    # A file that failed once (say a passing I/O error) is decoded again next time.
    from keras_vit.training import data

    root, good, bad, decoded = counted_scan
    check = data._check_image_file
    flaky = str(good[0])
    monkeypatch.setattr(data, "_check_image_file",
                        lambda path: ("Input/output error", None) if path == flaky else check(path))
    assert any(line.startswith(flaky) for line in scan_folder(root)[3])
    monkeypatch.setattr(data, "_check_image_file", check)
    assert flaky in scan_folder(root)[0]


def test_a_broken_link_is_reported_not_fatal(counted_scan):
    root, good, bad, decoded = counted_scan
    (root / "cat" / "gone.png").symlink_to(root / "cat" / "never_there.png")
    paths, _, _, skipped, _ = scan_folder(root)
    assert len(paths) == len(good)
    assert any(line.startswith(str(root / "cat" / "gone.png")) for line in skipped)


def test_scan_works_without_a_usable_cache(image_folder, monkeypatch, tmp_path):
    from keras_vit.training import data

    root, good, bad = image_folder
    monkeypatch.setenv("KERAS_VIT_CACHE", str(tmp_path / "cache"))
    cache = data.scan_cache_file(root)
    cache.parent.mkdir(parents=True)
    for contents in ("{ not json", '{"files": []}', '{"files": null}', "[]"):
        cache.write_text(contents)  # e.g. a disk that filled mid-write, or another version
        assert len(scan_folder(root)[0]) == len(good)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("KERAS_VIT_CACHE", str(blocker))  # cannot hold a cache folder
    paths, _, _, skipped, _ = scan_folder(root)
    assert len(paths) == len(good) and len(skipped) == len(bad)
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob("**/*.partial"))


def test_every_format_loads_as_rgb_at_the_model_size(image_folder):
    root, good, _ = image_folder
    data = load_folder(root, (8, 8), validation_split=0.2, test_split=0.2)
    assert sum(data.sizes.values()) == len(good) and len(data.skipped) == 4
    images = [x for split in (data.train, data.validation, data.test)
              for x, _ in split.as_numpy_iterator()]
    assert len(images) == len(good)
    assert all(x.shape == (8, 8, 3) and x.dtype == np.uint8 for x in images)
    counts = {name: size for name, size in data.sizes.items()}
    assert counts["validation"] >= 4 and counts["test"] >= 4  # stratified: some of each class


def write_split_folders(root, counts):
    """root/SPLIT/CLASS/*.png with counts[SPLIT] images per class."""
    for split, count in counts.items():
        for label in ("daisy", "tulip"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                write_image(root / split / label / f"{i}.png", "RGB", "PNG", size=(8, 8), seed=i)


@pytest.mark.parametrize("given", [("train", "val"), ("train", "test"),
                                   ("Train", "Validation", "Test"), ("training", "valid"),
                                   ("train",)])
def test_split_folders_are_the_splits_and_missing_ones_come_from_train(tmp_path, given):
    counts = {"train": 10, "val": 3, "test": 4}
    split_of = {"training": "train", "valid": "val", "validation": "val"}
    counts = {name: counts[split_of.get(name.lower(), name.lower())] for name in given}
    write_split_folders(tmp_path, counts)
    (tmp_path / "__MACOSX").mkdir()  # left by unzipping: neither a split nor a class
    data = load_folder(tmp_path, (8, 8), validation_split=0.2, test_split=0.3)
    assert data.class_names == ["daisy", "tulip"]  # never the split names
    given = {split_of.get(name.lower(), name.lower()) for name in given}
    drawn = {"validation": 2 * 2, "test": 2 * 3}  # 20% and 30% of each class's 10 train images
    expected_val = 2 * 3 if "val" in given else drawn["validation"]
    expected_test = 2 * 4 if "test" in given else drawn["test"]
    expected_train = 2 * 10 - (0 if "val" in given else drawn["validation"]) \
        - (0 if "test" in given else drawn["test"])
    assert data.sizes == {"train": expected_train, "validation": expected_val,
                          "test": expected_test}
    labels = {split: [y for _, y in getattr(data, split).as_numpy_iterator()]
              for split in ("train", "validation", "test")}
    assert all(set(y) == {0, 1} for y in labels.values())  # stratified: both classes
    # Shuffled, not class by class: export calibrates on the first training images and
    # verifies on the first test images, which must span the classes.
    assert set(labels["train"][:6]) == {0, 1} and set(labels["test"][:4]) == {0, 1}


def test_split_folders_with_stray_or_mismatched_classes_say_what_to_do(tmp_path):
    write_split_folders(tmp_path / "a", {"train": 2, "val": 2})
    (tmp_path / "a" / "rose").mkdir()
    with pytest.raises(DataError, match=r"train/ folder and other folders \(rose\).*val/ \(or "):
        load_folder(tmp_path / "a", (8, 8))
    write_split_folders(tmp_path / "c", {"val": 2, "test": 2})
    with pytest.raises(DataError, match="no train/ folder: put the training images in train/"):
        load_folder(tmp_path / "c", (8, 8))
    write_split_folders(tmp_path / "d", {"train": 2, "val": 2, "validation": 2})
    with pytest.raises(DataError, match="two validation folders; keep one"):
        load_folder(tmp_path / "d", (8, 8))
    write_split_folders(tmp_path / "b", {"train": 2, "test": 2})
    (tmp_path / "b" / "test" / "rose").mkdir()
    write_image(tmp_path / "b" / "test" / "rose" / "0.png", "RGB", "PNG")
    with pytest.raises(DataError, match="different class folders"):
        load_folder(tmp_path / "b", (8, 8))


def test_a_zero_validation_split_is_an_empty_split(tmp_path):
    write_split_folders(tmp_path, {"train": 5, "test": 2})
    data = load_folder(tmp_path, (8, 8), validation_split=0.0)
    assert data.sizes == {"train": 10, "validation": 0, "test": 4}
    assert list(data.validation.as_numpy_iterator()) == []


def test_grayscale_becomes_three_equal_channels(tmp_path):
    import tensorflow as tf

    from keras_vit.images import decode_image

    write_image(tmp_path / "g.png", "L", "PNG")
    image = decode_image(tf.io.read_file(str(tmp_path / "g.png"))).numpy()
    assert image.shape == (10, 12, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_resize_and_normalize_match_keras_vit_preprocess():
    import keras_vit

    images = np.random.default_rng(0).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    ours = normalize(resize_image(images, (16, 24))).numpy()
    np.testing.assert_allclose(ours, keras_vit.preprocess(images, (16, 24)), atol=1e-6)


def test_folder_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    with pytest.raises(DataError, match="one sub-folder per class"):
        scan_folder(tmp_path)


@pytest.mark.slow
def test_training_on_a_folder_with_bad_files_survives_the_epoch(image_folder, tmp_path):
    root, _, _ = image_folder
    result = processes.run(
        [sys.executable, "-m", "keras_vit.cli", "train", "--data", f"folder:{root}",
         "--out", str(tmp_path / "run"), "--variant", "Ti/16", "--image-size", "8",
         "--patch-size", "4", "--depth", "1", "--epochs", "1", "--batch-size", "4",
         "--jit-compile", "off", "--no-export", "--verbose", "0"],
        timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # Named on stderr, in the project's words (not TensorFlow's op text), and training went on.
    assert "Warning: Skipped 4 unreadable file(s)" in result.stderr
    assert "truncated.jpg: damaged or truncated JPEG data" in result.stderr
    assert "notes.txt: not an image" in result.stderr
    assert "Op:" not in result.stderr and "function_node" not in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("test accuracy: ")


def test_random_resized_crop_takes_boxes_of_the_asked_area_and_aspect():
    import tensorflow as tf

    from keras_vit.training.data import random_resized_crop

    # Pixel (y, x) holds y and x, so a crop tells where it came from.
    height, width = 120, 200
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image = np.stack([y, x, np.zeros_like(y)], axis=-1).astype(np.uint8)
    areas = []
    for i in range(200):
        crop = random_resized_crop(image, 0.05, tf.constant([7, i])).numpy()
        h, w, _ = crop.shape
        top, left = crop[0, 0, :2]
        np.testing.assert_array_equal(crop, image[top:top + h, left:left + w])
        areas.append(h * w / (height * width))
        if h * w < height * width:  # the whole image is the fallback; boxes keep the aspect
            assert 0.74 <= w / h <= 1.34, (h, w)
    assert 0.05 <= min(areas) < 0.1 and max(areas) > 0.7
    np.testing.assert_array_equal(random_resized_crop(image, 0.05, tf.constant([7, 3])),
                                  random_resized_crop(image, 0.05, tf.constant([7, 3])))


def test_training_and_serving_feed_the_model_the_same_tensor_for_the_same_bytes(tmp_path):
    """One image path: a JPEG and a PNG in an image folder become, in training's pipeline,
    exactly the tensor the SavedModel's serving_default builds from the same bytes."""
    import tensorflow as tf

    from keras_vit.export._graph import inputs_from_bytes
    from keras_vit.training.augment import prepare_evaluation

    rng = np.random.default_rng(7)
    photo = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    files = {"a/photo.jpg": tf.io.encode_jpeg(photo, quality=90).numpy(),
             "b/photo.png": tf.io.encode_png(photo).numpy()}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    for normalization in ("vit", "imagenet"):
        data = load_folder(tmp_path, (16, 24), validation_split=0.0, test_split=0.5, seed=0)
        both = data.train.concatenate(data.test).batch(2)
        images, labels = next(iter(both.map(prepare_evaluation(2, normalization))))
        order = np.argmax(labels.numpy(), axis=1)  # class a: the JPEG, class b: the PNG
        served = inputs_from_bytes(tf.constant([files["a/photo.jpg"], files["b/photo.png"]]),
                                   (16, 24), normalization).numpy()
        np.testing.assert_array_equal(images.numpy(), served[order])
