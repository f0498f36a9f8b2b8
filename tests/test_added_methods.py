"""VPT-shallow, the Adapter and DoRA against independent re-computations in float64, at non-trivial adapter values:
VPT-shallow as prompts concatenated once before plain blocks, the Adapter as NOAH's block equation, DoRA as Hugging
Face peft writes it (base + (m/‖V‖ − 1)·xWᵀ + (m/‖V‖)·s·BAx, the norm detached), its gradients and its merge."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import peft
import vit


def _model():
    torch.manual_seed(0)
    return vit.VisionTransformer(vit.get_config("testing", num_classes=5)).double().eval()


def _images(n=3):
    return torch.randn(n, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _perturb(model, scale=0.3):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def test_vpt_shallow_is_prompts_before_plain_blocks():
    base = _model()
    model = copy.deepcopy(base)
    peft.apply_mode(model, "vpt-shallow", vpt_shallow_tokens=4, vpt_shallow_dropout=0.0)
    _perturb(model)
    prompts = model.blocks[0].prompts
    x = _images()
    h = base.embed(x)  # CLS + positions + patches
    h = torch.cat([h[:, :1], prompts.expand(len(x), -1, -1), h[:, 1:]], 1)
    for block in base.blocks:
        h = block(h)
    expected = model.head(base.norm(h)[:, 0])  # the head trains (perturbed above)
    assert (model(x) - expected).abs().max().item() < 1e-12
    assert all(type(b).__name__ == "EncoderBlock" for b in model.blocks[1:])  # later blocks untouched


def test_adapter_is_noahs_block_equation():
    base = _model()
    model = copy.deepcopy(base)
    peft.apply_mode(model, "adapter")
    _perturb(model)
    x = base.embed(_images())
    b, ref = model.blocks[0], base.blocks[0]
    fc2 = b.mlp.fc2
    down_w, down_b, up_w, up_b = (t.detach() for t in (fc2.adapter_down.weight, fc2.adapter_down.bias,
                                                      fc2.adapter_up.weight, fc2.adapter_up.bias))
    y = x + ref.attn(ref.norm1(x))
    h = ref.mlp(ref.norm2(y))  # the MLP's output (dropout 0)
    z = h @ down_w.T + down_b
    expected = y + h + (z * torch.sigmoid(1.702 * z)) @ up_w.T + up_b  # x = residual + adapter(h), QuickGELU
    assert (b(x) - expected).abs().max().item() < 1e-12
    with pytest.raises(peft.NotMergeableError, match="QuickGELU"):
        peft.merge_adapters(model)
    fresh = copy.deepcopy(base)
    peft.apply_mode(fresh, "adapter")
    w = fresh.blocks[0].mlp.fc2.adapter_up.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform, as NOAH initialises it
    assert 0.5 * bound < w.abs().max().item() <= bound


def test_dora_equals_peft_formula_its_gradients_and_its_merge():
    base = _model()
    model = copy.deepcopy(base)
    peft.apply_mode(model, "dora", dora_rank=2, dora_alpha=4.0)
    assert (model(_images()) - base(_images())).abs().max().item() == 0.0  # B = 0, m = ‖W‖: the base model
    _perturb(model)
    layer = model.blocks[0].attn.q
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    W, b = layer.weight.detach(), layer.bias.detach()
    A, B, m = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.magnitude))
    s = 4.0 / 2
    norm = (W + s * B @ A).norm(dim=1).detach()  # peft: weight_norm.detach()
    base_result = x @ W.T + b
    expected = base_result + (m / norm - 1) * (x @ W.T) + (m / norm) * (x @ A.T @ B.T) * s
    ours = layer(x)
    assert (ours - expected).abs().max().item() < 1e-12
    g = torch.randn_like(expected)
    (expected * g).sum().backward()
    (ours * g).sum().backward()
    for mine, ref in ((layer.lora_A, A), (layer.lora_B, B), (layer.magnitude, m)):
        assert (mine.grad - ref.grad).abs().max().item() < 1e-10
    merged = copy.deepcopy(model)
    peft.merge_adapters(merged)
    assert type(merged.blocks[0].attn.q) is torch.nn.Linear
    assert (merged(_images()) - model(_images())).abs().max().item() < 1e-12
