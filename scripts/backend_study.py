#!/usr/bin/env python3
"""The main command on TensorFlow and on JAX, side by side: prints the table of
docs/training.md (*On JAX*): test accuracy and wall time per seed of `keras-vit train` (the
embedded digits default, 50 epochs) on each backend, each a fresh process, alternating, so both
see the same machine load.

    python scripts/backend_study.py                     # seeds 0-2 (~25 min on 2 cores)
    python scripts/backend_study.py --seeds 0 1 2 3 4

Runs go to runs/backend_study/BACKEND-seedN; a finished run is read back, not trained again.
"""

import argparse
import statistics
from pathlib import Path

from _study_runs import train_once

BACKENDS = ("tensorflow", "jax")


def run(backend, seed, root):
    return train_once(root / f"{backend}-seed{seed}",
                      ["--seed", str(seed), "--no-export", "--verbose", "0"],
                      env={"KERAS_BACKEND": backend})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/backend_study")
    args = parser.parse_args()
    root = Path(args.out)
    found = {backend: [] for backend in BACKENDS}
    for seed in args.seeds:
        for backend in BACKENDS:
            config = run(backend, seed, root)
            accuracy = 100 * config["result"]["test_accuracy"]
            found[backend].append((seed, accuracy, config["study_seconds"]))
            print(f"{backend} seed {seed}: {accuracy:.1f}% in {config['study_seconds']} s",
                  flush=True)
    print("\n| seed | TensorFlow: test accuracy | time | JAX: test accuracy | time |")
    print("|---|---|---|---|---|")
    for (seed, tf_acc, tf_s), (_, jax_acc, jax_s) in zip(found["tensorflow"], found["jax"]):
        print(f"| {seed} | {tf_acc:.1f}% | {tf_s:.0f} s | {jax_acc:.1f}% | {jax_s:.0f} s |")
    tf_rows, jax_rows = found["tensorflow"], found["jax"]
    print(f"| mean | {statistics.mean(r[1] for r in tf_rows):.2f}% | "
          f"{statistics.median(r[2] for r in tf_rows):.0f} s (median) | "
          f"{statistics.mean(r[1] for r in jax_rows):.2f}% | "
          f"{statistics.median(r[2] for r in jax_rows):.0f} s (median) |")


if __name__ == "__main__":
    main()
