"""keras-vit train end to end on the embedded digits (tiny models), and its parts."""

import csv
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from tests import processes
from tests.conftest import kill_at_a_mid_epoch_backup

TINY = ["--variant", "Ti/16", "--image-size", "8", "--patch-size", "2", "--depth", "1",
        "--batch-size", "32", "--jit-compile", "off", "--no-export", "--verbose", "0"]


def train_command(out, *extra):
    return [sys.executable, "-m", "keras_vit.cli", "train", "--out", str(out), *TINY, *extra]


def run_train(out, *extra, timeout=300, fresh=False):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return processes.run(train_command(out, *extra), env=env, timeout=timeout, fresh=fresh)


def printed_fingerprint(stdout):
    return re.search(r"weights fingerprint: (\w+)", stdout).group(1)


def history_epochs(run_dir):
    with open(Path(run_dir) / "history.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    # In two micro-batches (auto keeps these tiny batches whole): the path users of big
    # batches take trains end to end.
    result = run_train(out, "--epochs", "3", "--learning-rate", "3e-3", "--warmup-epochs", "0.5",
                       "--micro-batches", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out, result.stdout


@pytest.mark.slow
def test_run_folder_has_everything_and_the_summary_line(finished_run):
    out, stdout = finished_run
    assert "Ti/16 (8x8 images, 16 tokens of 2x2 px) on digits" in stdout
    assert "XLA off, 2 micro-batches of 16 per replica" in stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("test accuracy: ")
    accuracy = float(last.split(":")[1])
    assert accuracy > 0.2  # 10 classes: chance is 0.1; three epochs of a one-block ViT learn
    with open(out / "history.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert losses[-1] < losses[0]
    config = json.loads((out / "config.json").read_text())
    assert config["finished"] and config["class_names"] == [str(d) for d in range(10)]
    assert abs(config["result"]["test_accuracy"] - accuracy) < 1e-4
    assert config["result"]["steps"] == 3 * config["steps_per_epoch"]
    assert history_epochs(out) == [0, 1, 2]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    with np.load(out / "samples.npz") as samples:
        assert samples["test_images"].dtype == np.uint8
        assert samples["test_images"].shape[1:] == (8, 8, 3)
        assert len(samples["test_images"]) == len(samples["test_labels"]) == 359
    assert not (out / "backup").exists()  # removed once the run is finished


@pytest.mark.slow
def test_saved_model_loads_in_a_fresh_process_and_has_no_augmentation(finished_run):
    out, stdout = finished_run
    code = ("import sys, numpy as np, keras, keras_vit; "
            "m = keras.saving.load_model(sys.argv[1] + '/model.keras'); "
            "s = np.load(sys.argv[1] + '/samples.npz'); "
            "x = keras_vit.preprocess(s['test_images']); "
            "acc = float(np.mean(np.argmax(m.predict(x, verbose=0), -1) == s['test_labels'])); "
            "print(acc, sorted({type(l).__name__ for l in m.layers}))")
    result = processes.run([sys.executable, "-c", code, str(out)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy, layer_types = result.stdout.strip().split(" ", 1)
    config = json.loads((out / "config.json").read_text())
    assert abs(float(accuracy) - config["result"]["test_accuracy"]) < 1e-6
    assert "Random" not in layer_types and "MixUp" not in layer_types


@pytest.mark.slow
def test_same_command_after_a_finished_run_starts_a_new_folder(finished_run, caplog):
    out, _ = finished_run
    from keras_vit.training.config import TrainConfig
    from keras_vit.training.trainer import choose_run_dir

    caplog.set_level("INFO", logger="keras_vit")
    run_dir, resuming, _ = choose_run_dir(TrainConfig(out=str(out)).resolved())
    assert run_dir == out.with_name("digits-2") and not resuming
    assert f"{out} holds a finished run (kept as it is): this run goes to {run_dir}." \
        in caplog.text


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_was_and_the_same_command_trains_the_same_weights(
        tmp_path):
    out = tmp_path / "killed"
    # --validation-split 0 (train on every labelled image): fit without validation data.
    # Two blocks: the second has stochastic depth (the first block's rate is 0). Every
    # augmentation, in two micro-batches: all of their random draws come from --seed.
    args = ["--epochs", "3", "--checkpoint-every", "7", "--batch-size", "64",
            "--validation-split", "0", "--depth", "2", "--crop-area", "0.5", "--flip",
            "--rotate", "0.05", "--zoom", "0.1", "--randaugment", "0.5", "--mixup", "0.2",
            "--cutmix", "1.0", "--micro-batches", "2"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    kill_at_a_mid_epoch_backup(train_command(out, *args), out, env, timeout=240)
    config = json.loads((out / "config.json").read_text())
    assert not config["finished"]
    result = run_train(out, *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Restored the backup at step" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["finished"]
    assert config["result"]["steps"] == 3 * config["steps_per_epoch"]  # no step lost or repeated
    epochs = history_epochs(out)
    assert epochs[-1] == 2 and sorted(set(epochs)) == [0, 1, 2]
    assert config["result"]["steps"] == 3 * (1438 // 64)  # 1,797 - 359 test images
    assert (out / "curves.png").exists()
    # The same command, never killed, ends with the same weights, bit for bit: the same split,
    # batch order, crops, augmentations, stochastic-depth masks and initial weights in another
    # process (the augmentations once drew from their layers' seed state, in whatever order
    # tf.data's parallel calls took it, and runs differed), and a resume that takes them up
    # where the killed process left them. In a fresh interpreter, with a hash seed of its own
    # (see tests/processes.py).
    whole = run_train(tmp_path / "whole", *args, fresh=True)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-4000:]
    assert printed_fingerprint(result.stdout) == printed_fingerprint(whole.stdout)


def test_resuming_with_other_flags_is_refused(tmp_path):
    from keras_vit.errors import ResumeError
    from keras_vit.training.config import TrainConfig
    from keras_vit.training.trainer import choose_run_dir

    out = tmp_path / "run"
    (out / "backup").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"finished": False, "variant": "S/16"}))
    with pytest.raises(ResumeError, match=r"other settings \(--variant: S/16 then, Ti/16 now\)"):
        choose_run_dir(TrainConfig(out=str(out), variant="Ti/16").resolved())


def test_resuming_with_other_training_settings_warns_and_records_them(tmp_path, caplog):
    from keras_vit.training.config import TrainConfig
    from keras_vit.training.trainer import choose_run_dir

    caplog.set_level("INFO", logger="keras_vit")
    out = tmp_path / "run"
    (out / "backup").mkdir(parents=True)
    started = {"finished": False, "variant": "Ti/16", "learning_rate": 0.001, "mixup": 0.2}
    (out / "config.json").write_text(json.dumps(started))
    same = TrainConfig(out=str(out), variant="Ti/16", learning_rate=0.001, mixup=0.2)
    assert choose_run_dir(same.resolved()) == (out, True, [])
    assert "other settings" not in caplog.text
    lower = TrainConfig(out=str(out), variant="Ti/16", learning_rate=0.0003, mixup=0.2,
                        verbose=0)  # e.g. after a NaN stop; verbose is free to change
    assert choose_run_dir(lower.resolved()) == (out, True, [{"learning_rate": [0.001, 0.0003]}])
    assert ("resuming " + str(out) + " with other settings than it was started with "
            "(--learning-rate: 0.001 then, 0.0003 now)") in caplog.text.lower()
    (out / "config.json").write_text(json.dumps(
        dict(started, learning_rate=0.0003, changed_on_resume=[{"learning_rate": [0.001,
                                                                                  0.0003]}])))
    again = TrainConfig(out=str(out), variant="Ti/16", learning_rate=0.0003, mixup=0.0)
    # A second resume keeps the first one's record.
    assert choose_run_dir(again.resolved())[2] == [{"learning_rate": [0.001, 0.0003]},
                                                   {"mixup": [0.2, 0.0]}]


def test_every_setting_says_how_a_resume_treats_it():
    import dataclasses

    from keras_vit.training.config import FREE, MAY_CHANGE, MUST_MATCH, TrainConfig

    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("resume") in (MUST_MATCH, MAY_CHANGE, FREE), field.name
        assert field.metadata.get("help"), field.name
    by_policy = {f.name: f.metadata["resume"] for f in dataclasses.fields(TrainConfig)}
    # What shapes the weights or the batch stream must match; the recipe may change; the way
    # the run is carried out is free.
    for name in ("data", "variant", "image_size", "patch_size", "depth", "batch_size",
                 "epochs", "seed", "weights", "validation_split", "test_split", "optimizer"):
        assert by_policy[name] == MUST_MATCH, name
    for name in ("learning_rate", "weight_decay", "mixup", "dropout", "label_smoothing"):
        assert by_policy[name] == MAY_CHANGE, name
    for name in ("out", "strategy", "precision", "verbose", "micro_batches", "export"):
        assert by_policy[name] == FREE, name


def test_an_unfinished_run_without_a_backup_is_started_afresh(tmp_path):
    from keras_vit.training.config import TrainConfig
    from keras_vit.training.trainer import choose_run_dir

    out = tmp_path / "run"
    out.mkdir()  # stopped before its first backup: nothing trained, nothing to keep
    (out / "config.json").write_text(json.dumps({"finished": False, "variant": "S/16"}))
    (out / "history.csv").write_text("epoch,loss\n0,nan\n")  # e.g. a NaN in the first steps
    (out / "logs").mkdir()
    assert choose_run_dir(TrainConfig(out=str(out), variant="Ti/16").resolved()) == (
        out, False, [])
    assert not (out / "history.csv").exists() and not (out / "logs").exists()


@pytest.mark.parametrize("flags, message", [
    (["--variant", "Ti16"], "Unknown ViT variant 'Ti16'"),
    (["--image-size", "224x"], "--image-size '224x' is not a size.*HEIGHTxWIDTH"),
    (["--image-size", "9"], r"not divisible by the patch size 2.* Here: --image-size "
                            r"HEIGHTxWIDTH \(now 9x9\), or another --patch-size or --variant\."),
    (["--data", "folder:/no/such/folder"], "does not exist"),
    (["--test-split", "0"], r"--test-split must be > 0, got 0.0 \(held-out test fraction"),
    (["--validation-split", "0.5", "--test-split", "0.5"], "leave no training images"),
    (["--crop-area", "0"], r"--crop-area must be > 0, got 0.0 \(random resized .*1: off"),
    (["--cpu-devices", "2"], "--cpu-devices 2 applies to the 'mirrored' strategy only"),
    (["--weights", "/no/such/checkpoint.npz"], "No checkpoint file '/no/such/checkpoint.npz'"),
    (["--weights", "augreg_in21k"], "No published 'augreg_in21k' checkpoint for variant 'Ti/2'"),
])
def test_bad_flags_stop_before_anything_is_written_and_say_what_to_do(tmp_path, flags, message,
                                                                      capsys):
    from keras_vit import cli

    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-vit train: error: ") and re.search(message, err), err
    assert "Traceback" not in err
    assert not out.exists()  # nothing left behind: the corrected command starts afresh


@pytest.mark.slow
def test_a_model_of_one_token_is_warned_about(tmp_path, capsys):
    from keras_vit import cli

    assert cli.main(["train", "--out", str(tmp_path / "run"), *TINY, "--image-size", "2",
                     "--epochs", "1"]) == 0
    assert ("Warning: 2x2 images in 2x2 px patches make 1 token(s): attention has next to "
            "nothing to relate. Use a smaller --patch-size") in capsys.readouterr().err


def test_weights_that_cannot_be_downloaded_stop_with_what_to_do(tmp_path, monkeypatch,
                                                                 capsys):
    from keras_vit import cli

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # nothing cached
    monkeypatch.setenv("KERAS_VIT_CHECKPOINT_MIRROR", "http://127.0.0.1:9/")  # nothing listens
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), "--variant", "Ti/16", "--image-size", "32",
                     "--depth", "1", "--weights", "augreg_in21k", "--no-export",
                     "--verbose", "0"]) == 2
    assert re.search(r"keras-vit train: error: Download of http://127\.0\.0\.1:9/.* failed: "
                     r".*Offline\? .*--weights PATH", capsys.readouterr().err)
    assert not out.exists()


def test_a_checkpoint_that_does_not_fit_stops_naming_the_depth(tmp_path, capsys):
    import keras_vit
    from keras_vit import cli
    from keras_vit.checkpoints import save_npz

    deeper = keras_vit.build("Ti/16", image_size=8, patch_size=2, depth=2, num_classes=10)
    save_npz(deeper, tmp_path / "deeper.npz")
    assert cli.main(["train", "--out", str(tmp_path / "run"), *TINY, "--epochs", "1",
                     "--weights", str(tmp_path / "deeper.npz")]) == 2
    assert re.search(r"(?s)keras-vit train: error: Checkpoint .*deeper\.npz.* does not fit.*The "
                     r"checkpoint has 2 encoder blocks and the model 1: build it with depth=2 "
                     r"\(keras-vit train: --depth 2\)", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_digits_defaults_shape_only_the_default_variant():
    from keras_vit.training.config import TrainConfig

    default = TrainConfig().resolved()
    assert (default.variant, default.patch_size, default.depth) == ("R+Ti/16", 1, 6)
    chosen = TrainConfig(variant="S/16", image_size="32").resolved()
    assert (chosen.variant, chosen.patch_size, chosen.depth) == ("S/16", None, None)
    same = TrainConfig(variant="R+Ti/16").resolved()
    assert (same.patch_size, same.depth) == (1, 6)


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_backup(tmp_path):
    out = tmp_path / "nan"
    result = run_train(out, "--epochs", "3", "--learning-rate", "1e12", "--clip-norm", "0",
                       "--warmup-epochs", "0", "--checkpoint-every", "1", "--label-smoothing", "0")
    assert result.returncode == 3
    assert "loss became NaN" in result.stderr and "lower --learning-rate" in result.stderr
    weights = out / "backup" / "latest.weights.h5"
    assert weights.exists()
    import h5py

    with h5py.File(weights) as f:
        arrays = []
        f.visititems(lambda name, obj: arrays.append(obj[()]) if hasattr(obj, "dtype") else None)
    assert arrays and all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f")


def test_missing_tfds_dataset_fails_fast_with_how_to_prepare_it(tmp_path):
    from keras_vit.training.data import DataError, load_data

    start = time.time()
    with pytest.raises(DataError, match=r"not prepared.*tfds build cifar10"):
        load_data("tfds:cifar10", (32, 32), data_dir=str(tmp_path))
    assert time.time() - start < 1.0


def _prepare_tfds_dataset(data_dir, name, with_test=True):
    """A real prepared TFDS dataset on disk (the files `tfds build` writes): grayscale digit
    images of two sizes under train and (if `with_test`) test splits, with named classes."""
    import tensorflow_datasets as tfds
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)

    def examples(indices):  # odd ones upscaled 2x: the loader resizes every image
        for i in indices:
            image = np.kron(gray[i], np.ones((2, 2), np.uint8)) if i % 2 else gray[i]
            yield i, {"image": image[..., None], "label": int(digits.target[i])}

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=[f"digit_{d}" for d in range(10)]),
    })
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0", features=features, data_dir=str(data_dir),
        disable_shuffling=True,  # examples stay in order: the test compares them
        split_datasets={"train": list(examples(range(0, 300))),
                        **({"test": list(examples(range(300, 400)))} if with_test else {})})
    return gray, digits.target


def test_a_prepared_tfds_dataset_loads_by_name_with_its_splits_and_classes(tmp_path):
    from keras_vit.images import resize_image
    from keras_vit.training.data import load_data

    gray, labels = _prepare_tfds_dataset(tmp_path, "tiny_digits")
    data = load_data("tfds:tiny_digits", (16, 16), data_dir=str(tmp_path),
                     validation_split=0.1)
    assert data.class_names == [f"digit_{d}" for d in range(10)]
    assert data.sizes == {"train": 270, "validation": 30, "test": 100}
    test_images, test_labels = zip(*data.test.as_numpy_iterator())
    assert np.array_equal(test_labels, labels[300:400])
    assert all(image.shape == (16, 16, 3) and image.dtype == np.uint8 for image in test_images)
    # Grayscale arrives as RGB at the model's size.
    expected = resize_image(np.repeat(gray[300][..., None], 3, -1), (16, 16)).numpy()
    assert np.abs(test_images[0].astype(int) - expected).max() <= 1


def test_a_tfds_dataset_without_a_test_split_holds_one_out_of_train(tmp_path):
    from keras_vit.training.data import load_data

    _, labels = _prepare_tfds_dataset(tmp_path, "train_only_digits", with_test=False)
    data = load_data("tfds:train_only_digits", (8, 8), data_dir=str(tmp_path),
                     validation_split=0.1, test_split=0.2)
    assert data.sizes == {"train": 210, "validation": 30, "test": 60}
    split_labels = {split: [y for _, y in getattr(data, split).as_numpy_iterator()]
                    for split in ("train", "validation", "test")}
    # The three are disjoint slices of train, in order (the test never seen in training).
    assert split_labels["train"] + split_labels["validation"] + split_labels["test"] \
        == list(labels[:300])
    no_validation = load_data("tfds:train_only_digits", (8, 8), data_dir=str(tmp_path),
                              validation_split=0, test_split=0.2)
    assert no_validation.sizes == {"train": 240, "validation": 0, "test": 60}
    assert len(list(no_validation.validation)) == 0


@pytest.mark.slow
def test_train_runs_on_a_prepared_tfds_dataset_in_a_fresh_process(tmp_path):
    # A fresh process has no builder class for the name: TFDS reads the prepared files.
    _prepare_tfds_dataset(tmp_path / "tfds", "tiny_digits")
    out = tmp_path / "run"
    result = run_train(out, "--data", "tfds:tiny_digits", "--data-dir", str(tmp_path / "tfds"),
                       "--epochs", "1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1].startswith("test accuracy: ")
    config = json.loads((out / "config.json").read_text())
    assert config["finished"] and config["class_names"][0] == "digit_0"
    assert config["result"]["steps"] == 270 // 32  # full batches only


def test_unknown_data_spec_says_what_is_accepted():
    from keras_vit.training.data import DataError, load_data

    with pytest.raises(DataError, match="digits.*folder:PATH.*tfds:NAME"):
        load_data("mnist", (32, 32))


def test_adamw_skips_decay_on_biases_norms_class_token_and_positions():
    import keras_vit
    from keras_vit.training.trainer import build_optimizer

    model = keras_vit.build("Ti/16", image_size=8, patch_size=4, depth=1, num_classes=3)
    from keras_vit.training.config import TrainConfig

    optimizer = build_optimizer(TrainConfig(epochs=2, learning_rate=1e-3, warmup_epochs=1,
                                            weight_decay=0.1).resolved(), steps_per_epoch=10)
    optimizer.build(model.trainable_variables)
    decayed = {v.path for v in model.trainable_variables if optimizer._use_weight_decay(v)}
    assert decayed == {v.path for v in model.trainable_variables
                       if v.name in ("kernel", "query_kernel", "key_kernel", "value_kernel",
                                     "out_kernel")}
    assert optimizer.weight_decay == 0.1 and optimizer.global_clipnorm == 1.0
    assert (optimizer.beta_1, optimizer.beta_2) == (0.9, 0.999)


def test_xla_is_off_by_default_for_bfloat16_on_cpus_alone():
    import tensorflow as tf

    from keras_vit.training.trainer import pick_jit_compile

    from keras_vit.errors import ConfigError
    from keras_vit.training.config import TrainConfig

    strategy = tf.distribute.get_strategy()  # this machine: CPUs only
    assert not tf.config.list_physical_devices("GPU")
    auto, on, off = (TrainConfig(jit_compile=value) for value in ("auto", "on", "off"))
    assert pick_jit_compile(auto, "float32", strategy)
    # XLA's CPU backend computes bfloat16 matmuls slowly; the TF graph runs oneDNN's kernels.
    assert not pick_jit_compile(auto, "mixed_bfloat16", strategy)
    assert pick_jit_compile(on, "mixed_bfloat16", strategy)
    assert not pick_jit_compile(off, "float32", strategy)
    # Several replicas: Keras compiles each replica's step for one device (XLA fails there).
    two_replicas = type("Strategy", (), {"num_replicas_in_sync": 2})()
    assert not pick_jit_compile(auto, "float32", two_replicas)
    with pytest.raises(ConfigError, match="--jit-compile on does not run with 2 replicas on CPUs"):
        pick_jit_compile(on, "float32", two_replicas)


def test_micro_batches_flag():
    import argparse

    import tensorflow as tf

    from keras_vit.cli.train import add_arguments
    from keras_vit.training.config import TrainConfig
    from keras_vit.training.trainer import pick_micro_batches

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).micro_batches == "auto"
    assert parser.parse_args(["--micro-batches", "4"]).micro_batches == 4
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--micro-batches", bad])
    strategy = tf.distribute.get_strategy()  # CPUs only
    auto = TrainConfig(micro_batches="auto")
    assert pick_micro_batches(auto, 128, 65, strategy) == 4  # the benchmark's training config
    assert pick_micro_batches(auto, 64, 17, strategy) == 1   # the digits default
    assert pick_micro_batches(TrainConfig(micro_batches=3), 64, 17, strategy) == 3


def test_warmup_then_cosine_schedule():
    from keras_vit.schedules import WarmupDecay

    schedule = WarmupDecay(1.0, total_steps=110, warmup_steps=10)
    values = [float(schedule(step)) for step in (0, 4, 9, 10, 60, 110, 200)]
    np.testing.assert_allclose(values, [0.1, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
    linear = WarmupDecay(1.0, total_steps=110, warmup_steps=10, decay="linear")
    np.testing.assert_allclose(float(linear(35)), 0.75, atol=1e-6)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert clone.get_config() == schedule.get_config()


def test_augmentation_keeps_range_and_mixes_labels():
    import tensorflow as tf

    from keras_vit.training.augment import AugmentConfig, make_augmenter

    images = tf.cast(tf.random.uniform((16, 16, 16, 3), 0, 256, dtype=tf.int32), tf.uint8)
    labels = tf.range(16) % 4
    augment = make_augmenter(AugmentConfig(flip=True, translate=0.1, rotate=0.05, zoom=0.2,
                                           randaugment=0.5, mixup=0.2, cutmix=1.0),
                             num_classes=4)
    x, y = augment(images, labels, tf.constant([0, 0]))
    assert x.dtype == tf.float32 and float(tf.reduce_min(x)) >= -1 and float(tf.reduce_max(x)) <= 1
    np.testing.assert_allclose(tf.reduce_sum(y, -1), 1.0, atol=1e-5)
    assert float(tf.reduce_max(y)) < 1.0 or float(tf.reduce_min(tf.reduce_max(y, -1))) < 1.0
    plain, plain_labels = make_augmenter(AugmentConfig(flip=False), 4)(images, labels,
                                                                      tf.constant([0, 0]))
    np.testing.assert_allclose(plain, tf.cast(images, tf.float32) / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(plain_labels, tf.one_hot(labels, 4))


@pytest.mark.slow
def test_fine_tunes_a_checkpoint_at_a_new_resolution_with_the_sgd_preset(tmp_path):
    import keras_vit

    # A checkpoint in the original .npz layout at 8x8 (a 2x2 grid), 1000 classes.
    source = keras_vit.build("Ti/16", image_size=8, patch_size=4, depth=1)
    keras_vit.checkpoints.save_npz(source, tmp_path / "ckpt.npz")
    out = tmp_path / "finetuned"
    result = processes.run(
        [sys.executable, "-m", "keras_vit.cli", "train", "--out", str(out), "--variant", "Ti/16",
         "--image-size", "16", "--patch-size", "4", "--depth", "1", "--epochs", "1",
         "--batch-size", "64", "--weights", str(tmp_path / "ckpt.npz"), "--preset", "finetune",
         "--jit-compile", "off", "--no-export", "--verbose", "0"],
        timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == "sgd" and config["weight_decay"] == 0.0
    model = keras.saving.load_model(out / "model.keras")
    # The 2x2 grid was resampled to 4x4; the 1000-class head was replaced by a 10-class one.
    assert model.patch_encoder.pos_embedding.shape == (1, 17, 192)
    assert model.output_shape == (None, 10)


@pytest.mark.parametrize("cache, crop_area", [(False, 1.0), (True, 1.0), (False, 0.3),
                                              (True, 0.3)])
def test_a_resumed_run_trains_on_the_batches_it_would_have_seen(cache, crop_area):
    # Killed at step 12 of 4 epochs of 5 steps: the resumed fit calls must see exactly the
    # uninterrupted run's batches 12, 13, ..., random crops included, without decoding the
    # examples they skip (before, that was the whole run's decoding again).
    import tensorflow as tf

    from keras_vit.training.data import Data, training_batches
    from keras_vit.training.trainer import fit_segments

    # Example n: a 6x6 image of value n with a brighter top-left quarter (crops differ).
    images = np.repeat(np.arange(40, dtype=np.uint8)[:, None, None, None], 6, axis=1)
    images = np.repeat(np.repeat(images, 6, axis=2), 3, axis=3)
    images[:, :3, :3] += 100
    decoded = []

    def decode(image, label):
        def record(value):
            decoded.append(int(value))
            return value
        return image, tf.py_function(record, [label], tf.int32)

    undecoded = tf.data.Dataset.from_tensor_slices((images, np.arange(40, dtype=np.int32)))
    data = Data({"train": undecoded}, decode=decode, image_size=(4, 4), class_names=[],
                sizes={"train": 40})

    def batches(skip, count):
        decoded.clear()
        stream = training_batches(data, 8, seed=3, cache=cache, crop_area=crop_area,
                                  skip_batches=skip)
        return list(stream.take(count).as_numpy_iterator()), list(decoded)

    uninterrupted, _ = batches(0, 20)
    labels = [batch_labels.tolist() for _, batch_labels in uninterrupted]
    for epoch in range(4):  # each epoch shows every example once
        assert sorted(sum(labels[5 * epoch:5 * epoch + 5], [])) == list(range(40))
    assert labels[:5] != labels[5:10]
    segments = fit_segments(12, 5, 4)
    assert [s[:3] for s in segments] == [(2, 3, 3), (3, 4, 5)]
    resumed, decodes = [], []
    for first_epoch, end_epoch, steps, skip in segments:
        stream, decoded_here = batches(skip, steps + (end_epoch - first_epoch - 1) * 5)
        resumed, decodes = resumed + stream, decodes + [decoded_here]
    assert len(resumed) == 8
    for (images_a, labels_a), (images_b, labels_b) in zip(resumed, uninterrupted[12:]):
        np.testing.assert_array_equal(labels_a, labels_b)
        np.testing.assert_array_equal(images_a, images_b)
    if cache:  # it fills the cache once per pipeline (each decoded image is needed for it)
        assert sum(map(len, decodes)) <= 2 * 40
    else:
        # The resumed run decodes what it trains on (8 batches) and what tf.data's parallel
        # map reads ahead (2 to 18 images measured, more on a busy machine); the whole run's
        # decoding again would be 160. Decoding the skipped batches 10 and 11 (epoch 2's
        # first) would put them first: the map starts its calls in the stream's order.
        assert sum(map(len, decodes)) <= 8 * 8 + 32
        skipped = set(np.concatenate([labels for _, labels in uninterrupted[10:12]]).tolist())
        assert not skipped & set(decodes[0][:8]), decodes[0]
    from keras_vit.images import resize_image

    def by_label(epoch):
        return {int(label): image for images_, labels_ in uninterrupted[5 * epoch:5 * epoch + 5]
                for image, label in zip(images_, labels_)}
    first, second = by_label(0), by_label(1)
    plain = resize_image(images, (4, 4)).numpy()
    if crop_area < 1:  # random crops: images differ from the plain resize and across epochs
        assert sum(not np.array_equal(first[n], plain[n]) for n in range(40)) > 20
        assert sum(not np.array_equal(first[n], second[n]) for n in range(40)) > 20
    else:
        for n in range(40):
            np.testing.assert_array_equal(first[n], plain[n])
            np.testing.assert_array_equal(second[n], plain[n])
    assert fit_segments(10, 5, 4) == [(2, 4, 5, 10)] and fit_segments(20, 5, 4) == []


def _tiny_compiled(policy):
    from keras_vit.training.config import TrainConfig
    from keras_vit.training.trainer import build_optimizer

    inputs = keras.Input((8,))
    outputs = keras.layers.Activation("linear", dtype="float32")(
        keras.layers.Dense(4, dtype=policy)(inputs))
    model = keras.Model(inputs, outputs)
    model.dtype_policy = keras.dtype_policies.get(policy)  # compile wraps a loss-scale optimizer
    config = TrainConfig(epochs=2, warmup_epochs=0, learning_rate=1e-3,
                         weight_decay=0.1).resolved()
    model.compile(optimizer=build_optimizer(config, 8), loss="mse", jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    return model


def test_a_backup_whose_optimizer_state_does_not_fit_is_refused(tmp_path):
    from keras_vit.training.callbacks import RunBackup

    x, y = np.random.default_rng(0).random((64, 8), "float32"), np.zeros((64, 4), "float32")
    model = _tiny_compiled("mixed_float16")  # a loss-scale optimizer: more variables
    backup = RunBackup(tmp_path / "backup", save_freq=3)
    backup.restore(model)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[backup])
    with pytest.raises(ValueError, match="does not fit this run's optimizer.*--precision"):
        RunBackup(tmp_path / "backup", save_freq=3).restore(_tiny_compiled("float32"))
    float32_run = _tiny_compiled("float32")
    backup32 = RunBackup(tmp_path / "backup32", save_freq=3)
    backup32.restore(float32_run)
    float32_run.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[backup32])
    with pytest.raises(ValueError, match="does not fit this run's optimizer"):
        RunBackup(tmp_path / "backup32", save_freq=3).restore(_tiny_compiled("mixed_float16"))
    # The same precision resumes at the step it reached.
    assert RunBackup(tmp_path / "backup", save_freq=3).restore(
        _tiny_compiled("mixed_float16")) == 8


def test_step_backups_are_counted_from_the_last_backup_epoch_ends_included(tmp_path):
    # Epochs shorter than --checkpoint-every: a step backup a few steps after each epoch-end
    # backup would write the whole state again for almost nothing.
    import h5py

    from keras_vit.training.callbacks import RunBackup

    latest = tmp_path / "backup" / "latest.weights.h5"

    def backed_up():
        if not latest.exists():
            return None
        with h5py.File(latest, "r") as f:
            return int(f.attrs["keras_vit_batches_trained"])

    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(backed_up()),
        on_epoch_end=lambda epoch, logs: seen.append(f"end {backed_up()}"))
    x, y = np.random.default_rng(0).random((32, 8), "float32"), np.zeros((32, 4), "float32")
    model = _tiny_compiled("float32")
    backup = RunBackup(tmp_path / "backup", save_freq=3)
    backup.restore(model)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
              callbacks=[backup, record])  # 4 steps per epoch
    assert seen == [None, None, 3, 3, "end 4", 4, 4, 7, 7, "end 8"]
    # An epoch whose last step was just backed up is not written again at its end.
    writes = []
    model = _tiny_compiled("float32")
    save_weights = model.save_weights
    model.save_weights = lambda *a, **k: (writes.append(1), save_weights(*a, **k))
    backup = RunBackup(tmp_path / "every2", save_freq=2)
    backup.restore(model)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[backup])
    assert len(writes) == 4  # steps 2, 4, 6 and 8


def test_resume_counts_batches_not_updates_under_mixed_float16(tmp_path):
    # The loss-scale optimizer skips updates whose float16 gradients overflow (the first two
    # batches here), so its step count lags the batches trained: resuming by it would train
    # on two batches again.
    from keras_vit.training.callbacks import RunBackup

    rng = np.random.default_rng(0)
    x, y = rng.random((64, 8), "float32"), np.zeros((64, 4), "float32")
    x[:16] *= 1e4
    model = _tiny_compiled("mixed_float16")
    backup = RunBackup(tmp_path / "backup", save_freq=1)
    assert backup.restore(model) == 0
    model.fit(x[:16], y[:16], batch_size=8, epochs=1, verbose=0, shuffle=False,
              callbacks=[backup])
    # Two batches, no update yet: a real backup, not one whose optimizer state did not load.
    assert int(model.optimizer.iterations.numpy()) == 0
    assert RunBackup(tmp_path / "backup", save_freq=1).restore(
        _tiny_compiled("mixed_float16")) == 2
    model.fit(x[16:], y[16:], batch_size=8, epochs=1, verbose=0, shuffle=False,
              callbacks=[backup])
    assert int(model.optimizer.iterations.numpy()) == 6
    resumed = _tiny_compiled("mixed_float16")
    assert RunBackup(tmp_path / "backup", save_freq=1).restore(resumed) == 8
    assert int(resumed.optimizer.iterations.numpy()) == 6
    # A corrupt latest file (a disk error; a kill cannot leave one, the new file replaces
    # the old at once): Keras falls back to the previous backup, with its own count.
    backup.batches_trained = 9
    backup.save()  # latest: 9 batches, the previous (.bkp): 8
    assert RunBackup(tmp_path / "backup", save_freq=1).restore(
        _tiny_compiled("mixed_float16")) == 9
    weights = tmp_path / "backup" / "latest.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert RunBackup(tmp_path / "backup", save_freq=1).restore(
        _tiny_compiled("mixed_float16")) == 8


def test_weights_made_non_finite_by_an_update_are_not_backed_up(tmp_path):
    from keras_vit.training.callbacks import RunBackup

    model = _tiny_compiled("float32")
    backup = RunBackup(tmp_path / "backup", save_freq=1)
    backup.restore(model)
    backup.save()
    saved = (tmp_path / "backup" / "latest.weights.h5").read_bytes()
    kernel = model.layers[1].kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))  # finite loss logged, NaN update
    backup.save()
    assert (tmp_path / "backup" / "latest.weights.h5").read_bytes() == saved


def test_workers_that_restored_different_backups_stop_with_the_fix(tmp_path, monkeypatch):
    # A multi-worker job killed while its workers wrote a backup: one resumes ahead of the
    # other, which would hang in the collectives; stop before training, saying what to do.
    from keras_vit.errors import ResumeError
    from keras_vit.training import distribute
    from keras_vit.training.config import TrainConfig
    from keras_vit.training.trainer import train

    config = TrainConfig(out=str(tmp_path / "run"), variant="Ti/16", image_size=8, patch_size=2,
                         depth=1, batch_size=32, jit_compile="off", export=False, verbose=0)
    monkeypatch.setattr(distribute, "values_across_workers", lambda value, strategy: [50, 100])
    with pytest.raises(ResumeError, match=r"restored different backups \(batches trained, one "
                                          r"per replica: \[50, 100\];.*latest\.weights\.h5\.bkp"):
        train(config)


@pytest.mark.parametrize("sizes, train, given, expected, said", [
    # 24x24 photos, 15 of them: kept at 24x24 in 3 px patches (8x8 tokens), Ti with 6 blocks,
    # a batch of 8 (not 128 of 15).
    ([(24, 24)], 15, {}, dict(variant="Ti/3", image_size=(24, 24), depth=6, batch_size=8),
     "24x24 images (median 24x24: not upscaled) in 3x3 px patches (8x8 tokens)"),
    # CIFAR-size, 45,000 to train on: 32x32 in 4 px patches, Ti, the default batch.
    ([(32, 32)], 45_000, {}, dict(variant="Ti/4", image_size=(32, 32), depth=None,
                                   batch_size=128), "Ti/4 for 45,000 training images"),
    # Photos larger than 224: the paper's 224 with 16 px patches; S for a large set.
    ([(375, 500)], 100_000, {}, dict(variant="S/16", image_size=(224, 224), depth=None,
                                      batch_size=128), "S/16 for 100,000"),
    # Non-square small images keep their shape, rounded to the patch.
    ([(40, 60), (44, 62), (36, 58)], 2_000, {},
     dict(variant="Ti/5", image_size=(40, 60), depth=6), "40x60 images"),
    # What the user set stays; only the unset batch follows the data.
    ([(24, 24)], 15, dict(variant="S/16", image_size="32"),
     dict(variant="S/16", image_size=(32, 32), batch_size=8), "batch 8 (the training set has 15)"),
])
def test_defaults_fit_the_data(sizes, train, given, expected, said):
    from keras_vit.training.config import TrainConfig
    from keras_vit.training.data import Data
    from keras_vit.training.defaults import fit_to_data

    user = TrainConfig(data="folder:photos", **given)
    data = Data({}, decode=None, image_size=(224, 224), class_names=["a", "b"],
                sizes={"train": train, "validation": 0, "test": 1}, source_sizes=sizes)
    config, why = fit_to_data(user, user.resolved(), data)
    for key, value in expected.items():
        assert getattr(config, key) == value, (key, getattr(config, key))
    assert said in why and "to choose yourself" in why
    # The digits keep their measured defaults; a checkpoint keeps its model.
    digits = TrainConfig()
    assert fit_to_data(digits, digits.resolved(), data) == (digits.resolved(), None)
    with_weights = TrainConfig(data="folder:photos", weights="augreg_in21k", batch_size=8)
    assert fit_to_data(with_weights, with_weights.resolved(), data)[0].variant == "S/16"
