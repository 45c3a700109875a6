"""curves.png of a run: loss, accuracy (best validation epoch, test accuracy) and learning rate."""

import csv
import math


def label_smoothing_floor(label_smoothing, num_classes):
    """The smallest cross-entropy a model can reach against labels smoothed by
    `label_smoothing` over `num_classes` classes (the entropy of the smoothed label): the
    training loss levels off there, not at 0 (0.50 for 0.1 over 10 classes)."""
    if not label_smoothing or not num_classes or num_classes < 2:
        return 0.0
    other = label_smoothing / num_classes
    true = 1.0 - label_smoothing + other
    return -(true * math.log(true) + (num_classes - 1) * other * math.log(other))


def save_curves(history_csv, path, *, test_accuracy=None, schedule=None, steps_per_epoch=None,
                label_smoothing=0.0, num_classes=None):
    """Writes a PNG of a run's curves from its history.csv.

    Args:
        history_csv: the CSVLogger file (epoch, loss, accuracy, val_loss, val_accuracy).
        path: the PNG to write.
        test_accuracy: drawn as a line on the accuracy panel.
        schedule: the learning-rate schedule (callable on the step), drawn on its own panel
            over the whole run (`steps_per_epoch` puts it on the epoch axis).
        label_smoothing, num_classes: mark the loss floor that label smoothing sets.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    epochs = [int(r["epoch"]) + 1 for r in rows]

    def series(key):
        return [(e, float(r[key])) for e, r in zip(epochs, rows)
                if r.get(key) not in (None, "", "NA") and math.isfinite(float(r[key]))]

    panels = 3 if schedule is not None and steps_per_epoch else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    loss_ax, accuracy_ax = axes[0], axes[1]
    for ax, metric in ((loss_ax, "loss"), (accuracy_ax, "accuracy")):
        for prefix, style, label in (("", "-", "train"), ("val_", "--", "validation")):
            points = series(prefix + metric)
            if points:
                ax.plot(*zip(*points), style, label=f"{label} {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    floor = label_smoothing_floor(label_smoothing, num_classes)
    if floor:
        loss_ax.axhline(floor, color="grey", linestyle=":", linewidth=1,
                        label=f"floor of label smoothing {label_smoothing:g}: {floor:.2f}")
    validation = series("val_accuracy")
    if validation:
        best_epoch, best = max(validation, key=lambda p: p[1])
        accuracy_ax.plot([best_epoch], [best], "o", color="tab:orange",
                         label=f"best validation: {best:.4f} (epoch {best_epoch})")
    if test_accuracy is not None:
        accuracy_ax.axhline(test_accuracy, color="tab:green", linestyle=":",
                            label=f"test accuracy: {test_accuracy:.4f}")
    loss_ax.legend(fontsize=8)
    accuracy_ax.legend(fontsize=8, loc="lower right")
    if panels == 3:
        import numpy as np

        total = max(epochs) * steps_per_epoch
        steps = np.unique(np.linspace(0, total - 1, min(total, 400)).astype(int))
        rates = [float(schedule(int(step))) for step in steps]
        axes[2].plot(steps / steps_per_epoch, rates, color="tab:purple")
        axes[2].set_xlabel("epoch")
        axes[2].set_title("learning rate")
        axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        axes[2].grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
