#!/usr/bin/env python3
"""Does DeiT's distillation help a small ViT on the embedded digits? Prints the table of
docs/training.md (DeiT): test accuracy over seeds, plain ViT against the same student with a
distillation token trained against a CNN teacher (hard distillation), on all the training
images and on a quarter of them, at the main command's budget (50 epochs, batch 64, its
recipe and augmentation).

    python scripts/distillation_study.py                    # seeds 0-9, both shares (~2 h on 2 cores)
    python scripts/distillation_study.py --seeds 0 1 --fractions 0.25

Every run is a fresh `keras-vit train` process writing runs/distillation_study/...; finished
runs are read back, not trained again, so a killed study resumes.
"""

import argparse
import json
import os
import statistics
from pathlib import Path

from _study_runs import train_once

STUDENT = ["--image-size", "16", "--depth", "6", "--gelu", "erf", "--normalization", "imagenet"]
ARMS = {
    "vit": ["--variant", "Ti/4", *STUDENT],
    "deit": ["--variant", "DeiT-Ti/4", *STUDENT, "--teacher", "resnet", "--distillation", "hard"],
}


def run(arm, fraction, seed, root):
    return train_once(root / f"{arm}-{fraction:g}-seed{seed}",
                      ["--data", "digits", *ARMS[arm], "--train-fraction", str(fraction),
                       "--seed", str(seed), "--no-export", "--verbose", "0"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--out", default="runs/distillation_study")
    args = parser.parse_args()
    root = Path(args.out)
    rows = []
    for fraction in args.fractions:
        found = {arm: [] for arm in ARMS}
        teacher = []
        for seed in args.seeds:
            for arm in ARMS:
                config = run(arm, fraction, seed, root)
                found[arm].append(100 * config["result"]["test_accuracy"])
                print(f"{arm} fraction {fraction:g} seed {seed}: "
                      f"{found[arm][-1]:.1f}% ({config.get('study_seconds', '?')} s)", flush=True)
                if arm == "deit" and "teacher_test_accuracy" in config:
                    teacher.append(100 * config["teacher_test_accuracy"])
        for arm, label in (("vit", "ViT-Ti/4"), ("deit", "DeiT-Ti/4, hard distillation")):
            values = found[arm]
            rows.append((f"{fraction:.0%}", label, values))
        rows.append((f"{fraction:.0%}", "teacher: ResNet-14 (CNN)", teacher))
    print("\n| training images | model | test accuracy, seeds "
          f"{args.seeds[0]}-{args.seeds[-1]} | mean | min |")
    print("|---|---|---|---|---|")
    for share, label, values in rows:
        listed = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {share} | {label} | {listed} | {statistics.mean(values):.2f} | "
              f"{min(values):.1f} |")
    os.makedirs(root, exist_ok=True)
    (root / "table.json").write_text(json.dumps(
        [{"share": s, "model": m, "accuracy": v} for s, m, v in rows], indent=2))


if __name__ == "__main__":
    main()
