"""TFLite files through the converter, run with the LiteRT runtime (ai-edge-litert).

Every file takes RGB pixels `[batch, H, W, 3]` at the model size, batch size free, and
returns `probabilities`. float32 / float16 / dynamic_int8 take float32 pixels in [0, 255];
the full-integer int8 file takes uint8 pixels and returns uint8 probabilities, with the
(scale, zero point) of each in the file (`LiteRTModel` applies them).
"""

import contextlib
import os
import time
import warnings

import numpy as np

VARIANTS = ("float32", "float16", "dynamic_int8", "int8")


def tflite_filename(name, variant):
    return f"{name}_{variant}.tflite"


def convert(saved_model_dir, variant, calibration_images=None):
    """Converts the fixed-size SavedModel to one TFLite variant; returns the flatbuffer bytes.

    Only TFLite builtin ops are allowed (no SELECT_TF_OPS / Flex), so the file runs on the
    plain LiteRT runtime of a phone.
    """
    import tensorflow as tf

    if variant not in VARIANTS:
        raise ValueError(f"TFLite variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "int8":
        require_calibration(calibration_images)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "int8":
        # One image spanning 0..255 among the calibration images: the uint8 input's
        # quantization is then (scale 1, zero point 0), raw pixels, which MediaPipe (it feeds
        # raw pixels whatever the file says) and any plain client need.
        images = [full_range_image(np.asarray(calibration_images).shape[1:3]),
                  *np.asarray(calibration_images)]

        def representative_dataset():
            for image in images:
                yield {"images": image[None].astype(np.float32)}

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    with warnings.catch_warnings():
        # The converter's own calibrator uses tf.lite.Interpreter and warns about it.
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
        return converter.convert()


def full_range_image(size):
    """A uint8 RGB gradient from 0 to 255 at `size` (height, width)."""
    height, width = size
    ramp = np.round(np.linspace(0, 255, height * width)).reshape(height, width)
    return np.repeat(ramp[..., None], 3, axis=-1).astype(np.uint8)


def client_contract_problems(model_content):
    """What keeps a .tflite file from running in MediaPipe Tasks' ImageClassifier or a plain
    LiteRT client (empty when nothing): one subgraph; one RGB image input (batch 1, any batch
    in its signature), float32 or uint8 (then as raw pixels: scale 1, zero point 0); one
    output of float32 or uint8 class scores."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(bytes(model_content), 0)
    if model.SubgraphsLength() != 1:
        return [f"{model.SubgraphsLength()} subgraphs (clients run one)"]
    graph = model.Subgraphs(0)
    problems = []
    if graph.InputsLength() != 1 or graph.OutputsLength() != 1:
        return [f"{graph.InputsLength()} inputs and {graph.OutputsLength()} outputs (one each "
                "wanted)"]
    types = {schema.TensorType.FLOAT32: "float32", schema.TensorType.UINT8: "uint8"}
    image, scores = graph.Tensors(graph.Inputs(0)), graph.Tensors(graph.Outputs(0))
    shape = image.ShapeAsNumpy().tolist()
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
        problems.append(f"input shape {shape}, not [1, height, width, 3]")
    for what, tensor in (("input", image), ("output", scores)):
        if tensor.Type() not in types:
            problems.append(f"{what} type {tensor.Type()}, not float32 or uint8")
    if image.Type() == schema.TensorType.UINT8:
        quantization = image.Quantization()
        scale = quantization.ScaleAsNumpy().tolist() if quantization else []
        zero = quantization.ZeroPointAsNumpy().tolist() if quantization else []
        if scale and (abs(scale[0] - 1.0) > 1e-6 or zero[0] != 0):
            problems.append(f"uint8 input quantized with scale {scale[0]:g}, zero point "
                            f"{zero[0]}: clients feed raw pixels (scale 1, zero point 0)")
    if len(scores.ShapeAsNumpy().tolist()) != 2:
        problems.append(f"output shape {scores.ShapeAsNumpy().tolist()}, not [1, classes]")
    return problems


def require_calibration(calibration_images):
    if calibration_images is None or len(calibration_images) == 0:
        raise ValueError(
            "Full-integer int8 needs calibration images drawn from the training data "
            "(samples.npz: calibration_images); none were found. Drop the int8 variant "
            "(--tflite-variants float32 float16 dynamic_int8) or re-run training.")


def op_names(model_content):
    """The operator names a TFLite flatbuffer uses, e.g. {"FULLY_CONNECTED", "GELU"};
    custom ops (Flex ops included) appear as "CUSTOM:<name>"."""
    from ai_edge_litert import schema_py_generated as schema

    code_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(model_content, 0)
    names = set()
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = code_names.get(builtin, str(builtin))
        if name == "CUSTOM" or code.CustomCode():
            custom = code.CustomCode()
            name = "CUSTOM:" + (custom.decode() if custom else "?")
        names.add(name)
    return names


def gelu_forms(model_content):
    """{"tanh"} / {"erf"}: the forms of the GELU ops in a TFLite flatbuffer (its
    `approximate` option), so a test can tell the exact form survived conversion."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(model_content, 0)
    gelu_codes = set()
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) == schema.BuiltinOperator.GELU:
            gelu_codes.add(i)
    forms = set()
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for j in range(graph.OperatorsLength()):
            op = graph.Operators(j)
            if op.OpcodeIndex() in gelu_codes:
                table = op.BuiltinOptions()
                options = schema.GeluOptions()
                options.Init(table.Bytes, table.Pos)
                forms.add("tanh" if options.Approximate() else "erf")
    return forms


def check_builtin_only(model_content, label):
    bad = sorted(n for n in op_names(model_content) if n.startswith("CUSTOM") or "Flex" in n)
    if bad:
        raise RuntimeError(f"{label} uses non-builtin ops {bad}; it would need the Flex "
                           "(SELECT_TF_OPS) delegate, which the LiteRT runtime on devices lacks.")


class LiteRTModel:
    """A .tflite classifier run with ai_edge_litert: pixels in [0, 255] -> probabilities."""

    def __init__(self, path=None, model_content=None, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        threads = num_threads or min(4, os.cpu_count() or 1)
        if path is not None:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        else:
            self.interpreter = Interpreter(model_content=model_content, num_threads=threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.image_size = tuple(int(s) for s in self.input["shape_signature"][1:3])
        self._batch = None

    @property
    def input_dtype(self):
        return np.dtype(self.input["dtype"])

    def _set_batch(self, n):
        if self._batch != n:
            shape = [n, *self.image_size, 3]
            self.interpreter.resize_tensor_input(self.input["index"], shape, strict=True)
            self.interpreter.allocate_tensors()
            self._batch = n

    def quantize_input(self, pixels):
        pixels = np.asarray(pixels)
        if self.input_dtype == np.float32:
            return pixels.astype(np.float32)
        scale, zero_point = self.input["quantization"]
        info = np.iinfo(self.input_dtype)
        if pixels.dtype == self.input_dtype and (scale, zero_point) == (1.0, 0):
            return pixels
        q = np.round(pixels.astype(np.float32) / scale + zero_point)
        return np.clip(q, info.min, info.max).astype(self.input_dtype)

    def _invoke(self, pixels):
        self._set_batch(len(pixels))
        self.interpreter.set_tensor(self.input["index"], self.quantize_input(pixels))
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"])
        if np.dtype(self.output["dtype"]) != np.float32:
            scale, zero_point = self.output["quantization"]
            out = (out.astype(np.float32) - zero_point) * scale
        return out

    def __call__(self, pixels, batch_size=64):
        pixels = np.asarray(pixels)
        if tuple(pixels.shape[1:3]) != self.image_size:
            raise ValueError(f"expected images of size {self.image_size}, got "
                             f"{tuple(pixels.shape[1:3])}; resize first")
        return np.concatenate([self._invoke(pixels[i:i + batch_size])
                               for i in range(0, len(pixels), batch_size)])

    def latency_ms(self, one_image, repeats=20):
        return median_ms(lambda: self._invoke(one_image), repeats)


def median_ms(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


@contextlib.contextmanager
def quiet_stderr():
    """Silences C++ chatter (converter, XNNPACK) written straight to file descriptor 2."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
