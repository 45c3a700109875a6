"""Learning-rate schedule of the paper: linear warm-up, then cosine or linear decay."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_vit")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then decay to `end` at `total_steps`.

    Args:
        peak: float, the learning rate after warm-up.
        total_steps: int, the step at which the decay reaches `end`.
        warmup_steps: int, length of the linear warm-up.
        decay: "cosine" or "linear".
        end: float, final learning rate.
    """

    def __init__(self, peak, total_steps, warmup_steps=0, decay="cosine", end=0.0):
        if decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be 'cosine' or 'linear', got {decay!r}.")
        if total_steps <= warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps "
                             f"({warmup_steps}): train longer or warm up for fewer steps.")
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.end = float(end)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = self.peak * (step + 1.0) / max(self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / (self.total_steps - self.warmup_steps),
                            0.0, 1.0)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + ops.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        decayed = self.end + (self.peak - self.end) * shape
        return ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "decay": self.decay, "end": self.end}
