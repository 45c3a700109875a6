"""AdamW and SGD whose `global_clipnorm` clips the gradient of the whole global batch.

Keras 3.15's optimizers clip each replica's own gradient and then sum them across replicas,
so under MirroredStrategy, MultiWorkerMirroredStrategy or a TPU an update could be up to
`num_replicas` times the clip (two replicas, clip 1.0: measured 1.45). These clip the summed
gradient, as one device with the global batch does (the paper's global-norm clipping at 1.0).
Registered, so a `.keras` file that uses them loads after `import keras_vit`.
"""

import keras


class _ClipSummedGradient:
    def _clip_gradients(self, grads):
        if self.global_clipnorm and keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            context = tf.distribute.get_replica_context()
            if context is not None and context.num_replicas_in_sync > 1:
                present = [g for g in grads if g is not None]
                # The optimizer sums the replicas' gradients next; clip that sum's norm.
                norm = tf.linalg.global_norm(context.all_reduce(tf.distribute.ReduceOp.SUM,
                                                                present))
                scale = self.global_clipnorm / tf.maximum(norm, self.global_clipnorm)
                return [None if g is None else g * tf.cast(scale, g.dtype) for g in grads]
        return super()._clip_gradients(grads)


@keras.saving.register_keras_serializable(package="keras_vit")
class AdamW(_ClipSummedGradient, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW`, with `global_clipnorm` over the summed replica gradients."""


@keras.saving.register_keras_serializable(package="keras_vit")
class SGD(_ClipSummedGradient, keras.optimizers.SGD):
    """`keras.optimizers.SGD`, with `global_clipnorm` over the summed replica gradients."""
