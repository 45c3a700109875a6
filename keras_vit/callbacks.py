"""Training callbacks that keep work safe: exact mid-epoch resume, NaN stop (TensorFlow only)."""

import math

import keras


def _finite(logs):
    loss = (logs or {}).get("loss")
    return loss is None or math.isfinite(float(loss))


class RunBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that resumes exactly where a killed run was, and never backs up NaNs.

    Keras' callback restores the weights (optimizer included) and the epoch, then
    replays the interrupted epoch from its first batch. Here the run restores
    before its input pipeline is built (`restore`), and the optimizer's step count
    tells the pipeline how many batches to skip, so training continues with the
    batch after the last backup. Backups happen every `save_freq` steps and at
    each epoch end; a backup is skipped when the loss is not finite, so the last
    good state survives a divergence. Two copies are kept (`double_checkpoint`) so
    a kill during a write leaves the previous one.
    """

    def __init__(self, backup_dir, save_freq):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=True,
                         delete_checkpoint=False)

    def restore(self, model):
        """Loads the last backup into `model` (if any); returns the optimizer step reached."""
        self.set_model(model)
        keras.callbacks.BackupAndRestore.on_train_begin(self)
        # fit() would prefer this over its initial_epoch argument on every later call.
        model._initial_epoch = None
        return int(model.optimizer.iterations.numpy())

    def on_train_begin(self, logs=None):
        pass  # restored explicitly by `restore`, before the input pipeline is built

    def on_epoch_begin(self, epoch, logs=None):
        # Keras only advances this at epoch end, so mid-epoch backups after a resume
        # would record epoch 0.
        self._current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
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
