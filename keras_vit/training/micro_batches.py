"""Micro-batches: one optimizer step on a batch computed in parts (gradient accumulation).

`use_micro_batches(model, n)` makes `model.fit` split each replica's batch into `n` parts,
run the forward and backward pass on one part at a time and sum the gradients, each
weighted by its share of the batch, before the one update. The update, the logged loss and
the metrics are those of the whole batch (the loss is a mean over examples, metrics are
running sums; `use_micro_batches` lists the losses where that does not hold); only dropout
and stochastic depth draw their masks per part.

Why: the activations kept for the backward pass shrink n-fold, so a batch that does not fit
in accelerator memory trains as it is; and on CPUs the parts' activations stay in the caches:
`fit` of ViT-Ti at 32x32 (patch 4, depth 6, batch 128) ran 1.09x faster with 4 parts, S/16 at
224 (batch 32) 1.13x with 4 (2 cores, XLA; `auto_micro_batches` encodes it).

TensorFlow-only module: `use_micro_batches` gives the model a `train_step` (Keras' public way
to change what `fit` does in a step) written with Keras' public API.
"""

import types

import keras
import tensorflow as tf

# On CPUs, parts of about this many tokens (images x tokens per image) were fastest: fewer
# spill the caches, more leave the matmuls too small (ViT-Ti 32x32 and S/16 224, 2 cores).
CPU_TOKENS_PER_PART = 1536


# `auto` splits a batch in at most this many parts, and only for runs of at least this many
# steps: the unrolled parts' graph compiles longer and repays it only over many steps. Measured
# on 2 cores under XLA (/tmp/exp/microbench.py): Ti/16 at 32x32, 6 blocks, batch 128: first
# step 21.5 s whole, 35.2 s in 4 parts, 113.2 s in 16; 73.9, 83.5 and 94.9 img/s (4 parts save
# 0.2 s a step: 70 steps repay them). S/16 at 224, batch 32: 47.8 s and 3.8 img/s whole, 79.1 s
# and 4.2 img/s in 4 parts (39 steps repay them). Keras' gradient_accumulation_steps=4 (Ti):
# 32.3 s, 78.9 img/s, and Adam's bias correction then counts micro-steps.
AUTO_MAX_PARTS = 4
AUTO_MIN_STEPS = 500


def auto_micro_batches(per_replica_batch, tokens, device_type="CPU", total_steps=None):
    """How many parts `fit` should split a replica's batch into: on CPUs, for runs of at least
    `AUTO_MIN_STEPS` steps, the most parts (up to `AUTO_MAX_PARTS`) that divide the batch and
    keep at least `CPU_TOKENS_PER_PART` tokens each; else 1, and on GPUs and TPUs (there a
    larger batch fills the device better; ask for parts to save memory).

    Args:
        per_replica_batch: int, examples per replica per step.
        tokens: int, tokens per image (patches, plus the class token).
        device_type: "CPU", "GPU" or "TPU", what the replicas run on.
        total_steps: the run's optimizer steps (None: long enough).
    """
    if device_type != "CPU" or (total_steps is not None and total_steps < AUTO_MIN_STEPS):
        return 1
    best = 1
    for parts in range(1, min(per_replica_batch, AUTO_MAX_PARTS) + 1):
        if per_replica_batch % parts == 0 and per_replica_batch // parts * tokens >= \
                CPU_TOKENS_PER_PART:
            best = parts
    return best


def use_micro_batches(model, parts):
    """Makes `model.fit` compute each replica's batch in `parts` parts (see the module doc).

    Call it before `fit` (it replaces the model's `train_step`; a compiled train function is
    dropped so that the next `fit` traces the new one). `parts=1` restores Keras' own step.
    Works under every `tf.distribute` strategy, with mixed precision loss scaling, sample
    weights and batches of any size (parts of ceil(batch / parts) examples: a batch of 12 in
    5 parts runs 4 parts of 3; with no static batch size the last parts may be empty). The
    parts' losses are weighted by their share of examples, which gives the whole batch's
    loss for Keras' default reduction (a mean over the batch); it does not for losses summed
    over the batch (`reduction="sum"`), divided by each part's weight sum
    ("mean_with_sample_weight") or averaged over unmasked entries, and BatchNormalization
    updates its moving statistics once per part (ViTs use LayerNorm).
    Nothing is saved with the model: a loaded model trains with whole batches until this is
    called again.

    Args:
        model: a compiled or uncompiled Keras model (TensorFlow backend).
        parts: int >= 1.
    """
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be a positive integer, got {parts!r}.")
    if parts > 1 and keras.backend.backend() != "tensorflow":
        raise RuntimeError("use_micro_batches replaces the TensorFlow trainer's train_step; "
                           f"this is the {keras.backend.backend()} backend.")
    if parts == 1:
        model.__dict__.pop("train_step", None)
    else:
        model.train_step = types.MethodType(_micro_batch_train_step(parts), model)
    model.train_function = None


def part_sizes(batch, parts):
    """(parts that run, examples per part) for a batch of `batch` asked in `parts` parts:
    parts of ceil(batch / parts) examples, the last one possibly smaller."""
    size = -(-batch // parts)
    return -(-batch // size), size


def micro_batches_of(model):
    """The parts `model.fit` computes each batch in: what `use_micro_batches` set, else 1."""
    return getattr(model.train_step, "micro_batches", 1)


def _micro_batch_train_step(parts):
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        first = next(t for t in tf.nest.flatten(x) if t is not None)
        batch = first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]
        weights = self.trainable_weights
        loss_tracker = next(m for m in self.metrics if m.name == "loss")
        replicas = tf.distribute.get_strategy().num_replicas_in_sync

        def gradients(xi, yi, wi):
            """One part's forward and backward pass: its gradients, weighted by its share of
            the batch, and the metrics updated with it."""
            examples = tf.shape(next(t for t in tf.nest.flatten(xi) if t is not None))[0]
            with tf.GradientTape() as tape:
                y_pred = self(xi, training=True)
                loss = self.compute_loss(x=xi, y=yi, y_pred=y_pred, sample_weight=wi,
                                         training=True)
                # compute_loss divides by the replicas (their gradients are summed); the
                # tracker logs the loss itself, as Keras' own train_step does.
                loss_tracker.update_state(loss * tf.cast(replicas, loss.dtype),
                                          sample_weight=examples)
                # The batch's loss is the parts' losses weighted by their share of examples.
                share = tf.cast(examples, loss.dtype) / tf.cast(batch, loss.dtype)
                loss = self.optimizer.scale_loss(loss * share)
            self.compute_metrics(xi, yi, y_pred, sample_weight=wi)
            # Sparse gradients (embedding lookups) are summed dense.
            return [None if g is None else tf.convert_to_tensor(g)
                    for g in tape.gradient(loss, weights)]

        def add(total, grads):
            return [g if t is None else (t if g is None else t + g)
                    for t, g in zip(total, grads)]

        def parts_of(i, size):
            def part(t):
                return None if t is None else t[i * size:(i + 1) * size]
            return [tf.nest.map_structure(part, v) if v is not None else None
                    for v in (x, y, sample_weight)]

        # Unrolled: a tf.while_loop over equal parts compiles once, but XLA ran it 3x slower
        # (S/16 at 224, batch 32 in 4 parts: 1.3 against 3.8 img/s whole), so `auto` keeps the
        # parts few instead (see auto_micro_batches). Parts of ceil(batch / parts); with no
        # static batch size the last ones may be empty.
        count, size = part_sizes(batch, parts) if isinstance(batch, int) else (
            parts, -(-batch // parts))
        total = [None] * len(weights)
        for i in range(count):
            total = add(total, gradients(*parts_of(i, size)))
        self.optimizer.apply_gradients(zip(total, weights))
        return self.get_metrics_result()

    train_step.micro_batches = parts
    return train_step
