"""AdamW and SGD whose `global_clipnorm` clips the gradient of the whole global batch.

Keras 3.15's optimizers clip each replica's own gradient and then sum them across replicas,
so under MirroredStrategy, MultiWorkerMirroredStrategy or a TPU an update could be up to
`num_replicas` times the clip (two replicas, clip 1.0: measured 1.45). These clip the summed
gradient, as one device with the global batch does (the paper's global-norm clipping at 1.0;
`keras_vit.keras_internals.SummedGradientClipping`). Registered, so a `.keras` file that uses
them loads after `import keras_vit`. `keras_vit.recipes` makes them with the paper's settings.
"""

import keras

from keras_vit.keras_internals import SummedGradientClipping


@keras.saving.register_keras_serializable(package="keras_vit")
class AdamW(SummedGradientClipping, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW`, with `global_clipnorm` over the summed replica gradients."""


@keras.saving.register_keras_serializable(package="keras_vit")
class SGD(SummedGradientClipping, keras.optimizers.SGD):
    """`keras.optimizers.SGD`, with `global_clipnorm` over the summed replica gradients."""
