"""The export report: one row per exported file, with what its verification measured."""

import dataclasses
import json
from pathlib import Path

from keras_vit.errors import ExportVerificationError  # noqa: F401  (re-exported)


@dataclasses.dataclass
class FormatResult:
    """What was measured for one exported file against the Keras model on held-out images.

    max_abs_diff: largest |probability - Keras probability| over the held-out images.
    agreement: fraction of held-out images whose top-1 class equals the Keras model's.
    accuracy: top-1 accuracy on the held-out images' labels.
    latency_ms: median wall time of one batch-1 call on this machine's CPU.
    tolerance: the max_abs_diff the export fails above (None: reported only).
    error: a failed check other than the tolerance (empty when none).
    """

    format: str
    path: str
    size_bytes: int
    max_abs_diff: float | None = None
    agreement: float | None = None
    accuracy: float | None = None
    latency_ms: float | None = None
    tolerance: float | None = None
    # An on-device client's check (TFLite files: MediaPipe Tasks' ImageClassifier): its name
    # ("skipped" where it is not installed) and its top-1 agreement with Keras.
    client: str | None = None
    client_agreement: float | None = None
    notes: str = ""
    error: str = ""

    @property
    def passed(self):
        return not self.error and (self.tolerance is None or self.max_abs_diff is None
                                   or self.max_abs_diff <= self.tolerance)


@dataclasses.dataclass
class ExportReport:
    name: str
    out_dir: str
    version: int | None
    saved_model_dir: str | None
    class_names: list
    image_size: tuple
    num_test_images: int
    verified: bool
    checked_on: str = "held-out images"  # or "images made here" (none were given)
    # What the export chose or noticed (made-up check images, a skipped int8 file, outputs
    # that barely vary): the table's notes, and report.json's.
    notes: list = dataclasses.field(default_factory=list)
    results: list = dataclasses.field(default_factory=list)

    def result(self, format_name):
        """The FormatResult of one format ("keras", "savedmodel", "tflite_float32", ...)."""
        for r in self.results:
            if r.format == format_name:
                return r
        raise KeyError(f"no {format_name!r} in this report; it has "
                       f"{[r.format for r in self.results]}")

    @property
    def failures(self):
        return [r for r in self.results if not r.passed]

    def to_dict(self):
        return dataclasses.asdict(self)

    def write_json(self, path):
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read_json(cls, path):
        """The report an export wrote (its report.json)."""
        fields = json.loads(Path(path).read_text())
        results = [FormatResult(**r) for r in fields.pop("results", [])]
        fields["image_size"] = tuple(fields["image_size"])
        return cls(**fields, results=results)


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0


def _short(path, out_dir):
    """A path inside the export folder relative to it ("1/", "digits_int8.tflite")."""
    try:
        rel = Path(path).resolve().relative_to(Path(out_dir).resolve())
    except ValueError:
        return str(path)
    return f"{rel}/" if Path(path).is_dir() else str(rel)


def _or_dash(value, fmt):
    return "-" if value is None else format(value, fmt)


def _client(result):
    if result.client is None:
        return "-"
    if result.client_agreement is None:
        return result.client if result.client == "skipped" else f"{result.client}: FAIL"
    return f"{result.client} {100 * result.client_agreement:.1f}%"


def format_report(report):
    """The report as a text table: size, max |Δp|, top-1 agreement, accuracy, latency."""
    headers = ("format", "file", "size", "max|dp| vs Keras", "top-1 agree", "accuracy",
               "latency b=1", "client top-1")
    rows = []
    for r in report.results:
        diff = _or_dash(r.max_abs_diff, ".2e")
        if r.tolerance is not None and r.max_abs_diff is not None:
            diff += f" (<= {r.tolerance:.0e} {'ok' if r.passed else 'FAIL'})"
        elif r.error:
            diff += " (FAIL)"
        rows.append((r.format, _short(r.path, report.out_dir), _size(r.size_bytes), diff,
                     "-" if r.agreement is None else f"{100 * r.agreement:.1f}%",
                     "-" if r.accuracy is None else f"{100 * r.accuracy:.1f}%",
                     "-" if r.latency_ms is None else f"{r.latency_ms:.2f} ms",
                     _client(r)))
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = "  ".join("{:<%d}" % w for w in widths)
    out = [f"Export {report.name!r} -> {report.out_dir}  "
           f"({len(report.class_names)} classes, image size "
           f"{report.image_size[0]}x{report.image_size[1]}, "
           + (f"verified on {report.num_test_images} {report.checked_on})" if report.verified
              else "NOT verified)"),
           line.format(*headers), line.format(*("-" * w for w in widths))]
    out += [line.format(*row) for row in rows]
    notes = [f"  {note}" for note in report.notes]
    notes += [f"  {r.format}: " + "; ".join(x for x in (f"FAILED: {r.error}" if r.error else "",
                                                       r.notes) if x)
              for r in report.results if r.notes or r.error]
    if notes:
        out += ["notes:"] + notes
    return "\n".join(out)


