"""Speed of keras-vit against the peers installed here (`keras-vit benchmark`), on CPU.

Every comparison is measured in one process, interleaved (A, B, B, A ... after a warm-up,
the order rotated each round), and reported as medians with the ratio per row (> 1 means keras-vit is better: faster,
lower latency, less memory). Peers: keras-hub's `ViTBackbone` at the same configuration
(XLA-compiled, like keras-vit) and Hugging Face's PyTorch `ViTModel` (eager, inference mode)
where they import. The float32 matmul peak of this machine is measured in the same run
(a large TensorFlow matmul), so throughput is also given as a fraction of it.

    python scripts/benchmark.py --quick          # about 8 minutes on 2 idle cores
    python scripts/benchmark.py                  # every row (Ti/S/B-16, batch 1 and 16, ...)
    python scripts/benchmark.py --rows infer --variants B/16 --batch-sizes 16 --repeats 10

TensorFlow-only module (it times the TensorFlow backend). `run_benchmark(options)` returns
the table; progress goes to the "keras_vit.benchmark" logger.
"""

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time

logger = logging.getLogger("keras_vit.benchmark")

ROWS = ("infer", "train", "augment", "bf16", "tflite", "memory")
PEERS = ("keras-hub", "torch")
# (width, heads, mlp) of the paper's variants; depth 12 and patch 16 for all three.
CONFIGS = {"Ti/16": (192, 3, 768), "S/16": (384, 6, 1536), "B/16": (768, 12, 3072)}
# Training: the CIFAR-size configuration of the training issue.
TRAIN = dict(variant="Ti/16", image_size=32, patch_size=4, depth=6, num_classes=10)
GOALS = {"infer": 1.15, "train": 1.3, "bf16": 1.6, "tflite": 1.25, "int8": 3.5}
MEMORY_GOAL_MB = 1200
# keras-vit's rows against the peers use the exact (erf) GELU that keras-hub and Hugging Face
# compute: the same maths in every model (keras-vit's default is the reference's tanh form).
PEER_GELU = "erf"


# ---------------------------------------------------------------- timing


def interleaved(fns, repeats, warmup):
    """Calls each fn once (compile), then `warmup` untimed and `repeats` timed rounds, the fns
    taking turns in every round; returns {name: median seconds per call}."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        # Rotated each round, so whatever a call leaves behind (threads, garbage) does not
        # always land on the same next one.
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(n=4096, repeats=5):
    """Best float32 GFLOP/s of an n x n x n TensorFlow matmul (graph and XLA, best of both)."""
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    best = 0.0
    for jit in (False, True):
        fn = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)[:1, :1]), jit_compile=jit)
        fn(a, b).numpy()
        for _ in range(repeats):
            start = time.perf_counter()
            fn(a, b).numpy()
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def vit_flops(width, heads, mlp, depth, image_size, patch_size, channels=3, classes=0,
              class_token=True, last_block_all_tokens=False):
    """Multiply-add FLOPs (x2) of one image through keras-vit's forward pass (matmuls only):
    the work done, so with a class token the last block counts the class token's queries,
    projections and MLP alone (see `keras_vit.build`); `last_block_all_tokens`: as models
    that run the last block on every token (timm, Hugging Face) do."""
    patches = (image_size // patch_size) ** 2
    tokens = patches + int(class_token)
    embed = 2 * patches * patch_size * patch_size * channels * width

    def block(queries):  # keys and values always come from every token
        return (2 * tokens * width * 2 * width       # k, v
                + 2 * queries * width * width        # q
                + 2 * 2 * queries * tokens * width   # logits and weighted sum
                + 2 * queries * width * width        # output projection
                + 2 * 2 * queries * width * mlp)     # MLP

    last = block(1 if class_token and not last_block_all_tokens else tokens)
    return embed + (depth - 1) * block(tokens) + last + 2 * width * classes


# ---------------------------------------------------------------- models


def _keras_vit(variant, image_size, depth=None, **kwargs):
    import keras_vit

    return keras_vit.build(variant, image_size=image_size, depth=depth, **kwargs)


def _keras_hub(variant, image_size, depth=None, patch_size=16):
    from keras_hub.models import ViTBackbone

    width, heads, mlp = CONFIGS[variant]
    return ViTBackbone(image_shape=(image_size, image_size, 3), patch_size=patch_size,
                       num_layers=depth or 12, num_heads=heads, hidden_dim=width, mlp_dim=mlp)


def _keras_call(model, images, xla=True):
    """One compiled forward pass: a `tf.function`, XLA-compiled or a TensorFlow graph (whose
    matmuls, bias adds and GELUs grappler fuses into oneDNN kernels)."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False), jit_compile=xla)
    return lambda: fn(images).numpy()


def _torch_vit(variant, image_size, depth=None, patch_size=16):
    import torch
    from transformers import ViTConfig, ViTModel

    torch.set_num_threads(os.cpu_count())
    width, heads, mlp = CONFIGS[variant]
    config = ViTConfig(hidden_size=width, num_hidden_layers=depth or 12, num_attention_heads=heads,
                       intermediate_size=mlp, image_size=image_size, patch_size=patch_size)
    return ViTModel(config, add_pooling_layer=False).eval()


def _torch_call(model, batch, image_size):
    import torch

    x = torch.rand(batch, 3, image_size, image_size) * 2 - 1

    def call():
        with torch.inference_mode():
            return model(pixel_values=x).last_hidden_state.numpy()

    return call


def available_peers(wanted):
    peers = []
    for peer in wanted:
        try:
            if peer == "keras-hub":
                import keras_hub  # noqa: F401
            elif peer == "torch":
                os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning between turns
                import torch  # noqa: F401
                import transformers  # noqa: F401
            else:
                raise ValueError(f"unknown peer {peer!r}; choose among {PEERS}")
            peers.append(peer)
        except ImportError as e:
            logger.info(f"peer {peer} not measured: {e}")
    return peers


# ---------------------------------------------------------------- rows


class Table:
    def __init__(self):
        self.rows = []

    def add(self, work, ours, peer, theirs, ratio, peak=None, goal=None, note=""):
        met = "" if goal is None or ratio is None else ("met" if ratio >= goal else "missed")
        row = dict(work=work, keras_vit=ours, peer=peer, peer_value=theirs,
                   ratio=None if ratio is None else round(ratio, 3), peak=peak,
                   goal=None if goal is None else f">= {goal}x {met}".strip(), note=note)
        self.rows.append(row)
        logger.info("  " + " | ".join(str(v) for v in row.values() if v not in (None, "")))

    def format(self, header):
        """The table as text (Markdown), under `header`."""
        cols = [("work", "work"), ("keras_vit", "keras-vit"), ("peer", "peer"),
                ("peer_value", "peer value"), ("ratio", "ratio"), ("peak", "kv % peak"),
                ("goal", "goal"), ("note", "note")]
        cells = [[("-" if r[k] is None else (f"{r[k]:.2f}x" if k == "ratio" else str(r[k])))
                  for k, _ in cols] for r in self.rows]
        widths = [max([len(t)] + [len(c[i]) for c in cells]) for i, (_, t) in enumerate(cols)]
        line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
        return "\n".join(["", header, line([t for _, t in cols]),
                          "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                         + [line(c) for c in cells])


def _kv_path(args):
    return "XLA" if args.keras_vit_xla else "TF graph"


def _speed(seconds, batch):
    return f"{batch / seconds:.1f} img/s ({1000 * seconds:.1f} ms)"


def row_infer(table, args, peers, peak):
    import numpy as np
    import tensorflow as tf

    size = args.image_size
    for variant in args.variants:
        width, heads, mlp = CONFIGS[variant]
        kv = _keras_vit(variant, size, args.depth, gelu=PEER_GELU)
        models = {"keras-vit": kv}
        if "keras-hub" in peers:
            models["keras-hub"] = _keras_hub(variant, size, args.depth)
        if "torch" in peers:
            models["torch"] = _torch_vit(variant, size, args.depth)
        flops = vit_flops(width, heads, mlp, args.depth or 12, size, 16, classes=1000)
        for batch in args.batch_sizes:
            images = tf.constant(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)),
                                 tf.float32)
            fns = {name: (_torch_call(m, batch, size) if name == "torch" else
                          _keras_call(m, images, xla=args.keras_vit_xla or name == "keras-hub"))
                   for name, m in models.items()}
            work = f"infer f32 {variant} {size}px batch {batch}"
            # One interleaved pair per peer: a framework's idle worker threads slow the next
            # call of another, so keras-vit vs keras-hub is not measured alongside PyTorch.
            for name in models:
                if name == "keras-vit":
                    continue
                t = interleaved({"keras-vit": fns["keras-vit"], name: fns[name]},
                                args.repeats, args.warmup)
                ours = t["keras-vit"]
                pct = f"{100 * flops * batch / ours / 1e9 / peak:.0f}%"
                label = "keras-hub ViTBackbone (XLA)" if name == "keras-hub" else "HF ViTModel (PyTorch eager)"
                table.add(work, _speed(ours, batch), label, _speed(t[name], batch), t[name] / ours,
                          pct, GOALS["infer"] if name == "keras-hub" else None,
                          f"keras-vit: {_kv_path(args)}")
            if len(models) == 1:
                ours = interleaved({"keras-vit": fns["keras-vit"]}, args.repeats, args.warmup)
                ours = ours["keras-vit"]
                table.add(work, _speed(ours, batch), "-", None, None,
                          f"{100 * flops * batch / ours / 1e9 / peak:.0f}%")


def _train_data(batch, steps, image_size, classes=10):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch * steps, image_size, image_size, 3)).astype("float32")
    y = rng.integers(0, classes, (batch * steps,)).astype("int32")
    # tf.data's autotuner makes some `fit` calls end with a one-second stall (its optimisation
    # thread is joined when the iterator goes away; measured: 8 steps took 4.1 s or 5.1 s),
    # which hits whichever model it lands on; the cached in-memory batches need no tuning.
    options = tf.data.Options()
    options.autotune.enabled = False
    ds = (tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)
          .cache().repeat().with_options(options))
    return ds, x, y


def _compile_for_fit(model, xla=True):
    import keras

    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=xla)
    return model


def _keras_hub_classifier(image_size, depth, patch_size, classes):
    import keras

    width, heads, mlp = CONFIGS["Ti/16"]
    backbone = _keras_hub("Ti/16", image_size, depth, patch_size=patch_size)
    images = keras.Input((image_size, image_size, 3))
    tokens = backbone(images)
    logits = keras.layers.Dense(classes)(tokens[:, 0])
    return keras.Model(images, logits)


def _torch_train_step_fn(image_size, depth, patch_size, batch, classes):
    import torch

    model = _torch_vit("Ti/16", image_size, depth, patch_size=patch_size).train()
    head = torch.nn.Linear(CONFIGS["Ti/16"][0], classes)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    x = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    y = torch.randint(0, classes, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        logits = head(model(pixel_values=x).last_hidden_state[:, 0])
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def _train_model(image_size, depth, xla, batch, micro_batches="auto", dtype=None):
    """keras-vit at the training configuration, compiled for `fit`; by default in the
    micro-batches `keras-vit train --micro-batches auto` picks for this batch (on CPUs, 4 parts
    of 32 at batch 128)."""
    import types

    import tensorflow as tf

    from keras_vit.training.micro_batches import use_micro_batches
    from keras_vit.training.trainer import pick_micro_batches

    model = _compile_for_fit(_keras_vit(TRAIN["variant"], image_size, depth, gelu=PEER_GELU,
                                        patch_size=TRAIN["patch_size"],
                                        num_classes=TRAIN["num_classes"], dtype=dtype), xla)
    tokens = (image_size // TRAIN["patch_size"]) ** 2 + 1
    micro_batches = pick_micro_batches(types.SimpleNamespace(micro_batches=micro_batches), batch,
                                       tokens, tf.distribute.get_strategy())
    use_micro_batches(model, micro_batches)
    return model


def _fit_call(model, dataset, steps):
    return lambda: model.fit(dataset, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)


def row_train(table, args, peers, peak):
    batch, steps = args.train_batch_size, args.train_steps
    size = args.train_image_size
    depth = args.depth or TRAIN["depth"]
    patch = TRAIN["patch_size"]
    dataset, _, _ = _train_data(batch, steps, size)
    # keras-vit's fit both ways: a TensorFlow graph (oneDNN) and XLA (jit_compile=True), in
    # the micro-batches `keras-vit train` picks; and XLA in whole batches, as keras-hub runs.
    models = {"keras-vit TF graph": _train_model(size, depth, False, batch),
              "keras-vit XLA": _train_model(size, depth, True, batch),
              "keras-vit XLA, whole batches": _train_model(size, depth, True, batch, 1)}
    fns = {name: _fit_call(model, dataset, steps) for name, model in models.items()}
    if "keras-hub" in peers:
        fns["keras-hub"] = _fit_call(_compile_for_fit(
            _keras_hub_classifier(size, depth, patch, TRAIN["num_classes"])), dataset, steps)
    t = interleaved(fns, args.repeats, args.warmup)
    if "torch" in peers:  # its own interleaved pair (see row_infer)
        step = _torch_train_step_fn(size, depth, patch, batch, TRAIN["num_classes"])
        fns["torch"] = lambda: [step() for _ in range(steps)]
        torch_pair = interleaved({"keras-vit XLA": fns["keras-vit XLA"], "torch": fns["torch"]},
                                 args.repeats, args.warmup)
    width, heads, mlp = CONFIGS["Ti/16"]
    flops = 3 * vit_flops(width, heads, mlp, depth, size, patch, classes=TRAIN["num_classes"])
    images = batch * steps
    work = f"train fit {size}px p{patch} w{width} d{depth} batch {batch}"
    from keras_vit.training.micro_batches import micro_batches_of

    for ours_name, model in models.items():
        how = ours_name[10:]
        parts = micro_batches_of(model)
        how += f", {parts} micro-batches of {batch // parts}" if parts > 1 else ""
        ours = t[ours_name]
        pct = f"{100 * flops * images / ours / 1e9 / peak:.0f}%"
        compared = False
        for name in ("keras-hub", "torch"):
            if name not in fns or (name == "torch" and ours_name != "keras-vit XLA"):
                continue
            if name == "torch":
                ours = torch_pair["keras-vit XLA"]
                t["torch"] = torch_pair["torch"]
                pct = f"{100 * flops * images / ours / 1e9 / peak:.0f}%"
            label = ("keras-hub ViTBackbone fit (XLA)" if name == "keras-hub"
                     else "HF ViTModel (PyTorch loop)")
            table.add(work, _speed(ours, images), label, _speed(t[name], images), t[name] / ours,
                      pct, GOALS["train"] if name == "keras-hub" else None,
                      f"keras-vit: {how}; {steps} steps per timed call")
            compared = True
        if not compared:
            table.add(work, _speed(ours, images), "-", None, None, pct, None,
                      f"keras-vit: {how}")


def row_augment(table, args, peers, peak):
    """RandAugment in the input pipeline: keras-vit's per-image operations against Keras'
    layer (operations drawn once per batch, all 11 computed on every image)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_vit.training.augment import PerImageRandAugment

    size, batch = args.image_size, args.train_batch_size
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3))
                         .astype("uint8"))
    layers = {"keras-vit": PerImageRandAugment(value_range=(0, 255), factor=0.5, seed=0),
              "keras": keras.layers.RandAugment(value_range=(0, 255), factor=0.5, seed=0)}
    calls = {}
    for name, layer in layers.items():
        augment = tf.function(lambda x, layer=layer: layer(tf.cast(x, tf.float32), training=True))
        calls[name] = lambda augment=augment: augment(images).numpy()
    t = interleaved(calls, args.repeats, args.warmup)
    table.add(f"RandAugment {size}px batch {batch} (tf.data)", _speed(t["keras-vit"], batch),
              "keras.layers.RandAugment", _speed(t["keras"], batch), t["keras"] / t["keras-vit"],
              note="2 ops per image, factor 0.5; Keras draws them per batch")


def _digit_images(count, size):
    """Real images for the agreement check: scikit-learn's digits, upscaled to RGB in [-1, 1]."""
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits().images[:count].astype("float32") / 16.0
    x = tf.image.resize(digits[..., None], (size, size), method="bilinear")
    return tf.constant(np.repeat(x.numpy(), 3, axis=-1) * 2 - 1)


def row_bf16(table, args, peers, peak):
    import numpy as np
    import tensorflow as tf

    variant, size, batch = args.bf16_variant, args.image_size, max(args.batch_sizes)
    f32 = _keras_vit(variant, size, args.depth)
    rng = np.random.default_rng(0)
    for w in f32.weights:  # random weights everywhere (the head starts at zeros)
        w.assign(rng.normal(0, 0.02 if w.path.endswith("kernel") else 0.01, w.shape))
    bf16 = _keras_vit(variant, size, args.depth, dtype="mixed_bfloat16")
    bf16.set_weights(f32.get_weights())
    images = tf.constant(rng.uniform(-1, 1, (batch, size, size, 3)), tf.float32)
    # bfloat16 runs as a TensorFlow graph: oneDNN's bf16 matmuls (avx512_bf16 / AMX); XLA's CPU
    # backend has no fast bf16 dots. float32 runs on keras-vit's default path.
    t = interleaved({"f32": _keras_call(f32, images, args.keras_vit_xla),
                     "bf16": _keras_call(bf16, images, False)},
                    args.repeats, args.warmup)
    real = _digit_images(64, size)
    top_f32 = np.argmax(f32.predict(real, batch_size=batch, verbose=0), -1)
    top_bf16 = np.argmax(bf16.predict(real, batch_size=batch, verbose=0), -1)
    agreement = float(np.mean(top_f32 == top_bf16))
    table.add(f"infer bf16 {variant} {size}px batch {batch}", _speed(t["bf16"], batch),
              f"keras-vit float32 ({_kv_path(args)})", _speed(t["f32"], batch), t["f32"] / t["bf16"], None,
              GOALS["bf16"],
              f"bf16: TF graph; top-1 agreement {100 * agreement:.1f}% on 64 digits images, "
              "random weights")
    _row_bf16_train(table, args)


def _row_bf16_train(table, args):
    """`fit` of the training configuration under mixed_bfloat16 (TF graph, what `keras-vit
    train --precision mixed_bfloat16` picks on CPUs) against float32 (XLA, the default)."""
    batch, steps, size = args.train_batch_size, args.train_steps, args.train_image_size
    dataset, _, _ = _train_data(batch, steps, size)
    fns = {}
    for name, policy, xla in (("f32", "float32", True), ("bf16", "mixed_bfloat16", False)):
        model = _train_model(size, args.depth or TRAIN["depth"], xla, batch, dtype=policy)
        fns[name] = _fit_call(model, dataset, steps)
    t = interleaved(fns, args.repeats, args.warmup)
    images = batch * steps
    table.add(f"train fit bf16 {size}px p{TRAIN['patch_size']} w{CONFIGS['Ti/16'][0]} batch "
              f"{batch}", _speed(t["bf16"], images), "keras-vit float32 fit (XLA)",
              _speed(t["f32"], images), t["f32"] / t["bf16"], None, None,
              "bf16: mixed_bfloat16, TF graph (oneDNN)")


def _tflite_bytes(model, size, quantize=False):
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec((1, size, size, 3), tf.float32)])
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)

    frozen = convert_variables_to_constants_v2(fn.get_concrete_function())  # weights inside
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize:  # int8 weights (dynamic range quantization)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def row_tflite(table, args, peers, peak):
    import numpy as np
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    variant, size = args.tflite_variant, args.image_size
    model = _keras_vit(variant, size, args.depth)
    f32 = _tflite_bytes(model, size)
    int8 = _tflite_bytes(model, size, quantize=True)
    interpreter = Interpreter(model_content=f32, num_threads=os.cpu_count())
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    x = np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype("float32")

    def lite():
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        return interpreter.get_tensor(out)

    t = interleaved({"tflite": lite, "keras": _keras_call(model, tf.constant(x), args.keras_vit_xla)},
                    args.repeats, args.warmup)
    table.add(f"TFLite f32 {variant} {size}px batch 1 latency", f"{1000 * t['tflite']:.1f} ms",
              f"keras-vit Keras path ({_kv_path(args)})", f"{1000 * t['keras']:.1f} ms",
              t["keras"] / t["tflite"], None, GOALS["tflite"],
              "XNNPACK, ai_edge_litert; ratio 1.25x = latency 0.8x")
    table.add(f"TFLite int8 {variant} file size", f"{len(int8) / 1e6:.1f} MB",
              "TFLite float32 file", f"{len(f32) / 1e6:.1f} MB", len(f32) / len(int8), None,
              GOALS["int8"], "dynamic-range int8 weights")


_MEMORY_CHILD = r"""
import os, resource, sys, json


def peak_kb():
    # VmHWM: the peak RSS of this process image. (ru_maxrss survives exec on Linux: a child
    # of a large parent starts with the parent's high-water mark.)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
which, variant, size, batch, depth, xla = sys.argv[1:7]
size, batch = int(size), int(batch)
depth = int(depth) if depth != "None" else None
from keras_vit.benchmarks import cpu as b
import numpy as np
if which == "torch":
    import torch, transformers
else:
    import tensorflow as tf, keras
    if which == "keras-hub":
        import keras_hub
base = peak_kb()
if which == "torch":
    model = b._torch_vit(variant, size, depth)
    call = b._torch_call(model, batch, size)
else:
    model = (b._keras_vit(variant, size, depth) if which == "keras-vit"
             else b._keras_hub(variant, size, depth))
    images = tf.constant(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), tf.float32)
    call = b._keras_call(model, images, xla=which == "keras-hub" or xla == "xla")
for _ in range(3):
    call()
peak = peak_kb()
sys.stdout.write(json.dumps({"base_mb": base / 1024, "peak_mb": peak / 1024}) + "\n")
"""


def _memory_mb(which, variant, size, batch, depth, xla):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, which, variant, str(size),
                          str(batch), str(depth), "xla" if xla else "graph"], capture_output=True, text=True, env=env,
                         timeout=900)
    if out.returncode:
        raise RuntimeError(f"memory child for {which} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["peak_mb"] - result["base_mb"]


def row_memory(table, args, peers, peak):
    variant, batch, size = args.memory_variant, args.memory_batch_size, args.image_size
    ours = _memory_mb("keras-vit", variant, size, batch, args.depth, args.keras_vit_xla)
    work = f"peak memory {variant} {size}px batch {batch} inference"
    note = "peak RSS - peak RSS after import, own process"
    goal = f"<= {MEMORY_GOAL_MB} MB {'met' if ours <= MEMORY_GOAL_MB else 'missed'}"
    shown = False
    for peer in peers:
        theirs = _memory_mb(peer, variant, size, batch, args.depth, True)
        label = "keras-hub (XLA)" if peer == "keras-hub" else "HF ViTModel (PyTorch)"
        table.add(work, f"{ours:.0f} MB", label, f"{theirs:.0f} MB",
                  theirs / ours if ours > 0 else None, None, None, note)
        table.rows[-1]["goal"] = goal
        shown = True
    if not shown:
        table.add(work, f"{ours:.0f} MB", "-", None, None, None, None, note)
        table.rows[-1]["goal"] = goal


# ---------------------------------------------------------------- entry point


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, load average {load:.2f}"


def run_benchmark(args):
    """Runs the rows `args` asks for (the options of `keras-vit benchmark`, an argparse
    namespace); returns (Table, its header). Raises ValueError for an unknown row or variant."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    quick = args.quick
    args.keras_vit_xla = not args.keras_vit_graph
    args.rows = [r for r in (args.rows or ",".join(ROWS)).split(",") if r]
    for r in args.rows:
        if r not in ROWS:
            raise ValueError(f"unknown row {r!r}; choose among {', '.join(ROWS)}")
    args.variants = [v for v in (args.variants or ("Ti/16" if quick else "Ti/16,S/16,B/16"))
                     .split(",") if v]
    for v in args.variants + [v for v in (args.bf16_variant, args.tflite_variant) if v]:
        if v not in CONFIGS:
            raise ValueError(f"variant {v!r} not among {', '.join(CONFIGS)}")
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b]
    args.repeats = args.repeats or (5 if quick else 15)
    args.train_steps = args.train_steps or (4 if quick else 8)
    args.bf16_variant = args.bf16_variant or args.variants[-1]
    args.tflite_variant = args.tflite_variant or args.variants[-1]

    import keras  # noqa: F401 (after the environment above)
    import tensorflow as tf

    peers = available_peers([p for p in args.peers.split(",") if p])
    started = time.time()
    logger.info(f"machine: {_machine()}; TensorFlow {tf.__version__}, Keras {keras.__version__}")
    peak = matmul_peak(2048 if args.image_size < 64 else 4096)
    logger.info(f"float32 matmul peak (best large TF matmul, this run): {peak:.0f} GFLOP/s")
    table = Table()
    rows = {"infer": row_infer, "train": row_train, "augment": row_augment, "bf16": row_bf16,
            "tflite": row_tflite, "memory": row_memory}
    for name in args.rows:
        rows[name](table, args, peers, peak)
    elapsed = time.time() - started
    header = (f"keras-vit benchmark ({_machine()}; matmul peak {peak:.0f} GFLOP/s; "
              f"medians of {args.repeats} interleaved rounds; {elapsed:.0f} s; "
              "ratio > 1 = keras-vit better)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _machine(), "peak_gflops": peak, "rows": table.rows,
                       "seconds": elapsed}, f, indent=2)
    return table, header
