"""Training callbacks that keep work safe: exact mid-epoch resume, NaN stop (TensorFlow only)."""

import json
import math

import keras
import numpy as np


def _finite(logs):
    loss = (logs or {}).get("loss")
    return loss is None or math.isfinite(float(loss))


class RunBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that resumes exactly where a killed run was, and never backs up NaNs.

    Keras' callback restores the weights (optimizer included) and the epoch, then
    replays the interrupted epoch from its first batch. Here the run restores
    before its input pipeline is built (`restore`), and the count of batches trained,
    kept with each backup, tells the pipeline how many to skip, so training continues
    with the batch after the last backup. (The optimizer's step count is not that count
    under mixed_float16: the loss-scale optimizer skips updates whose gradients overflow.) Backups happen every `save_freq` steps and at
    each epoch end; a backup is skipped when the loss is not finite, so the last
    good state survives a divergence. Two copies are kept (`double_checkpoint`) so
    a kill during a write leaves the previous one.
    """

    def __init__(self, backup_dir, save_freq):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=True,
                         delete_checkpoint=False)
        self.batches_trained = 0

    def restore(self, model):
        """Loads the last backup into `model` (if any); returns the number of batches it had
        trained on."""
        self.set_model(model)
        keras.callbacks.BackupAndRestore.on_train_begin(self)
        # fit() would prefer this over its initial_epoch argument on every later call.
        model._initial_epoch = None
        step = int(model.optimizer.iterations.numpy())
        # Backups written before the count was kept: the optimizer's steps.
        self.batches_trained = self._metadata().get("batches_trained", step)
        if step == 0 and self._backed_up_after_training():
            # Keras only warns when the optimizer state does not fit (e.g. a mixed_float16
            # backup, whose loss-scale optimizer has more variables): the run would restart
            # its schedule and data stream on trained weights.
            raise ValueError(
                f"The backup in {self.backup_dir} does not fit this run's optimizer (another "
                "--precision or --optimizer?): resume with the flags the run was started with "
                "(its config.json), or start a new run with --out NEW_FOLDER.")
        return self.batches_trained

    def _metadata(self):
        try:
            with open(self._training_metadata_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _backed_up_after_training(self):
        state = self._metadata()
        return bool(state.get("epoch") or state.get("batch"))

    def _save_model(self):
        # The logged loss is computed before the step's update, so a finite loss can come with
        # an update that made the weights NaN: never back those up over the last good state.
        if all(np.isfinite(w).all() for w in self.model.get_weights()):
            super()._save_model()
            # Keras wrote the epoch and batch; the count goes in the same file (a kill before
            # this line leaves a backup that resumes by the optimizer's step count).
            state = {**self._metadata(), "batches_trained": self.batches_trained}
            with open(self._training_metadata_path, "w") as f:
                json.dump(state, f)

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
        if self.save_freq != "epoch":
            self._save_model()


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
