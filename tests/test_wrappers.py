"""RLRR and LoRA wrappers in detail on a real (tiny) ViT: identity and official init, merge and export, layers
without bias, LoRA's in-place merge, the two RLRR implementations, option errors, LoRA targets, state errors.
What every method shares (what trains, merging, state round trips, counts) is in ``test_methods.py``."""

import math

import pytest
import torch
from torch import nn

import peft
from conftest import images, make_model, randomize_adapters, rel_err
from peft.lora import LoRALinear
from peft.rlrr import RLRRLinear
from peft.ssf import SSF, SSFConv2d, SSFLayerNorm

ADAPTER_CLASSES = (RLRRLinear, LoRALinear, SSF, SSFLayerNorm, SSFConv2d)
pytestmark = pytest.mark.usefixtures("torch_backend")


# ── identity init and merge ────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("method", ["rlrr", "lora"])
def test_identity_init_equals_base_exactly(method):
    x = images()
    model = make_model()
    with torch.no_grad():
        base = model(x)
    if method == "rlrr":
        peft.apply_rlrr(model, init="identity")
        assert all(torch.all(m.s_out == 0) and m.s_in.abs().sum() > 0
                   for m in model.modules() if isinstance(m, RLRRLinear))
    else:
        peft.apply_lora(model, rank=4, alpha=8, targets=("q", "k", "v", "proj", "fc1", "fc2"))
    with torch.no_grad():
        adapted = model(x)
    assert torch.equal(adapted, base)


def test_official_init_is_not_identity_and_within_bounds():
    model = make_model()
    x = images()
    with torch.no_grad():
        base = model(x)
    peft.apply_rlrr(model, rank=2, init="official")
    q = model.blocks[0].attn.q
    fc1 = model.blocks[0].mlp.fc1
    for m in (q, fc1):
        assert m.s_in.abs().max() <= math.sqrt(6 / m.in_features)
        assert m.s_in.abs().max() > 0.5 * math.sqrt(6 / m.in_features)
        assert m.s_out.abs().max() <= math.sqrt(6 / 2)
        assert torch.all(m.f == 0)
    ssf = model.blocks[0].norm1.ssf
    assert abs(ssf.scale.mean().item() - 1) < 0.05 and 0 < ssf.scale.std().item() < 0.1
    with torch.no_grad():
        assert not torch.allclose(model(x), base)


@pytest.mark.parametrize("rank", [1, 2])
def test_rlrr_merge_matches_adapted_and_leaves_plain_modules(tmp_path, rank):
    import loaders

    model = make_model()
    peft.apply_rlrr(model, rank=rank, init="official")
    randomize_adapters(model)
    x = images()
    with torch.no_grad():
        adapted = model(x)
    merged_names = peft.merge_adapters(model)
    assert "patch_embed" in merged_names and "blocks.1.mlp.fc2" in merged_names and "norm" in merged_names
    assert not any(isinstance(m, ADAPTER_CLASSES) for m in model.modules())
    assert type(model.patch_embed) is nn.Conv2d and type(model.norm) is nn.LayerNorm
    assert all(type(b.norm1) is nn.LayerNorm and type(b.attn.q) is nn.Linear for b in model.blocks)
    assert set(model.state_dict()) == set(make_model().state_dict())
    with torch.no_grad():
        merged = model(x)
    assert rel_err(merged, adapted) <= 1e-5

    # the merged model exports to Google's layout and comes back with the same logits
    path = loaders.save_npz(model, tmp_path / "merged.npz")
    reloaded = loaders.load_npz(path)
    with torch.no_grad():
        assert rel_err(reloaded(x), merged) <= 1e-6


@pytest.mark.parametrize("cls", [RLRRLinear, LoRALinear])
def test_wrappers_on_a_linear_without_bias(cls):
    torch.manual_seed(0)
    base = nn.Linear(7, 5, bias=False)
    layer = cls(base, rank=2)
    randomize_adapters(layer)
    x = torch.randn(3, 7)
    with torch.no_grad():
        expected = x @ (base.weight + layer.delta_weight()).t()
        if cls is RLRRLinear:
            expected = expected + layer.f
        merged = layer.merge()  # every wrapper: a new plain layer
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(merged(x), expected)
    assert type(merged) is nn.Linear and not any(p.requires_grad for p in merged.parameters())


def test_lora_merge_unmerge_and_export():
    model = make_model()
    peft.apply_lora(model, rank=4, alpha=6, targets=("q", "v", "fc1"))
    randomize_adapters(model)  # B is zero at init; make it non-trivial
    x = images()
    with torch.no_grad():
        adapted = model(x)
        q = model.blocks[0].attn.q
        w0 = q.weight.clone()
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.merge_in_place()
        assert q.merged
        torch.testing.assert_close(q.weight, w0 + (q.lora_B @ q.lora_A) * 6 / 4)
        assert rel_err(model(x), adapted) <= 1e-5
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.unmerge()
        torch.testing.assert_close(q.weight, w0, rtol=0, atol=1e-6)
        assert rel_err(model(x), adapted) <= 1e-6
    peft.merge_adapters(model)
    assert not any(isinstance(m, ADAPTER_CLASSES) for m in model.modules())
    with torch.no_grad():
        assert rel_err(model(x), adapted) <= 1e-5


def test_rlrr_impls_agree():
    x = images()
    results = {}
    for impl in ("function", "official"):
        model = make_model()
        peft.apply_rlrr(model, init="official", impl=impl)
        torch.manual_seed(0)
        randomize_adapters(model)
        y = model(x)
        y.square().mean().backward()
        results[impl] = (y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (y1, g1), (y2, g2) = results["function"], results["official"]
    assert rel_err(y1, y2) <= 1e-5
    assert set(g1) == set(g2)
    scale = max(g.abs().max().item() for g in g2.values())
    for n in g1:  # some gradients are ~0 by symmetry (a key bias shifts no softmax): compare at a common scale
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6 * scale, msg=n)


# ── options ──────────────────────────────────────────────────────────────────────────────────────────

def test_apply_method_options_and_errors():
    model = make_model()
    changed = peft.apply_method(model, "lora", lora_rank=2, lora_alpha=4, lora_targets=["fc2"], rlrr_rank=3)
    assert changed == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert model.blocks[0].mlp.fc2.lora_A.shape == (2, 32) and model.blocks[0].mlp.fc2.scaling == 2
    with pytest.raises(ValueError, match="already has adapters"):
        peft.apply_rlrr(model)
    with pytest.raises(TypeError, match="lora_rnak"):
        peft.apply_method(make_model(), "lora", lora_rnak=4)
    with pytest.raises(ValueError, match="method 'prefix-tuning'"):
        peft.apply_method(make_model(), "prefix-tuning")
    with pytest.raises(ValueError, match="init"):
        peft.apply_rlrr(make_model(), init="zeros")


def test_lora_targets_short_glob_regex_and_unknown():
    model = make_model()
    assert peft.apply_lora(model, targets=("blocks.*.attn.k", r"blocks\.1\.mlp\.fc\d")) == [
        "blocks.0.attn.k", "blocks.1.attn.k", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert peft.apply_lora(make_model(), targets="fc1, proj") == [
        "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.1.attn.proj", "blocks.1.mlp.fc1"]
    with pytest.raises(ValueError, match="'qkv'"):
        peft.apply_lora(make_model(), targets=("q", "qkv"))


# ── adapter state ──────────────────────────────────────────────────────────────────────────────────────

def test_adapter_state_mismatch_errors():
    model = make_model()
    peft.apply_rlrr(model)
    state = peft.adapter_state_dict(model)
    bad = dict(state)
    del bad["blocks.0.attn.q.s_in"]
    bad["blocks.0.attn.q.lora_A"] = torch.zeros(1)
    bad["head.weight"] = torch.zeros(3, 16)
    with pytest.raises(ValueError) as info:
        peft.load_adapter_state_dict(model, bad)
    msg = str(info.value)
    assert "missing keys (1): blocks.0.attn.q.s_in" in msg
    assert "unexpected keys (1): blocks.0.attn.q.lora_A" in msg
    assert "head.weight: checkpoint (3, 16) vs model (10, 16)" in msg
    lora_model = make_model()
    peft.apply_lora(lora_model)
    with pytest.raises(ValueError, match="s_out"):
        peft.load_adapter_state_dict(lora_model, state)
    transposed = {**state, "blocks.0.attn.q.s_in": state["blocks.0.attn.q.s_in"].T.contiguous()}  # same size
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): blocks.0.attn.q.s_in: checkpoint \(16, 1\)"):
        peft.load_adapter_state_dict(model, transposed)


def test_a_wrapper_refuses_a_layer_it_does_not_wrap():
    from peft.ssf import SSFLayerNorm as Norm

    with pytest.raises(TypeError, match="RLRRLinear wraps a plain Linear, got LayerNorm"):
        RLRRLinear(nn.LayerNorm(4))
    with pytest.raises(TypeError, match="SSFLayerNorm wraps a plain LayerNorm, got LoRALinear"):
        Norm(LoRALinear(nn.Linear(4, 4)))


def test_freeze_all_but_sets_every_flag_and_counts_what_trains():
    model = make_model()
    assert peft.freeze_all_but(model, lambda n: n.startswith("head.")) == 16 * 10 + 10
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_the_reused_rlrr_weight_is_kept_per_compute_dtype():
    """weight_memory="reuse": a W' built under bf16 autocast is not served to a float32 pass (same S): the float32
    output equals the one of a layer that rebuilds W' every time, bit for bit."""
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    reuse, rebuild = RLRRLinear(base, weight_memory="reuse"), RLRRLinear(base, weight_memory="rebuild")
    with torch.no_grad():
        for a, b in ((reuse.s_out, rebuild.s_out), (reuse.s_in, rebuild.s_in), (reuse.f, rebuild.f)):
            b.copy_(a)
        x = torch.randn(5, 24)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = reuse(x)
        assert low.dtype == torch.bfloat16
        assert torch.equal(reuse(x), rebuild(x))
