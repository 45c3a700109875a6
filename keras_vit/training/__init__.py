"""Training with `model.fit` under `tf.distribute` (TensorFlow only): the configuration
(`config`), the steps of a run (`trainer`), data pipelines (`data`, `augment`), backups
(`callbacks`), strategies (`distribute`), micro-batches and the run folder (`run_dir`).

    from keras_vit.training import TrainConfig, train
    result = train(TrainConfig(data="folder:flowers", variant="S/16", epochs=10))
"""

from keras_vit.training.config import TrainConfig
from keras_vit.training.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
