"""The method contract: what the engine asks a method instead of knowing it (dropouts, weight decay, FLOPs), one
constructor shape for every wrapper, and one apply skeleton."""

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import peft
from conftest import make_model
from peft.base import Wrapper
from peft.state import train_adapters_only

ALL_DROPOUTS = {"lora": {"lora_dropout": 0.1}, "vpt": {"vpt_dropout": 0.1}, "vpt-shallow": {"vpt_shallow_dropout": 0.1}}


@pytest.mark.parametrize("mode", peft.METHOD_NAMES)
def test_only_the_adapters_dropouts_train_under_a_frozen_backbone(mode):
    """--frozen-eval: every dropout a method adds (those the plain model does not have) trains, the backbone's do
    not. AdaptFormer's and FacT's branch dropouts were left in eval mode by a list of attribute names."""
    plain = {name for name, _ in make_model().named_modules()}
    model = make_model()
    peft.apply_method(model, mode, **ALL_DROPOUTS.get(mode, {}))
    train_adapters_only(model)
    added = {n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and n not in plain}
    training = {n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.training}
    assert training == added
    if mode in ("adaptformer", "fact-tt", "lora", "vpt"):
        assert added


def test_every_wrapper_is_built_from_a_layer_and_its_config():
    wrappers = {w for m in peft.METHODS.values() for w in m.wrappers}
    for wrapper in wrappers:
        params = list(inspect.signature(wrapper.__init__).parameters)
        assert params[1:3] in (["base", "config"], ["layer", "config"], ["block", "config"], ["norm", "config"],
                               ["conv", "config"], ["linear", "config"], ["model", "config"]), (wrapper, params)


@pytest.mark.parametrize("mode", [m for m in peft.METHOD_NAMES if peft.METHODS[m].targets is not None])
def test_apply_replaces_exactly_the_targets_and_freezes_the_rest(mode):
    """The skeleton: the returned names are the method's targets, each now one of its wrappers; only the wrappers'
    own parameters and the head train; a second method is refused."""
    method = peft.METHODS[mode]
    model = make_model()
    targets = method.targets(model, method.config())
    assert method.apply(model) == targets
    assert all(isinstance(model.get_submodule(n), method.wrappers) for n in targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(peft.adapter_parameter_names(model)) & {n for n, _ in model.named_parameters()} | \
        {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match="already has adapters"):
        method.apply(model)


def test_a_method_declares_its_cost_for_its_own_config():
    """The FLOP model reads the method's Cost of the config given: a larger LoRA rank costs more."""
    from peft.bench.flops import train_macs
    import vit

    config = vit.get_config("testing")
    small, large = (train_macs(config, "lora", 2, peft.LoraConfig(rank=r))["train"] for r in (2, 4))
    assert large > small
    assert train_macs(config, "vpt", 2, peft.VPTConfig(tokens=20))["forward"] > train_macs(config, "vpt", 2)["forward"]


@pytest.mark.parametrize("mode", ["ssf", "rlrr", "lora", "dora", "fact-tt"])
def test_every_weight_space_wrapper_merges_in_place_and_unmerges_bit_for_bit(mode):
    """The one in-place contract (FoldsIn), SSF's wrappers included: merged in place, the model computes the same
    function (float64) with the update in the frozen tensors; unmerged, the pretrained tensors are back exactly."""
    from conftest import images, randomize_adapters
    from peft.base import FoldsIn

    model = make_model().double()
    peft.apply_method(model, mode)
    randomize_adapters(model)
    model.eval()  # FacT's dropout
    wrappers = [m for m in model.modules() if isinstance(m, FoldsIn)]
    assert wrappers
    if mode in ("ssf", "rlrr"):
        assert any(type(m).__name__.startswith("SSF") for m in wrappers)
    pretrained = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = images().double()
    with torch.no_grad():
        adapted = model(x)
        for m in wrappers:
            m.merge_in_place()
        torch.testing.assert_close(model(x), adapted, rtol=1e-12, atol=1e-12)
        assert any(not torch.equal(p, pretrained[n]) for n, p in model.named_parameters() if n in pretrained)
        merged = {id(m): m.merge() for m in wrappers}  # merge() of a merged wrapper: the update is not added twice
        for m in wrappers:
            m.unmerge()
        assert all(torch.equal(p, pretrained[n]) for n, p in model.named_parameters() if n in pretrained)
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)
        for m in wrappers:
            fresh = m.merge()
            assert torch.equal(fresh.weight, merged[id(m)].weight)


def test_a_wrapper_refuses_a_layer_that_is_already_wrapped():
    """A wrapper takes over a plain layer of exactly its type: SSF's wrappers subclass the layer they wrap, so an
    SSF LayerNorm / Conv2d / Linear handed to a wrapper again is refused by type, not accepted as "a LayerNorm"."""
    model = make_model()
    peft.apply_method(model, "ssf")
    wrapped = {type(m): m for m in model.modules() if isinstance(m, Wrapper) and type(m).WRAPS is not None}
    assert len(wrapped) == 3  # LayerNorm, Conv2d (patch embedding), Linear
    for cls, layer in wrapped.items():
        assert isinstance(layer, cls.WRAPS)
        with pytest.raises(TypeError, match=rf"wraps a plain {cls.WRAPS.__name__}, got {cls.__name__} \(adapters"):
            cls(layer, peft.SSFConfig())


def test_flat_options_left_unset_take_the_published_defaults():
    """configure_method / from_options: a None value (an unset flag) or a missing key gives the field's default,
    other methods' keywords are ignored, and an option no method knows is a TypeError naming it."""
    assert peft.configure_method("lora", lora_rank=None, lora_alpha=4.0, rlrr_rank=3) == peft.LoraConfig(alpha=4.0)
    assert peft.LoraConfig.from_options({"lora_rank": None, "lora_targets": None}) == peft.LoraConfig()
    assert peft.configure_method("rlrr", rlrr_rank=None) == peft.RLRRConfig()
    with pytest.raises(TypeError, match="unknown option.*lora_rnak"):
        peft.configure_method("lora", lora_rnak=4)
