"""Parameter-efficient fine-tuning for ``vit.VisionTransformer``: RLRR, LoRA, SSF and the simpler modes."""

__vit_project__ = True  # tells this package apart from Hugging Face's ``peft`` (see vit.require_project_peft)
