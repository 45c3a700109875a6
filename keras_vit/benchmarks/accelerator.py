"""ViT training throughput and model-FLOPs utilisation (`keras-vit benchmark-accelerator`).

Runs on whatever device the Keras backend uses and needs no TensorFlow: made for a GPU
machine with Keras on JAX, where a row of `keras-vit benchmark` (TensorFlow on CPU) cannot run.

    KERAS_BACKEND=jax python scripts/benchmark_accelerator.py          # B/16 224, bf16, batch 128
    KERAS_BACKEND=jax python scripts/benchmark_accelerator.py --variant L/16 --batch-size 64

What is timed is `model.fit` (AdamW, sparse cross-entropy, mixed_bfloat16 by default,
compiled) over random images held in host memory, as a user's in-memory data would be fed:
`--steps` steps per timed call, the median of `--repeats` calls after one call that compiles
and `--warmup` untimed ones. MFU counts the matmul FLOPs of keras-vit's forward pass times
three (the backward pass does twice the forward's), over the bfloat16 matmul peak measured
in the same run (the best of large square matmuls) and over the datasheet peak of the GPUs
named in `DATASHEET_TFLOPS`. `--peer timm` (the default) first times timm's ViT of the same
shape on the same device with PyTorch in its own process (`torch_peer`: torch.compile,
bfloat16 autocast, SDPA) and reports keras-vit's images/s as a ratio of it.
"""

import dataclasses
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time

# Dense bfloat16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's datasheets.
DATASHEET_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0,
                    "H200": 989.0, "A100": 312.0, "L4": 121.0}


def forward_flops(variant, image_size, num_classes, last_block_all_tokens=False):
    """Matmul FLOPs of one image through keras-vit's forward pass (see `vit_flops`), or with
    `last_block_all_tokens` through timm's, which runs the last block on every token."""
    from keras_vit.benchmarks.cpu import vit_flops

    return vit_flops(variant.width, variant.num_heads, variant.mlp_dim, variant.depth,
                     image_size, variant.patch_size, classes=num_classes,
                     last_block_all_tokens=last_block_all_tokens)


def _sync(x):
    import keras

    return keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.cast(x[:1, :1], "float32")))


def matmul_peak_tflops(n, dtype, repeats=5, chain=8):
    """Best TFLOP/s of `chain` dependent n x n matmuls in one compiled call (the device's peak
    as this backend reaches it)."""
    import keras

    a = keras.random.normal((n, n), dtype=dtype, seed=0) / n ** 0.5
    b = keras.random.normal((n, n), dtype=dtype, seed=1) / n ** 0.5

    def chained(x, y):
        for _ in range(chain):
            x = keras.ops.matmul(x, y)
        return x

    compiled = _compile(chained)
    _sync(compiled(a, b))
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        _sync(compiled(a, b))
        best = max(best, chain * 2 * n ** 3 / (time.perf_counter() - start) / 1e12)
    return best


def _compile(fn):
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    return fn


def device_name():
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            return f"{device.platform}: {getattr(device, 'device_kind', device)}"
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return f"gpu: {torch.cuda.get_device_name(0)}"
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                return f"gpu: {tf.config.experimental.get_device_details(gpus[0]).get('device_name')}"
    except Exception as err:  # a name is only for the report
        return f"unknown ({err})"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def datasheet_peak(name, precision):
    """The datasheet bfloat16/float16 peak of a GPU named like a key (whole words: "L4" is
    not "L40S"), or None (unknown GPU, or float32, whose peak depends on TF32)."""
    if precision == "float32":
        return None
    return next((tflops for key, tflops in DATASHEET_TFLOPS.items()
                 if re.search(rf"(^|\W){re.escape(key)}($|\W)", name)), None)


def peer_images_per_second(variant, args):
    """Runs `torch_peer` in its own process with the benchmark's shape and settings; returns
    its figures, or {"skipped": why} where PyTorch is missing or the peer fails."""
    import importlib.util

    if not importlib.util.find_spec("torch"):
        return {"skipped": "PyTorch is not installed"}
    command = [sys.executable, "-m", "keras_vit.cli.torch_peer",
               "--image-size", str(args.image_size), "--patch-size", str(variant.patch_size),
               "--width", str(variant.width), "--depth", str(variant.depth),
               "--heads", str(variant.num_heads), "--mlp-dim", str(variant.mlp_dim),
               "--num-classes", str(args.num_classes), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), "--precision", args.precision,
               "--compile", args.peer_compile]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"skipped": "the PyTorch peer ran over 30 minutes"}
    if result.returncode:
        return {"skipped": "the PyTorch peer failed: " + result.stderr.strip()[-1500:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_accelerator_benchmark(args):
    """Times `fit` as the module doc says (`args`: the options of `keras-vit
    benchmark-accelerator`); returns a dict of the figures. Progress goes to the
    "keras_vit.benchmark" logger. Raises ValueError for a hybrid variant."""
    import keras
    import numpy as np

    import keras_vit
    from keras_vit.variants import parse_variant

    log = logging.getLogger("keras_vit.benchmark")
    variant = parse_variant(args.variant, args.patch_size)
    if args.depth:
        variant = dataclasses.replace(variant, depth=args.depth)
    if variant.is_hybrid:
        raise ValueError("plain ViT variants only (the FLOP count has no ResNet stem)")
    # The peer first, in its own process, before this one's backend holds the device's memory.
    peer = None
    if args.peer == "timm":
        log.info("timing the PyTorch peer (timm's VisionTransformer, else Hugging Face's ViT) "
                 "in its own process")
        peer = peer_images_per_second(variant, args)
    name = device_name()
    log.info(f"device: {name}; Keras {keras.__version__} on {keras.backend.backend()}")
    matmul_dtype = "float32" if args.precision == "float32" else args.precision[len("mixed_"):]
    peak = matmul_peak_tflops(args.matmul_size, matmul_dtype)
    log.info(f"{matmul_dtype} matmul peak ({args.matmul_size}^3, best of 5, this run): "
             f"{peak:.4g} TFLOP/s")

    model = keras_vit.build(variant, image_size=args.image_size, num_classes=args.num_classes,
                            dtype=args.precision)
    model.compile(optimizer=keras.optimizers.AdamW(1e-4, weight_decay=0.1, global_clipnorm=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile="auto")
    images = args.batch_size * args.steps
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (images, args.image_size, args.image_size, 3)).astype("float32")
    y = rng.integers(0, args.num_classes, (images,)).astype("int32")

    def fit():
        model.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0)

    start = time.perf_counter()
    fit()
    log.info(f"first fit call (compiles): {time.perf_counter() - start:.1f} s")
    for _ in range(args.warmup):
        fit()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fit()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    per_second = images / seconds
    flops = 3 * forward_flops(variant, args.image_size, args.num_classes)
    achieved = flops * per_second / 1e12
    sheet = datasheet_peak(name, args.precision)
    return {"device": name, "variant": variant.name, "image_size": args.image_size,
            "batch_size": args.batch_size, "precision": args.precision,
            "images_per_second": per_second, "ms_per_step": 1000 * seconds / args.steps,
            "steps": args.steps, "repeats": args.repeats, "gflop_per_image": flops / 1e9,
            "achieved_tflops": achieved, "matmul_dtype": matmul_dtype,
            "measured_peak_tflops": peak, "mfu_measured": achieved / peak,
            "datasheet_tflops": sheet, "mfu_datasheet": achieved / sheet if sheet else None,
            "peer": peer,
            "peer_ratio": (per_second / peer["images_per_second"]
                           if peer and "images_per_second" in peer else None),
            "peer_mfu_measured": (
                3 * forward_flops(variant, args.image_size, args.num_classes, True)
                * peer["images_per_second"] / 1e12 / peak
                if peer and "images_per_second" in peer else None)}
