"""The errors keras-vit raises on purpose: each message names the problem and the fix.

Library code raises these (or plain ValueError/TypeError for bad arguments); only the command
line turns them into one line and an exit status. Every class here is a `KerasViTError`, and
the ones about bad values also a `ValueError`, so `except ValueError` keeps working.
"""


class KerasViTError(Exception):
    """Base class of keras-vit's own errors."""


class ConfigError(KerasViTError, ValueError):
    """A training configuration that cannot run (a flag out of range, sizes that do not fit)."""


class DataError(KerasViTError, ValueError):
    """A data source cannot be used (missing folder, no images, unprepared TFDS dataset)."""


class ResumeError(KerasViTError, ValueError):
    """An unfinished run cannot be resumed as asked (other settings, a backup that does not fit
    or that workers disagree on)."""


class TrainingDiverged(KerasViTError, RuntimeError):
    """The loss became NaN or infinite; the last good backup is kept (see `backup_dir`)."""

    def __init__(self, message, *, epoch, step, backup_dir):
        super().__init__(message)
        self.epoch, self.step, self.backup_dir = epoch, step, backup_dir


class CheckpointError(KerasViTError, ValueError):
    """A checkpoint that cannot be read, or does not fit the model (names keys and shapes)."""


class NotAnImageError(KerasViTError, ValueError):
    """A file or value given as an image is not a JPEG, PNG, BMP or GIF image that decodes."""


class ExportVerificationError(KerasViTError, RuntimeError):
    """An exported file does not give the answers the Keras model gives (or does not load)."""


class KerasInternalsChanged(KerasViTError, RuntimeError):
    """A Keras internal that keras-vit relies on is not what it expects (another Keras
    version); the message names the version and the workaround."""
