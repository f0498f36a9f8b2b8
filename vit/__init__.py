"""A readable Vision Transformer that matches Google's checkpoints exactly.

``vit`` is the bottom layer of the project: it imports torch and einops only, never ``loaders`` or ``peft``.
``vit.model`` is the model; ``vit.overrides`` changes a built model's dropout, drop-path and GELU for a run;
``vit.visualize`` holds the "what the model sees" computations, ``vit.plots`` the matplotlib figures of them.
"""

from .config import CONFIGS, ViTConfig, get_config
from .model import (Attention, DropPath, EncoderBlock, Mlp, VisionTransformer, record_attention, resample_pos_embed,
                    set_fused_attention)
from .overrides import set_drop_path, set_dropout, set_gelu

__all__ = ["CONFIGS", "ViTConfig", "get_config", "Attention", "DropPath", "EncoderBlock", "Mlp", "VisionTransformer",
           "record_attention", "resample_pos_embed", "set_drop_path", "set_dropout", "set_fused_attention", "set_gelu"]
