"""Parameter-efficient fine-tuning for ``vit.VisionTransformer``: RLRR, LoRA, SSF and the simpler modes.

    import vit
    peft = vit.require_project_peft()
    peft.apply_mode(model, "rlrr")            # or apply_rlrr / apply_lora directly
    ...train...
    state = peft.adapter_state_dict(model)    # trainable tensors only
    peft.merge_adapters(model)                # plain nn.Linear / LayerNorm / Conv2d again

Modules: ``peft.rlrr`` (RLRR + SSF wrappers), ``peft.lora``, ``peft.functional`` (the RLRR autograd
Function, the specification), ``peft.kernels`` (optional fused CUDA kernel), ``peft.modes``, ``peft.state``.
"""

__vit_project__ = True  # tells this package apart from Hugging Face's ``peft`` (see vit.require_project_peft)

from .functional import RLRRLinearFunction, official_rlrr_linear, rlrr_linear
from .kernels import kernel_available
from .lora import LoRALinear
from .modes import MODES, adapter_parameter_names, apply_lora, apply_mode, apply_rlrr, freeze_all_but
from .rlrr import SSF, RLRRLinear, SSFConv2d, SSFLayerNorm, set_backend
from .state import adapter_state_dict, load_adapter_state_dict, merge_adapters, trainable_parameters

__all__ = ["MODES", "LoRALinear", "RLRRLinear", "RLRRLinearFunction", "SSF", "SSFConv2d", "SSFLayerNorm",
           "adapter_parameter_names", "adapter_state_dict", "apply_lora", "apply_mode", "apply_rlrr",
           "freeze_all_but", "kernel_available", "load_adapter_state_dict", "merge_adapters",
           "official_rlrr_linear", "rlrr_linear", "set_backend", "trainable_parameters"]
