"""Training callbacks that keep work safe: exact mid-epoch resume, NaN stop (public Keras API)."""

import json
import math
import os
import shutil

import h5py
import keras
import numpy as np

from keras_vit.errors import ResumeError

# Attribute of a backup's weights file: batches trained when it was written.
_BATCHES_TRAINED = "keras_vit_batches_trained"
# Dataset of a backup's weights file: the model's seed generator states, in model.variables
# order (Keras' weights files leave them out, so a resumed run would draw its dropout and
# stochastic-depth masks from the start of the sequence again).
_SEED_STATES = "keras_vit_seed_states"
WEIGHTS_FILE = "latest.weights.h5"
METADATA_FILE = "training_metadata.json"
PREVIOUS = ".bkp"  # the backup before the latest one


def _seed_states(model):
    return [v for v in model.variables if v.name == "seed_generator_state"]


def _finite(logs):
    loss = (logs or {}).get("loss")
    return loss is None or math.isfinite(float(loss))


def _optimizer_signature(optimizer):
    """What a backup's optimizer state must match: the class and its variables' shapes (a
    mixed_float16 run's loss-scale optimizer has more variables, SGD fewer than AdamW)."""
    return {"class": type(optimizer).__name__,
            "variables": [list(v.shape) for v in optimizer.variables]}


class RunBackup(keras.callbacks.Callback):
    """Backs a run up so that a killed run resumes exactly where it was, and never backs up NaNs.

    The run restores before its input pipeline is built (`restore`): the count of batches
    trained, kept in each backup's weights file, tells the pipeline how many to skip, so
    training continues with the batch after the last backup. The file also keeps the dropout
    and stochastic-depth seed states, so the resumed run draws the masks the uninterrupted
    one would have. (The optimizer's step count is not that count under mixed_float16: the
    loss-scale optimizer skips updates whose gradients overflow.)

    A backup (model weights with the optimizer state) is written at each epoch end and
    `save_freq` steps after the last backup; none when the loss or the weights are not
    finite, so the last good state survives a divergence. The previous backup is kept
    (`latest.weights.h5.bkp`) and each new one replaces the last at once (os.replace): a kill
    at any moment leaves a whole backup whose weights and count agree.
    """

    def __init__(self, backup_dir, save_freq):
        super().__init__()
        self.backup_dir = str(backup_dir)
        self.save_freq = int(save_freq)
        self.batches_trained = 0
        self.epoch = 0
        self.batch = 0  # batches of this epoch trained
        self._since_backup = 0
        self.weights_path = os.path.join(self.backup_dir, WEIGHTS_FILE)
        self.metadata_path = os.path.join(self.backup_dir, METADATA_FILE)

    def restore(self, model):
        """Loads the last backup into `model` (compiled, its optimizer built), if there is
        one; returns the number of batches it had trained on (0 without a backup). A latest
        backup that cannot be read falls back to the one before it.

        Raises:
            ResumeError: the backup's optimizer state does not fit this run's optimizer.
        """
        self.set_model(model)
        weights, previous = self.weights_path, self.weights_path + PREVIOUS
        if not os.path.exists(weights) and not os.path.exists(previous):
            return 0
        try:
            if not os.path.exists(weights):
                raise OSError(f"{weights} is missing")
            self._load(model)
        except ResumeError:
            raise
        except (OSError, ValueError, KeyError):
            if not os.path.exists(previous):
                raise
            # A damaged latest backup (a disk error: a kill cannot leave one): the one before
            # it takes its place, with its own count.
            shutil.copyfile(previous, weights)
            if os.path.exists(self.metadata_path + PREVIOUS):
                shutil.copyfile(self.metadata_path + PREVIOUS, self.metadata_path)
            self._load(model)
        trained = int(model.optimizer.iterations.numpy())
        with h5py.File(weights, "r") as f:
            trained = int(f.attrs.get(_BATCHES_TRAINED, trained))
            states = _seed_states(model)
            if _SEED_STATES in f and f[_SEED_STATES].shape[0] == len(states):
                for variable, value in zip(states, f[_SEED_STATES][...]):
                    variable.assign(value)
        self.batches_trained = trained
        return trained

    def _load(self, model):
        self._check_optimizer(self.metadata_path)
        model.load_weights(self.weights_path)

    def _check_optimizer(self, metadata_path):
        try:
            with open(metadata_path) as f:
                saved = json.load(f).get("optimizer")
        except (OSError, ValueError):
            return  # a backup from before the signature was kept: Keras checks the shapes
        if saved is not None and saved != _optimizer_signature(self.model.optimizer):
            raise ResumeError(
                f"The backup in {self.backup_dir} does not fit this run's optimizer (it has "
                f"{saved['class']} with {len(saved['variables'])} variables; this run "
                f"{type(self.model.optimizer).__name__} with "
                f"{len(self.model.optimizer.variables)}: another --precision or --optimizer?). "
                "Resume with the settings the run was started with (its config.json), or "
                "start a new run with --out NEW_FOLDER.")

    def save(self):
        """Writes a backup now (unless the weights are not finite)."""
        # The logged loss is computed before the step's update, so a finite loss can come with
        # an update that made the weights NaN: never back those up over the last good state.
        if not all(np.isfinite(w).all() for w in self.model.get_weights()):
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        for path in (self.weights_path, self.metadata_path):
            if os.path.exists(path):
                shutil.copyfile(path, path + PREVIOUS)
        partial = os.path.join(self.backup_dir, "partial.weights.h5")
        self.model.save_weights(partial, overwrite=True)
        with h5py.File(partial, "a") as f:
            f.attrs[_BATCHES_TRAINED] = self.batches_trained
            states = _seed_states(self.model)
            if states:
                f.create_dataset(_SEED_STATES, data=np.stack(
                    [keras.ops.convert_to_numpy(v) for v in states]))
        os.replace(partial, self.weights_path)
        partial = self.metadata_path + ".partial"
        with open(partial, "w") as f:
            json.dump({"epoch": self.epoch, "batch": self.batch,
                       "batches_trained": self.batches_trained,
                       "optimizer": _optimizer_signature(self.model.optimizer)}, f)
        os.replace(partial, self.metadata_path)
        self._since_backup = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.batch = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches_trained += 1
        self.batch += 1
        self._since_backup += 1
        if _finite(logs) and self._since_backup >= self.save_freq:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        # (Not again when a step backup was just written at the epoch's last batch.) The step
        # count restarts with this backup: with epochs of fewer steps than save_freq, a step
        # backup would otherwise follow each epoch-end one a few steps later.
        if _finite(logs) and self._since_backup:
            self.save()


class StopOnNaN(keras.callbacks.Callback):
    """Stops training at the first non-finite loss and remembers where it happened."""

    def __init__(self):
        super().__init__()
        self.epoch = 0
        self.stopped_at = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not _finite(logs) and self.stopped_at is None:
            self.stopped_at = (self.epoch + 1, batch + 1)
            self.model.stop_training = True
