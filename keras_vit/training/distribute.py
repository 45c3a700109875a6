"""`tf.distribute` strategies for training keras-vit models with `model.fit`.

    strategy = make_strategy("auto")          # TPU, else all GPUs, else the default strategy
    with strategy.scope():
        model = keras_vit.build(...)
        model.compile(...)
    model.fit(dataset.batch(global_batch_size), ...)

    out = worker_dir(run_dir, strategy)        # run_dir on the chief, a temp folder elsewhere
    model.save_weights(out / "model.weights.h5")   # every worker saves (see `worker_dir`)
    remove_worker_dir(run_dir, strategy)        # non-chief workers drop their copies

Strategies (`make_strategy(name)`, `STRATEGIES`):

- "auto": TPUStrategy when a TPU is evidently there (an explicit address, `TPU_NAME`, or a
  local TPU device file); MirroredStrategy over all GPUs when there are two or more; else the
  default strategy (one GPU or the CPU). It never asks the network whether a TPU exists.
- "one-device": OneDeviceStrategy on GPU:0, or CPU:0 without a GPU.
- "mirrored": MirroredStrategy, synchronous data parallelism over this machine's GPUs;
  `cpu_devices=N` splits the CPU into N logical devices first (tests, demos).
- "multi-worker": MultiWorkerMirroredStrategy over the machines listed in `TF_CONFIG`;
  applies `fix_keras_20585()`, without which Keras 3.15's `model.fit` fails under it.
- "tpu": TPUStrategy (`tpu_address`, else `TPU_NAME`, else a TPU attached to this VM).

Batch sizes: `model.fit` under a strategy takes batches of the GLOBAL batch size (batch the
`tf.data.Dataset` with it); `tf.distribute` splits each global batch across the
`strategy.num_replicas_in_sync` replicas, so each replica computes on
`global / num_replicas_in_sync` examples (`per_replica_batch_size` checks the division). Under
"multi-worker" every worker runs the same input pipeline and `tf.data` auto-sharding gives each
worker its part of each global batch; for in-memory data (`from_tensor_slices`) set
`options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA`
to say so (file-based datasets shard by file). Every worker must see the same number of
global batches per epoch. On TPUs batch with `drop_remainder=True` (static shapes).
"""

import glob
import json
import os
import shutil
import warnings
from pathlib import Path

import tensorflow as tf

STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker", "tpu")

# Non-chief workers write into run_dir/WORKER_TEMP/<task_type>-<task_index>/ (see worker_dir).
WORKER_TEMP = ".worker_temp"

# Device files of a TPU attached to this VM: /dev/accel* (TPU v2-v4), /dev/vfio/<n> (v5e and
# later). Seeing one is what lets "auto" try TPUClusterResolver(tpu="local") (no network).
_LOCAL_TPU_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")

_TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}\'')
_TF_CONFIG_HELP = (
    "Set TF_CONFIG on every worker before starting it, with the same cluster everywhere and "
    f"each worker's own task, e.g. {_TF_CONFIG_EXAMPLE} on host1 and the same with "
    '"index": 1 on host2 (an optional "chief" job of one address may replace worker 0). See '
    "https://www.tensorflow.org/guide/distributed_training"
    "#setting_up_the_tf_config_environment_variable")


def make_strategy(name="auto", *, tpu_address=None, cpu_devices=None):
    """Creates the `tf.distribute.Strategy` called `name` (one of `STRATEGIES`).

    Call it at the start of the program, before building models or datasets: "multi-worker"
    and `cpu_devices` configure TensorFlow's runtime, which is only possible before it starts.

    Args:
        name: "auto", "one-device", "mirrored", "multi-worker" or "tpu" (see the module doc).
        tpu_address: for "tpu"/"auto": the TPU name or grpc://host:port address (else
            `TPU_NAME`, else a TPU attached to this VM).
        cpu_devices: for "mirrored" only: split the CPU into this many logical devices and
            mirror over them (replicas on one CPU, for tests and demos without GPUs).

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: an unknown name, an option the strategy does not take, or a missing or
            malformed `TF_CONFIG` for "multi-worker".
        RuntimeError: TensorFlow was already initialised (cpu_devices, "multi-worker"), or
            "tpu" without any TPU to connect to.
    """
    import keras

    key = str(name).strip().lower().replace("_", "-")
    if key not in STRATEGIES:
        raise ValueError(f"Unknown distribution strategy {name!r}; choose one of "
                         f"{', '.join(STRATEGIES)}.")
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"tf.distribute strategies drive Keras' TensorFlow backend, but Keras runs on "
            f"{keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow before importing keras.")
    if cpu_devices is not None and key != "mirrored":
        raise ValueError(f"cpu_devices={cpu_devices} applies to the 'mirrored' strategy only, "
                         f"not {key!r}.")
    if tpu_address and key not in ("tpu", "auto"):
        raise ValueError(f"tpu_address applies to the 'tpu' and 'auto' strategies, not {key!r}.")

    if key == "auto":
        target = _tpu_target(tpu_address)
        if target == "local":
            # Guessed from device files alone (/dev/vfio/<n> can also be a GPU passed through
            # to a VM): if no TPU answers, say so and go on without one.
            try:
                return _tpu_strategy(target)
            except Exception as e:  # noqa: BLE001 - any failure means "no usable local TPU"
                warnings.warn(f"make_strategy('auto'): found {_local_tpu_devices()} but could "
                              f"not start a TPU on them ({type(e).__name__}: {e}); using "
                              "GPUs/CPU instead. Pass 'tpu' to make that an error.")
        elif target is not None:
            return _tpu_strategy(target)
        gpus = tf.config.list_physical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.get_strategy()
    if key == "one-device":
        device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if key == "mirrored":
        if cpu_devices is None:
            return tf.distribute.MirroredStrategy()
        devices = _split_cpu(cpu_devices)
        return tf.distribute.MirroredStrategy(devices=devices)
    if key == "multi-worker":
        check_tf_config()
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:
            raise RuntimeError(
                "make_strategy('multi-worker') must run before TensorFlow starts its runtime "
                "(before any TensorFlow op, model, dataset or device listing in this process): "
                f"MultiWorkerMirroredStrategy could not configure collective ops ({e}). Call "
                "it first thing in the program.") from e
        from keras_vit.keras_internals import fix_keras_20585

        fix_keras_20585()  # keras-team/keras#20585: fit fails under this strategy without it
        return strategy
    target = _tpu_target(tpu_address)
    if target is None:
        raise RuntimeError(
            "make_strategy('tpu') found no TPU: no tpu_address was given, TPU_NAME is not set "
            f"and this machine has no TPU device ({', '.join(_LOCAL_TPU_GLOBS)}). Pass the "
            "TPU's name or grpc://host:port address, or run on a TPU VM.")
    return _tpu_strategy(target)


def check_tf_config(environ=None):
    """Parses and checks `TF_CONFIG` for "multi-worker"; returns it as a dict.

    Raises:
        ValueError: TF_CONFIG is missing or malformed; the message says what to set.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "")
    if not raw.strip():
        raise ValueError(
            "The 'multi-worker' strategy (MultiWorkerMirroredStrategy) needs the TF_CONFIG "
            "environment variable, which tells each worker the cluster and its own place in "
            f"it, and TF_CONFIG is not set. {_TF_CONFIG_HELP}")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {raw!r}. {_TF_CONFIG_HELP}") from e

    def bad(what):
        return ValueError(f"TF_CONFIG {what}: {raw!r}. {_TF_CONFIG_HELP}")

    if not isinstance(config, dict):
        raise bad("must be a JSON object with 'cluster' and 'task'")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise bad("has no 'cluster' (a mapping of job name to a list of host:port addresses)")
    if "worker" not in cluster and "chief" not in cluster:
        raise bad("has no 'worker' (or 'chief') job in its 'cluster'")
    for job in cluster:
        if job not in ("chief", "worker"):
            raise bad(f"has a {job!r} job; MultiWorkerMirroredStrategy takes only 'chief' and "
                      "'worker' jobs ('ps' belongs to ParameterServerStrategy, which keras-vit "
                      "does not use)")
        addresses = cluster[job]
        if (not isinstance(addresses, list) or not addresses
                or not all(isinstance(a, str) and ":" in a for a in addresses)):
            raise bad(f"job {job!r} must be a non-empty list of 'host:port' strings")
    if len(cluster.get("chief", [])) > 1:
        raise bad("has more than one 'chief' address")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise bad("has no 'task' with this worker's 'type' and 'index'")
    if task["type"] not in cluster:
        raise bad(f"task type {task['type']!r} is not a job of the cluster")
    index = task["index"]
    if not isinstance(index, int) or isinstance(index, bool) or not (
            0 <= index < len(cluster[task["type"]])):
        raise bad(f"task index {index!r} is not in 0..{len(cluster[task['type']]) - 1} "
                  f"for job {task['type']!r}")
    return config


def is_chief(strategy=None):
    """Whether this process writes the final artefacts (model, config, summaries).

    True on every single-process strategy. Under MultiWorkerMirroredStrategy, the task of
    type "chief", or worker 0 when the cluster has no "chief" job. Every worker still takes
    part in training and in every save (saving may run collective ops); see `worker_dir`.
    """
    task = _cluster_task(strategy)
    if task is None:
        return True
    task_type, task_id, jobs = task
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in jobs


def worker_dir(run_dir, strategy=None):
    """The folder this worker writes its checkpoints, backups and saved files into.

    `run_dir` itself on the chief; on any other worker a folder of its own,
    `run_dir/.worker_temp/<task_type>-<index>`, created here. As the TensorFlow multi-worker
    guide recommends, every worker runs the same save calls (`model.save`, `save_weights`,
    `BackupAndRestore`, ...), since saving a distributed model may need all workers; only the
    chief's copy lands in the run folder, and workers never overwrite each other's files on a
    shared filesystem. A backup folder here survives a restart of its worker (the path is
    fixed, not random), so `keras.callbacks.BackupAndRestore(worker_dir(run_dir, s) / "backup")`
    restores every worker. Call `remove_worker_dir` once training and saving are done.
    """
    path = _worker_path(run_dir, strategy)
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_worker_dir(run_dir, strategy=None):
    """Deletes this worker's `worker_dir` on a non-chief worker; does nothing on the chief.

    Returns the folder removed, or None.
    """
    if is_chief(strategy):
        return None
    path = _worker_path(run_dir, strategy)
    shutil.rmtree(path, ignore_errors=True)
    try:  # the shared parent goes with its last worker; another may still be using it
        path.parent.rmdir()
    except OSError:
        pass
    return path


def values_across_workers(value, strategy=None):
    """This process's integer `value` and every other worker's, gathered with the strategy's
    collectives: `[value]` on single-process strategies, one entry per replica under
    MultiWorkerMirroredStrategy (every worker must call it at the same point, as with any
    collective)."""
    strategy = strategy or tf.distribute.get_strategy()
    if _cluster_task(strategy) is None:
        return [int(value)]
    per_replica = strategy.run(lambda: tf.constant([int(value)], tf.int64))
    return [int(v) for v in strategy.gather(per_replica, axis=0).numpy()]


def per_replica_batch_size(global_batch_size, strategy=None):
    """`global_batch_size / strategy.num_replicas_in_sync`, checked.

    Batch the dataset with the global size: each step of `model.fit` consumes one global
    batch and each replica computes on its share.

    Raises:
        ValueError: the global batch does not split evenly across the replicas.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = int(strategy.num_replicas_in_sync)
    global_batch_size = int(global_batch_size)
    if global_batch_size < 1 or global_batch_size % replicas:
        lower = max(global_batch_size // replicas, 1) * replicas
        raise ValueError(
            f"The global batch size {global_batch_size} does not split evenly across the "
            f"{replicas} replicas of {type(strategy).__name__}: each replica takes global / "
            f"{replicas} examples per step. Use a multiple of {replicas}, e.g. "
            f"{sorted({lower, lower + replicas})}.")
    return global_batch_size // replicas


def describe(strategy=None):
    """One line for logs: the strategy, its replicas, and this worker's role."""
    if hasattr(strategy, "describe"):  # JAX's keras.distribution (jax_distribution.py)
        return strategy.describe()
    strategy = strategy or tf.distribute.get_strategy()
    if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        # The default strategy (its class is private): say what it runs on.
        gpus = tf.config.list_logical_devices("GPU")
        return f"one device ({'GPU' if gpus else 'CPU'})"
    name = type(strategy).__name__
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"  # not its class name, CollectiveAllReduceStrategy
    text = f"{name} with {strategy.num_replicas_in_sync} replica(s)"
    task = _cluster_task(strategy)
    if task is not None:
        task_type, task_id, jobs = task
        workers = sum(len(v) for v in jobs.values())
        text += (f"; this is {task_type} {task_id} of {workers} workers"
                 f"{' (chief)' if is_chief(strategy) else ''}")
    return text


def _worker_path(run_dir, strategy):
    if is_chief(strategy):
        return Path(run_dir)
    task_type, task_id, _ = _cluster_task(strategy)
    return Path(run_dir) / WORKER_TEMP / f"{task_type}-{task_id}"


def _cluster_task(strategy):
    """(task_type, task_id, {job: addresses}) of a multi-worker strategy, else None."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or getattr(resolver, "task_type", None) is None:
        return None
    if isinstance(resolver, tf.distribute.cluster_resolver.TPUClusterResolver):
        return None  # one client drives the TPU; its cluster_spec() may call the Cloud TPU API
    jobs = resolver.cluster_spec().as_dict()
    if not jobs:
        return None
    return resolver.task_type, int(resolver.task_id), jobs


def _split_cpu(n):
    """Splits the physical CPU into `n` logical devices; returns their names."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"cpu_devices must be a positive integer, got {n!r}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if (current is None and n > 1) or (current is not None and len(current) != n):
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
        except RuntimeError as e:
            have = len(tf.config.list_logical_devices("CPU"))
            raise RuntimeError(
                f"make_strategy('mirrored', cpu_devices={n}) has to split the CPU into {n} "
                "logical devices before TensorFlow initialises its devices, and in this process "
                f"TensorFlow has already initialised them ({have} logical CPU device(s)): any "
                "TensorFlow op, model or dataset creation, or tf.config.list_logical_devices() "
                "does that. Call make_strategy first thing in the program, or run in a fresh "
                "process.") from e
    names = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(names) < n:
        raise RuntimeError(f"Asked for {n} logical CPU devices but TensorFlow has {names}.")
    return names[:n]


def _local_tpu_devices():
    return sorted(p for pattern in _LOCAL_TPU_GLOBS for p in glob.glob(pattern))


def _tpu_target(tpu_address=None, environ=None):
    """What to give TPUClusterResolver, judged without any network call; None: no TPU.

    An explicit address wins, then TPU_NAME, then "local" when this VM has a TPU device file.
    TPUClusterResolver() with none of these would query the GCE metadata server, which on a
    machine outside Google Cloud means network time-outs; "auto" must not do that.
    """
    environ = os.environ if environ is None else environ
    if tpu_address:
        return str(tpu_address)
    if environ.get("TPU_NAME"):
        return environ["TPU_NAME"]
    if _local_tpu_devices():
        return "local"
    return None


def _tpu_strategy(target):
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=target)
    if target != "local":  # a remote TPU (a TPU node): this process is its client
        tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
