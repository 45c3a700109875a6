"""The custom Keras layers a ViT is made of, all serializable and backend-agnostic."""

from keras_vit.layers.attention import MultiHeadSelfAttention
from keras_vit.layers.drop_path import DropPath
from keras_vit.layers.gelu import gelu
from keras_vit.layers.patch_encoder import PatchEncoder
from keras_vit.layers.patches import Patches, patch_grid
from keras_vit.layers.pooling import TokenPooling
from keras_vit.layers.resnet import BottleneckUnit, ResNetStem, StdConv2D
from keras_vit.layers.transformer_block import MlpBlock, TransformerBlock

__all__ = ["BottleneckUnit", "DropPath", "MlpBlock", "MultiHeadSelfAttention", "PatchEncoder",
           "Patches", "ResNetStem", "StdConv2D", "TokenPooling", "TransformerBlock", "gelu", "patch_grid"]
