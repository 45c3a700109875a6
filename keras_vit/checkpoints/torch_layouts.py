"""Readers for PyTorch ViT weights: Hugging Face `ViTModel` / `ViTForImageClassification`
(and the older ViT-hybrid layout) and timm `vit_*` models, from `.safetensors`
(read here, without torch) or `.bin` / `.pt` / `.pth` state dicts (needs torch).

Layouts are turned into the canonical Flax/Keras one: linear weights `(out, in)`
are transposed to kernels `(in, out)`, convolutions `(out, in, kh, kw)` to
`(kh, kw, in, out)`, timm's fused `qkv` is split, and attention projections
stay `(D, heads * head_dim)` until the loader splits the heads axis to the
model's `(D, heads, head_dim)`. Both Hugging Face key generations are read:
transformers 4 (`encoder.layer.{i}.attention.attention.query`, on the Hub) and
transformers 5 (`layers.{i}.attention.q_proj`).
"""

import json
import os
import re
import struct

import numpy as np

from keras_vit.checkpoints.core import POSEMB, Checkpoint, CheckpointError, Entry
from keras_vit.checkpoints.resample import square_grid

TORCH_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def load_safetensors(path):
    """Reads a `.safetensors` file into NumPy arrays (BF16 and F16 become float32)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short).")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path} is not a safetensors file, or is truncated "
                                  f"(header of {header_len} bytes in a {size}-byte file).")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as err:
            raise CheckpointError(f"{path}: unreadable safetensors header: {err}") from err
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        shape, dtype = tuple(info["shape"]), info["dtype"]
        count = int(np.prod(shape, dtype=np.int64))
        if end > data.shape[0]:
            raise CheckpointError(f"{path} is truncated: {name!r} ends at byte {end} of a "
                                  f"{data.shape[0]}-byte data section.")
        buf = data[start:end]
        if dtype == "BF16":
            array = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _SAFETENSORS_DTYPES:
            array = np.frombuffer(buf, _SAFETENSORS_DTYPES[dtype])
        else:
            raise CheckpointError(f"{path}: {name!r} has unsupported dtype {dtype}.")
        if array.size != count:
            raise CheckpointError(f"{path}: {name!r} holds {array.size} values, its shape "
                                  f"{shape} needs {count}.")
        array = array.reshape(shape)
        arrays[name] = array.astype(np.float32) if array.dtype.kind == "f" else array.copy()
    return arrays


def load_torch_state_dict(path):
    """Reads a PyTorch state dict (`torch.load(weights_only=True)`) into NumPy arrays."""
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(
            f"Reading {path} needs PyTorch (pip install torch), or convert it to .safetensors, "
            "which keras-vit reads without torch.") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds; say which file
        raise CheckpointError(f"{path} is not a readable PyTorch state dict: {err}") from err
    for wrapper in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict.")
    arrays = {}
    for key, value in state.items():
        if torch.is_tensor(value):
            value = value.detach().cpu()
            arrays[key] = (value.float() if value.is_floating_point() else value).numpy()
    return arrays


def read_torch_weights(path):
    """Reads Hugging Face or timm ViT weights into a `Checkpoint`."""
    path = str(path)
    if path.endswith(".safetensors"):
        arrays = load_safetensors(path)
    else:
        arrays = load_torch_state_dict(path)
    for prefix in ("module.", "model."):
        if arrays and all(k.startswith(prefix) for k in arrays):
            arrays = {k[len(prefix):]: v for k, v in arrays.items()}
    if any("embeddings.patch_embeddings." in k for k in arrays):
        return _from_hf(arrays, path)
    if any(k.startswith("patch_embed.") for k in arrays):
        return _from_timm(arrays, path)
    sample = ", ".join(sorted(arrays)[:8])
    raise CheckpointError(f"{path} is neither a Hugging Face ViT / DeiT nor a timm vit_* / "
                          f"deit_* state dict (keys: {sample}, ...).")


# ---------------------------------------------------------------------------
# Array conversions.

def _linear(w):
    return np.ascontiguousarray(w.T)


def _conv(w):
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def _same(w):
    return w


class _Builder:
    def __init__(self):
        self.params, self.names = {}, {}

    def add(self, canonical, source, array, convert=_same, flexible=False):
        self.params[canonical] = Entry(np.asarray(convert(array), np.float32), source,
                                       tuple(array.shape), flexible)

    def extra(self, source, array):
        self.params["?" + source] = Entry(np.asarray(array), source, tuple(array.shape))


def _hybrid_name(key, root_conv, root_norm, unit):
    """Canonical name of a BiT backbone key, given the layout's regexes for the root
    convolution, the root norm (capturing weight|bias) and a unit's prefix (capturing the
    stage and unit indices); None for other keys."""
    if re.fullmatch(root_conv, key):
        return "conv_root/kernel", _conv
    m = re.fullmatch(root_norm, key)
    if m:
        return f"gn_root/{'scale' if m[1] == 'weight' else 'bias'}", _same
    m = re.fullmatch(unit + r"\.(conv[123]|norm[123]|downsample\.conv|downsample\.norm)"
                     r"\.(weight|bias)", key)
    if m:
        name = f"block{int(m[1]) + 1}/unit{int(m[2]) + 1}"
        return _resnet_name(name, m[3].replace("downsample.", "down_"), m[4])
    return None


def _hf_hybrid(rest):
    """Canonical name of a Hugging Face BiT backbone key (ViT-hybrid layout), or None."""
    return _hybrid_name(rest, r"embedder\.convolution\.weight", r"embedder\.norm\.(weight|bias)",
                        r"encoder\.stages\.(\d+)\.layers\.(\d+)")


def _resnet_name(unit, part, param):
    """block/unit + conv1|norm1|down_conv|down_norm + weight|bias -> canonical."""
    if part.startswith("conv"):
        return f"{unit}/{part}/kernel", _conv
    if part == "down_conv":
        return f"{unit}/conv_proj/kernel", _conv
    norm = "gn_proj" if part == "down_norm" else "gn" + part[-1]
    return f"{unit}/{norm}/{'scale' if param == 'weight' else 'bias'}", _same


def _hf_to_v5(key):
    """transformers-4 ViT names (as on the Hub) -> transformers-5 names."""
    key = re.sub(r"^encoder\.layer\.", "layers.", key)
    key = key.replace(".attention.attention.query.", ".attention.q_proj.")
    key = key.replace(".attention.attention.key.", ".attention.k_proj.")
    key = key.replace(".attention.attention.value.", ".attention.v_proj.")
    key = key.replace(".attention.output.dense.", ".attention.o_proj.")
    key = key.replace(".intermediate.dense.", ".mlp.fc1.")
    key = key.replace(".output.dense.", ".mlp.fc2.")
    return key


_HF_BLOCK = {
    "layernorm_before.weight": ("LayerNorm_0/scale", _same, False),
    "layernorm_before.bias": ("LayerNorm_0/bias", _same, False),
    "layernorm_after.weight": ("LayerNorm_2/scale", _same, False),
    "layernorm_after.bias": ("LayerNorm_2/bias", _same, False),
    "attention.q_proj.weight": ("MultiHeadDotProductAttention_1/query/kernel", _linear, True),
    "attention.q_proj.bias": ("MultiHeadDotProductAttention_1/query/bias", _same, True),
    "attention.k_proj.weight": ("MultiHeadDotProductAttention_1/key/kernel", _linear, True),
    "attention.k_proj.bias": ("MultiHeadDotProductAttention_1/key/bias", _same, True),
    "attention.v_proj.weight": ("MultiHeadDotProductAttention_1/value/kernel", _linear, True),
    "attention.v_proj.bias": ("MultiHeadDotProductAttention_1/value/bias", _same, True),
    "attention.o_proj.weight": ("MultiHeadDotProductAttention_1/out/kernel", _linear, True),
    "attention.o_proj.bias": ("MultiHeadDotProductAttention_1/out/bias", _same, False),
    "mlp.fc1.weight": ("MlpBlock_3/Dense_0/kernel", _linear, False),
    "mlp.fc1.bias": ("MlpBlock_3/Dense_0/bias", _same, False),
    "mlp.fc2.weight": ("MlpBlock_3/Dense_1/kernel", _linear, False),
    "mlp.fc2.bias": ("MlpBlock_3/Dense_1/bias", _same, False),
}
_HF_TOP = {
    "embeddings.cls_token": ("cls", _same),
    "embeddings.position_embeddings": (POSEMB, _same),
    "embeddings.patch_embeddings.projection.weight": ("embedding/kernel", _conv),
    "embeddings.patch_embeddings.projection.bias": ("embedding/bias", _same),
    "layernorm.weight": ("Transformer/encoder_norm/scale", _same),
    "layernorm.bias": ("Transformer/encoder_norm/bias", _same),
    "pooler.dense.weight": ("pre_logits/kernel", _linear),
    "pooler.dense.bias": ("pre_logits/bias", _same),
    "classifier.weight": ("head/kernel", _linear),
    "classifier.bias": ("head/bias", _same),
    # DeiT (DeiTForImageClassificationWithTeacher): a distillation token and a second head.
    "embeddings.distillation_token": ("dist", _same),
    "cls_classifier.weight": ("head/kernel", _linear),
    "cls_classifier.bias": ("head/bias", _same),
    "distillation_classifier.weight": ("head_dist/kernel", _linear),
    "distillation_classifier.bias": ("head_dist/bias", _same),
}
_HF_BACKBONE = "embeddings.patch_embeddings.backbone.bit."


def _from_hf(arrays, path):
    out = _Builder()
    v4 = any(".attention.attention." in k or "encoder.layer." in k for k in arrays)
    model_prefix = next((p for p in ("vit.", "deit.") if any(k.startswith(p) for k in arrays)),
                        "")
    for source, array in arrays.items():
        key = source[len(model_prefix):] if source.startswith(model_prefix) else source
        key = _hf_to_v5(key)
        if key in _HF_TOP:
            name, convert = _HF_TOP[key]
            out.add(name, source, array, convert)
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m and m[2] in _HF_BLOCK:
            name, convert, flexible = _HF_BLOCK[m[2]]
            out.add(f"Transformer/encoderblock_{int(m[1])}/{name}", source, array, convert,
                    flexible)
            continue
        hybrid = _hf_hybrid(key[len(_HF_BACKBONE):]) if key.startswith(_HF_BACKBONE) else None
        if hybrid:
            out.add(hybrid[0], source, array, hybrid[1])
            continue
        out.extra(source, array)
    def namer(canonical):
        top = {v[0]: k for k, v in _HF_TOP.items()}
        prefix = model_prefix
        if canonical in top:
            name = top[canonical]
            return name if "classifier" in name else prefix + name
        m = re.fullmatch(r"Transformer/encoderblock_(\d+)/(.+)", canonical)
        if m:
            for k, (name, _, _) in _HF_BLOCK.items():
                if name == m[2]:
                    v5 = f"layers.{m[1]}.{k}"
                    return prefix + (_v5_to_v4(v5) if v4 else v5)
        return canonical

    return Checkpoint(out.params, path=path, layout="hf", gelu=_hf_gelu(path), namer=namer,
                      normalization=_normalization_beside(path, "dist" in out.params))


def _v5_to_v4(key):
    key = re.sub(r"^layers\.", "encoder.layer.", key)
    for new, old in ((".attention.q_proj.", ".attention.attention.query."),
                     (".attention.k_proj.", ".attention.attention.key."),
                     (".attention.v_proj.", ".attention.attention.value."),
                     (".attention.o_proj.", ".attention.output.dense."),
                     (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense.")):
        key = key.replace(new, old)
    return key


def _normalization_beside(path, distilled):
    """The input normalisation the weights were trained with: from the Hub files beside them
    (Hugging Face's preprocessor_config.json: image_mean/image_std; timm's config.json:
    pretrained_cfg mean/std), else ImageNet's for DeiT (a distillation token, or "deit" in the
    file's name), else [-1, 1] (Google's ViT weights and their ports)."""
    folder = os.path.dirname(os.path.abspath(path))
    for name, keys in (("preprocessor_config.json", ("image_mean", "image_std")),
                       ("config.json", ("mean", "std"))):
        try:
            with open(os.path.join(folder, name)) as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        config = config.get("pretrained_cfg", config) if name == "config.json" else config
        if all(key in config for key in keys):
            mean, std = (config[key] for key in keys)
            return {"mean": [255.0 * m for m in mean], "std": [255.0 * s for s in std]}
    if distilled or "deit" in os.path.basename(str(path)).lower():
        return "imagenet"
    return "vit"


def _hf_gelu(path):
    """The GELU form from a config.json beside the weights (Hub layout), else exact erf."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    try:
        with open(config) as f:
            act = json.load(f).get("hidden_act", "gelu")
    except (OSError, ValueError):
        return "erf"
    return "tanh" if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast") else "erf"


_TIMM_BLOCK = {
    "norm1.weight": ("LayerNorm_0/scale", _same), "norm1.bias": ("LayerNorm_0/bias", _same),
    "norm2.weight": ("LayerNorm_2/scale", _same), "norm2.bias": ("LayerNorm_2/bias", _same),
    "attn.proj.weight": ("MultiHeadDotProductAttention_1/out/kernel", _linear),
    "attn.proj.bias": ("MultiHeadDotProductAttention_1/out/bias", _same),
    "mlp.fc1.weight": ("MlpBlock_3/Dense_0/kernel", _linear),
    "mlp.fc1.bias": ("MlpBlock_3/Dense_0/bias", _same),
    "mlp.fc2.weight": ("MlpBlock_3/Dense_1/kernel", _linear),
    "mlp.fc2.bias": ("MlpBlock_3/Dense_1/bias", _same),
}
_TIMM_TOP = {
    "cls_token": ("cls", _same),
    "pos_embed": (POSEMB, _same),
    "patch_embed.proj.weight": ("embedding/kernel", _conv),
    "patch_embed.proj.bias": ("embedding/bias", _same),
    "norm.weight": ("Transformer/encoder_norm/scale", _same),
    "norm.bias": ("Transformer/encoder_norm/bias", _same),
    "pre_logits.fc.weight": ("pre_logits/kernel", _linear),
    "pre_logits.fc.bias": ("pre_logits/bias", _same),
    "head.weight": ("head/kernel", _linear),
    "head.bias": ("head/bias", _same),
    # DeiT (deit_*_distilled_*): a distillation token and a second head.
    "dist_token": ("dist", _same),
    "head_dist.weight": ("head_dist/kernel", _linear),
    "head_dist.bias": ("head_dist/bias", _same),
}


def _timm_hybrid(key):
    """Canonical name of a timm ResNetV2 backbone key (vit_*_r50_* layout), or None."""
    backbone = r"patch_embed\.backbone\."
    return _hybrid_name(key, backbone + r"(?:stem\.)?conv\.weight",
                        backbone + r"(?:stem\.)?norm\.(weight|bias)",
                        backbone + r"stages\.(\d+)\.blocks\.(\d+)")


def _from_timm(arrays, path):
    out = _Builder()
    for source, array in arrays.items():
        if source in _TIMM_TOP:
            name, convert = _TIMM_TOP[source]
            out.add(name, source, array, convert)
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", source)
        if m:
            prefix = f"Transformer/encoderblock_{int(m[1])}/MultiHeadDotProductAttention_1/"
            if m[2] in ("attn.qkv.weight", "attn.qkv.bias"):
                param = "kernel" if m[2].endswith("weight") else "bias"
                for part, name in zip(np.split(array, 3, axis=0), ("query", "key", "value")):
                    out.add(prefix + f"{name}/{param}", source, part,
                            _linear if param == "kernel" else _same, flexible=True)
                continue
            if m[2] in _TIMM_BLOCK:
                name, convert = _TIMM_BLOCK[m[2]]
                out.add(f"Transformer/encoderblock_{int(m[1])}/{name}", source, array, convert,
                        flexible=m[2] == "attn.proj.weight")
                continue
        hybrid = _timm_hybrid(source)
        if hybrid:
            out.add(hybrid[0], source, array, hybrid[1])
            continue
        out.extra(source, array)
    params = out.params
    if POSEMB in params and "cls" in params:
        entry = params[POSEMB]
        tokens = entry.array.shape[1]
        if square_grid(tokens) is not None and square_grid(tokens - 1) is None:
            # no_embed_class models: the class token gets no position embedding.
            entry.array = np.concatenate([np.zeros_like(entry.array[:, :1]), entry.array], 1)

    def namer(canonical):
        top = {v[0]: k for k, v in _TIMM_TOP.items()}
        if canonical in top:
            return top[canonical]
        m = re.fullmatch(r"Transformer/encoderblock_(\d+)/(.+)", canonical)
        if m:
            if "/query/" in m[2] or "/key/" in m[2] or "/value/" in m[2]:
                return f"blocks.{m[1]}.attn.qkv.{'weight' if m[2].endswith('kernel') else 'bias'}"
            for k, (name, _) in _TIMM_BLOCK.items():
                if name == m[2]:
                    return f"blocks.{m[1]}.{k}"
        return canonical

    return Checkpoint(params, path=path, layout="timm", gelu="erf", namer=namer,
                      normalization=_normalization_beside(path, "dist" in params))
