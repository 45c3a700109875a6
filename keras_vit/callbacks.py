"""Training callbacks that keep work safe: exact mid-epoch resume, NaN stop (TensorFlow only)."""

import json
import math
import os
import shutil
import warnings

import h5py
import keras
import numpy as np


# What Keras 3.15 warns when a weights file's optimizer state does not fit the optimizer.
_OPTIMIZER_MISMATCH = "Skipping variable loading for optimizer"
# Attribute of a backup's weights file: batches trained when it was written.
_BATCHES_TRAINED = "keras_vit_batches_trained"
# Dataset of a backup's weights file: the model's seed generator states, in model.variables
# order (Keras' weights files leave them out, so a resumed run would draw its dropout and
# stochastic-depth masks from the start of the sequence again).
_SEED_STATES = "keras_vit_seed_states"


def _seed_states(model):
    return [v for v in model.variables if v.name == "seed_generator_state"]


def _finite(logs):
    loss = (logs or {}).get("loss")
    return loss is None or math.isfinite(float(loss))


class RunBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that resumes exactly where a killed run was, and never backs up NaNs.

    Keras' callback restores the weights (optimizer included) and the epoch, then
    replays the interrupted epoch from its first batch. Here the run restores
    before its input pipeline is built (`restore`), and the count of batches trained,
    kept in each backup's weights file, tells the pipeline how many to skip, so training
    continues with the batch after the last backup. The file also keeps the dropout and
    stochastic-depth seed states, so the resumed run draws the masks the uninterrupted one
    would have. (The optimizer's step count is not that count under mixed_float16: the
    loss-scale optimizer skips updates whose gradients overflow.) A backup is written at
    each epoch end and `save_freq` steps after the last one (steps counted across epochs);
    a backup is skipped when the loss is not finite, so the last good state survives a
    divergence. The previous backup is kept (`double_checkpoint`) and the new one replaces
    it at once.
    """

    def __init__(self, backup_dir, save_freq):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=True,
                         delete_checkpoint=False)
        self.batches_trained = 0

    def restore(self, model):
        """Loads the last backup into `model` (if any); returns the number of batches it had
        trained on."""
        self.set_model(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keras.callbacks.BackupAndRestore.on_train_begin(self)
        for warning in caught:
            if _OPTIMIZER_MISMATCH in str(warning.message):
                # Keras only warns when the optimizer state does not fit (a mixed_float16
                # backup's loss-scale optimizer has more variables, SGD fewer than AdamW):
                # the run would restart its schedule and data stream on trained weights.
                raise ValueError(
                    f"The backup in {self.backup_dir} does not fit this run's optimizer "
                    "(another --precision or --optimizer?): resume with the flags the run was "
                    "started with (its config.json), or start a new run with --out NEW_FOLDER.")
            warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                   warning.lineno)
        # fit() would prefer this over its initial_epoch argument on every later call.
        model._initial_epoch = None
        # The count is in the weights file, written with the weights; a backup from before
        # it was kept resumes by the optimizer's steps.
        self.batches_trained = int(model.optimizer.iterations.numpy())
        if os.path.exists(self._weights_path):
            with h5py.File(self._weights_path, "r") as f:
                self.batches_trained = int(f.attrs.get(_BATCHES_TRAINED, self.batches_trained))
                states = _seed_states(model)
                if _SEED_STATES in f and f[_SEED_STATES].shape[0] == len(states):
                    for variable, value in zip(states, f[_SEED_STATES][...]):
                        variable.assign(value)
        return self.batches_trained

    def _save_model(self):
        """Keras' backup (the previous one kept as .bkp), with the count of batches trained
        inside the weights file, which replaces the last one at once: a kill at any moment
        leaves a whole backup whose weights and count agree."""
        # The logged loss is computed before the step's update, so a finite loss can come with
        # an update that made the weights NaN: never back those up over the last good state.
        if not all(np.isfinite(w).all() for w in self.model.get_weights()):
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        for path, previous in ((self._weights_path, self._prev_weights_path),
                               (self._training_metadata_path, self._prev_training_metadata_path)):
            if os.path.exists(path):
                shutil.copyfile(path, previous)
        partial = os.path.join(self.backup_dir, "partial.weights.h5")
        self.model.save_weights(filepath=partial, overwrite=True)
        with h5py.File(partial, "a") as f:
            f.attrs[_BATCHES_TRAINED] = self.batches_trained
            states = _seed_states(self.model)
            if states:
                f.create_dataset(_SEED_STATES, data=np.stack(
                    [keras.ops.convert_to_numpy(v) for v in states]))
        os.replace(partial, self._weights_path)
        partial = f"{self._training_metadata_path}.partial"
        with open(partial, "w") as f:
            json.dump({"epoch": self._current_epoch, "batch": self._last_batch_seen}, f)
        os.replace(partial, self._training_metadata_path)

    def on_train_begin(self, logs=None):
        pass  # restored explicitly by `restore`, before the input pipeline is built

    def on_epoch_begin(self, epoch, logs=None):
        # Keras only advances this at epoch end, so mid-epoch backups after a resume
        # would record epoch 0.
        self._current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batches_trained += 1
        if _finite(logs):
            super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if not _finite(logs):
            return
        super().on_epoch_end(epoch, logs)
        # (Not again when a step backup was just written at the epoch's last batch.)
        if self.save_freq != "epoch" and self._batches_seen_since_last_saving:
            self._save_model()
            # The step count restarts with this backup: with epochs of fewer steps than
            # save_freq, a step backup would otherwise follow each epoch-end one a few steps
            # later, writing the whole state again (~0.25 s each for the digits model).
            self._batches_seen_since_last_saving = 0


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
