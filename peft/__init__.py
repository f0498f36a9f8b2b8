"""Parameter-efficient fine-tuning for ``vit.VisionTransformer``: RLRR, LoRA, SSF and the simpler methods.

    import vit_peft as peft                  # installed (`pip install .`): unambiguous next to Hugging Face's peft
    import peft                              # in a checkout, from the repository root
    peft.apply_method(model, "rlrr")         # or peft.apply_method(model, peft.LoraConfig(rank=16))
    ...train...
    state = peft.adapter_state_dict(model)   # trainable tensors only
    peft.merge_adapters(model)               # plain nn.Linear / LayerNorm / Conv2d again

This top level is the adapter library and imports only torch: ``base`` (the wrapper contract, method configs and
the registry entry), ``fields`` (options as dataclass fields: help, bounds, one check, doc tables), one file per
method with its config (``selective``: head/mlp/full, ``bitfit``, ``vpt``, ``adaptformer``, ``houlsby`` (the
"adapter" method, ``AdapterConfig``), ``lora`` (``LoraConfig``), ``dora``, ``fact``, ``ssf``, ``rlrr``),
``functional`` (the RLRR specification), ``rlrr_function`` (its autograd Function), ``kernels`` (the optional fused
CUDA kernel), ``registry`` (the list of methods), ``state`` (adapter state dicts, merging), ``tasks`` (named
adapters: many tasks on one frozen backbone). The fine-tuning engine is ``peft.finetune``, the benchmark
``peft.bench``, the command lines ``peft.cli``; those import ``vit`` and ``loaders``.
"""

__vit_project__ = True  # tells this package apart from Hugging Face's ``peft``

from .base import (Wrapper, LinearDelta, Method, MethodConfig, NotMergeableError, Option, adapter_parameter_names,
                   freeze_all_but)
from .functional import official_rlrr_linear, rlrr_scale_grads, rlrr_weight
from .kernels import kernel_available, set_backend
from .houlsby import AdapterConfig
from .adaptformer import AdaptFormerConfig
from .dora import DoraConfig
from .fact import FactConfig
from .lora import LoraConfig, LoRALinear, apply_lora
from .registry import METHOD_NAMES, METHOD_OPTIONS, METHODS, apply_method, configure_method, get_method
from .rlrr import RLRRConfig, RLRRLinear, apply_rlrr
from .ssf import SSFConfig
from .vpt import VPTConfig, VPTShallowConfig
from .rlrr_function import RLRRLinearFunction, rlrr_linear
from .ssf import SSF, SSFConv2d, SSFLayerNorm
from .tasks import (active_adapter, adapter_names, adapter_state_dict, add_adapter, load_adapter_state_dict,
                    set_adapter)
from .state import merge_adapters, trainable_parameters

__all__ = ["active_adapter", "adapter_names", "add_adapter", "set_adapter", "Wrapper", "AdapterConfig",
           "AdaptFormerConfig", "DoraConfig", "FactConfig", "LinearDelta", "LoraConfig", "LoRALinear", "METHODS",
           "METHOD_NAMES", "METHOD_OPTIONS", "Method", "MethodConfig", "NotMergeableError", "RLRRConfig", "SSFConfig",
           "VPTConfig", "VPTShallowConfig", "apply_method", "configure_method",
           "Option", "RLRRLinear", "RLRRLinearFunction", "SSF", "SSFConv2d", "SSFLayerNorm", "adapter_parameter_names",
           "adapter_state_dict", "apply_lora", "apply_rlrr", "freeze_all_but", "get_method",
           "kernel_available", "load_adapter_state_dict", "merge_adapters", "official_rlrr_linear", "rlrr_linear",
           "rlrr_scale_grads", "rlrr_weight", "set_backend", "trainable_parameters"]

# The names of an earlier version ("mode" for what is now "method" everywhere), kept so that scripts written for
# them still run; not part of the API above.
apply_mode, configure_mode, MODES, MODE_OPTIONS = apply_method, configure_method, METHOD_NAMES, METHOD_OPTIONS
