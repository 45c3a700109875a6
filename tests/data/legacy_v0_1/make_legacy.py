"""Writes run folders and .keras files with keras-vit 0.1.0 (git e8411a5), the code path before
the ViT class, for the tests that keep old files loading."""
import json, sys
from pathlib import Path
import numpy as np
import keras
import keras_vit
from keras_vit.variants import Variant
from keras_vit import train as train_lib
from keras_vit.run_dir import save_run

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
# A notebook's model: plain ViT, 16x16 images, 4x4 patches, 3 classes, saved uncompiled.
tiny = Variant("T/4", width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4)
model = keras_vit.build(tiny, image_size=16, num_classes=3, name="vit_tiny")
for w in model.weights:
    w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
model.save(out / "notebook_vit.keras")
# A run folder as `keras-vit train` writes it: hybrid (ResNet root, width 32), AdamW + schedule.
hybrid = Variant("R+T/1", width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=1, resnet=(), resnet_width=32)
run_model = keras_vit.build(hybrid, image_size=16, num_classes=3, drop_path_rate=0.1)
config = dict(train_lib.DATA_DEFAULTS["digits"], data="digits", variant="R+Ti/16", image_size=[16, 16],
              epochs=2, batch_size=8, optimizer="adamw", schedule="cosine", clip_norm=1.0,
              momentum=0.9, preset="pretrain", seed=0, class_names=["cat", "dog", "bird"],
              num_classes=3, precision="float32", steps_per_epoch=2, replicas=1, micro_batches=1,
              finished=True, result={"test_accuracy": 1.0}, no_export=True, out=None,
              export_dir=None, verbose=1)
run_model.compile(optimizer=train_lib.build_optimizer(config, 2),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
x = rng.uniform(-1, 1, (16, 16, 16, 3)).astype("float32")
y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
run_model.fit(x, y, batch_size=8, epochs=1, verbose=0)
head = run_model.get_layer("head")
head.kernel.assign(rng.normal(0, 0.5, head.kernel.shape).astype("float32"))
pixels = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
save_run(out / "run", run_model, config, {"calibration_images": pixels[:6], "test_images": pixels[6:],
                                          "test_labels": rng.integers(0, 3, 6).astype(np.int32)})
# What both give, for the tests to compare against after loading with the new code.
probe = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
scaled = keras_vit.preprocess(probe)
np.savez(out / "expected.npz", probe=probe,
         notebook_logits=keras.ops.convert_to_numpy(model(scaled)),
         run_logits=keras.ops.convert_to_numpy(run_model(scaled)))
print(sorted(str(p.relative_to(out)) for p in out.rglob("*")))
