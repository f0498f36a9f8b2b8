"""A readable Vision Transformer that matches Google's checkpoints exactly."""

from .config import CONFIGS, ViTConfig, get_config
from .model import (Attention, EncoderBlock, Mlp, VisionTransformer, record_attention, resample_pos_embed,
                    set_fused_attention)

__all__ = ["CONFIGS", "ViTConfig", "get_config", "Attention", "EncoderBlock", "Mlp", "VisionTransformer",
           "record_attention", "resample_pos_embed", "set_fused_attention", "require_project_peft"]


def require_project_peft():
    """Import and return this project's ``peft`` package, or fail clearly if Hugging Face's is found first.

    Both are importable as ``peft``; whichever comes first on ``sys.path`` wins, and using Hugging Face's by
    mistake otherwise surfaces later as a confusing AttributeError.
    """
    import peft

    if not getattr(peft, "__vit_project__", False):
        raise ImportError(
            f"the 'peft' package imported from {getattr(peft, '__file__', '?')} is not this project's "
            "(probably Hugging Face's PyPI package 'peft'). Run `pip uninstall peft` and reinstall this "
            "project with `pip install -e .`, or run from the repository root so its peft/ comes first."
        )
    return peft
