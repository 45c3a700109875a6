"""ONNX as an extra format: `keras.Model.export(format="onnx")` (tf2onnx), run with onnxruntime.

Needs the `onnx` extra: `pip install -e .[onnx]` (tf2onnx, onnx, onnxruntime).
The file takes `images`: float32 pixels [batch, H, W, 3] in [0, 255] at the model size,
and returns `probabilities`.
"""

import contextlib
import os
import warnings

import numpy as np

MISSING = ("ONNX export needs tf2onnx, onnx and onnxruntime: pip install -e '.[onnx]' "
           "(or pip install tf2onnx onnx onnxruntime)")


@contextlib.contextmanager
def _environment_kept():
    """tf2onnx sets TF_CPP_MIN_LOG_LEVEL to 3 when imported (tf2onnx.convert): put the
    caller's back, so that exporting ONNX leaves the process's environment as it was (every
    TensorFlow process it starts later inherits it)."""
    before = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = before


def require_onnx():
    try:
        with _environment_kept():
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import tf2onnx  # noqa: F401
            import tf2onnx.convert  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{MISSING}; {e}") from e


def export_onnx(infer, path):
    """Writes `infer` (an InferenceModel) to `path` as ONNX with named input/output."""
    import keras
    import onnx

    require_onnx()
    spec = keras.InputSpec(shape=(None, *infer.image_size, 3), dtype="float32", name="images")
    with warnings.catch_warnings(), _environment_kept():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        infer.export(str(path), format="onnx", input_signature=[spec], verbose=False)
    # tf2onnx names the output after the graph tensor ("Identity:0"); give it a real name.
    model = onnx.load(str(path))
    old = model.graph.output[0].name
    if old != "probabilities":
        for node in model.graph.node:
            node.output[:] = ["probabilities" if o == old else o for o in node.output]
        model.graph.output[0].name = "probabilities"
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return path


def op_types(path):
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


class OnnxModel:
    """An .onnx classifier run with onnxruntime: pixels in [0, 255] -> probabilities."""

    def __init__(self, path, num_threads=None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or min(4, os.cpu_count() or 1)
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.image_size = tuple(int(s) for s in self.input.shape[1:3])

    def __call__(self, pixels, batch_size=64):
        pixels = np.asarray(pixels, dtype=np.float32)
        return np.concatenate([
            self.session.run(["probabilities"], {self.input.name: pixels[i:i + batch_size]})[0]
            for i in range(0, len(pixels), batch_size)])
