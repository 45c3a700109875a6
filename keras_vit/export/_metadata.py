"""TFLite Metadata, as MediaPipe Tasks' `ImageClassifier` and the LiteRT support libraries read
it: the model's name, version and description; the image input (RGB, its normalisation); the
output (probabilities) with the class names as an associated labels file.

Written here with the `flatbuffers` package (TensorFlow's dependency) and LiteRT's own model
schema: the maintained writers either need a package keras-vit does not depend on
(`mediapipe`, an optional extra) or are unmaintained (`tflite-support`), and MediaPipe 1.2's
writer does not import at all (its wheel lacks `_pywrap_metadata_version`). The tables and
field slots are those of `metadata_schema.fbs` (TFLite Metadata schema 1.x, file identifier
"M001"); the labels file is a zip appended to the flatbuffer, as every reader expects.

Every `.tflite` file takes float32 pixels in [0, 255] (or uint8 for the full-integer one) and
normalises inside the graph, so its metadata says mean 0, std 1: a client feeds the pixels as
they are. (MediaPipe takes one mean and one std for all channels.)
"""

import io
import zipfile

import flatbuffers
import numpy as np

METADATA_NAME = "TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"
MIN_PARSER_VERSION = "1.0.0"
LABELS_FILE = "labels.txt"

# metadata_schema.fbs enums
_COLOR_SPACE_RGB = 1
_CONTENT_FEATURE, _CONTENT_IMAGE = 1, 2
_UNIT_NORMALIZATION = 1
_TENSOR_AXIS_LABELS = 2


def _floats(builder, values):
    builder.StartVector(4, len(values), 4)
    for value in reversed(values):
        builder.PrependFloat32(float(value))
    return builder.EndVector()


def _offsets(builder, offsets):
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def _table(builder, slots, fields):
    """A table of `slots` fields; `fields`: (slot, kind, value) with kind "offset", "int8" or
    "uint8" (every child object must be built before)."""
    builder.StartObject(slots)
    for slot, kind, value in fields:
        if kind == "offset":
            builder.PrependUOffsetTRelativeSlot(slot, value, 0)
        elif kind == "int8":
            builder.PrependInt8Slot(slot, value, 0)
        else:
            builder.PrependUint8Slot(slot, value, 0)
    return builder.EndObject()


def metadata_flatbuffer(*, name, description, version, author, num_classes):
    """The ModelMetadata flatbuffer of an image classifier with float [0, 255] or uint8 RGB
    input and `num_classes` probabilities whose names are in `LABELS_FILE`."""
    b = flatbuffers.Builder(1024)
    strings = {key: b.CreateString(value) for key, value in dict(
        name=name, description=description, version=version, author=author,
        input_name="image", input_description="RGB image at the model's size, pixels in "
        "[0, 255] (uint8 for the full-integer file); normalised inside the model",
        output_name="probability", output_description=f"Probabilities of the {num_classes} "
        "classes", labels=LABELS_FILE, labels_description="The class names, one a line, in "
        "output order", parser=MIN_PARSER_VERSION).items()}
    # Input: ImageProperties(RGB), NormalizationOptions(mean 0, std 1), Stats(0..255).
    image = _table(b, 2, [(0, "int8", _COLOR_SPACE_RGB)])                   # ImageProperties
    input_content = _table(b, 3, [(0, "uint8", _CONTENT_IMAGE), (1, "offset", image)])
    mean, std = _floats(b, [0.0]), _floats(b, [1.0])
    normalization = _table(b, 2, [(0, "offset", mean), (1, "offset", std)])
    unit = _table(b, 2, [(0, "uint8", _UNIT_NORMALIZATION), (1, "offset", normalization)])
    units = _offsets(b, [unit])
    high, low = _floats(b, [255.0]), _floats(b, [0.0])
    input_stats = _table(b, 2, [(0, "offset", high), (1, "offset", low)])   # Stats(max, min)
    tensor_in = _table(b, 7, [(0, "offset", strings["input_name"]),
                              (1, "offset", strings["input_description"]),
                              (3, "offset", input_content), (4, "offset", units),
                              (5, "offset", input_stats)])
    # Output: FeatureProperties, Stats(0..1), the labels file.
    feature = _table(b, 0, [])
    output_content = _table(b, 3, [(0, "uint8", _CONTENT_FEATURE), (1, "offset", feature)])
    high, low = _floats(b, [1.0]), _floats(b, [0.0])
    output_stats = _table(b, 2, [(0, "offset", high), (1, "offset", low)])
    labels = _table(b, 5, [(0, "offset", strings["labels"]),
                           (1, "offset", strings["labels_description"]),
                           (2, "int8", _TENSOR_AXIS_LABELS)])                 # AssociatedFile
    files = _offsets(b, [labels])
    tensor_out = _table(b, 7, [(0, "offset", strings["output_name"]),
                               (1, "offset", strings["output_description"]),
                               (3, "offset", output_content), (5, "offset", output_stats),
                               (6, "offset", files)])
    inputs, outputs = _offsets(b, [tensor_in]), _offsets(b, [tensor_out])
    subgraph = _table(b, 10, [(0, "offset", strings["name"]), (2, "offset", inputs),
                              (3, "offset", outputs)])
    subgraphs = _offsets(b, [subgraph])
    model = _table(b, 8, [(0, "offset", strings["name"]), (1, "offset", strings["description"]),
                          (2, "offset", strings["version"]), (3, "offset", subgraphs),
                          (4, "offset", strings["author"]), (7, "offset", strings["parser"])])
    b.Finish(model, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def add_metadata(model_content, class_names, *, name, description, version,
                 author="keras-vit"):
    """`model_content` (a .tflite flatbuffer without metadata) with the metadata above and
    the class names appended as `LABELS_FILE`. The graph and its numbers are unchanged."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = [str(c) for c in class_names]
    bad = [c for c in names if "\n" in c or "\r" in c]
    if bad or not names:
        raise ValueError(f"class names must be one line each and at least one, got {bad or names}")
    if labels_in(model_content) is not None:
        raise ValueError("this TFLite file already has metadata; add it to the converter's "
                         "output once")
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_content))
    data = metadata_flatbuffer(name=name, description=description, version=str(version),
                               author=author, num_classes=len(names))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = list(model.metadata or []) + [entry]
    packed = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr(LABELS_FILE, "\n".join(names))
    return packed + archive.getvalue()


def labels_in(model_content):
    """The class names a .tflite file carries in its metadata's labels file, or None (a file
    without metadata, e.g. one exported by keras-vit 0.1)."""
    data = io.BytesIO(bytes(model_content))
    if not zipfile.is_zipfile(data):
        return None
    with zipfile.ZipFile(data) as archive:
        if LABELS_FILE not in archive.namelist():
            return None
        return archive.read(LABELS_FILE).decode("utf-8").split("\n")


def metadata_of(model_content):
    """{"name", "description", "version", "author"} from a .tflite file's metadata, or None."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(bytes(model_content), 0)
    for i in range(model.MetadataLength()):
        if model.Metadata(i).Name() == METADATA_NAME.encode():
            buffer = model.Buffers(model.Metadata(i).Buffer()).DataAsNumpy().tobytes()
            root = flatbuffers.table.Table(buffer, flatbuffers.encode.Get(
                flatbuffers.packer.uoffset, buffer, 0))

            def string(slot):
                offset = root.Offset(4 + 2 * slot)
                return root.String(offset + root.Pos).decode() if offset else None

            return {"name": string(0), "description": string(1), "version": string(2),
                    "author": string(4)}
    return None
