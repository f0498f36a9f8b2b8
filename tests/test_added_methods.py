"""VPT-shallow, the Adapter, DoRA and FacT-TT against independent re-computations in float64, at non-trivial adapter values:
VPT-shallow as prompts concatenated once before plain blocks, the Adapter as NOAH's block equation, DoRA as Hugging
Face peft writes it (base + (m/‖V‖ − 1)·xWᵀ + (m/‖V‖)·s·BAx, the norm detached), its gradients and its merge,
FacT-TT as the official ``fact_forward_attn`` / ``fact_forward_mlp`` compute it (timm's fused qkv and its reshapes)."""

from __future__ import annotations

import copy

import pytest
import torch

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
    peft.apply_method(model, "vpt-shallow", vpt_shallow_tokens=4, vpt_shallow_dropout=0.0)
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
    peft.apply_method(model, "adapter")
    _perturb(model)
    x = base.embed(_images())
    b, ref = model.blocks[0], base.blocks[0]
    down_w, down_b, up_w, up_b = (t.detach() for t in (b.adapter_down.weight, b.adapter_down.bias,
                                                      b.adapter_up.weight, b.adapter_up.bias))
    y = x + ref.attn(ref.norm1(x))
    h = ref.mlp(ref.norm2(y))  # the MLP's output (dropout 0)
    z = h @ down_w.T + down_b
    expected = y + h + (z * torch.sigmoid(1.702 * z)) @ up_w.T + up_b  # x = residual + adapter(h), QuickGELU
    assert (b(x) - expected).abs().max().item() < 1e-12
    with pytest.raises(peft.NotMergeableError, match="QuickGELU"):
        peft.merge_adapters(model)
    fresh = copy.deepcopy(base)
    peft.apply_method(fresh, "adapter")
    w = fresh.blocks[0].adapter_up.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform, as NOAH initialises it
    assert 0.5 * bound < w.abs().max().item() <= bound


def test_dora_equals_peft_formula_its_gradients_and_its_merge():
    base = _model()
    model = copy.deepcopy(base)
    peft.apply_method(model, "dora", dora_rank=2, dora_alpha=4.0)
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


def test_fact_tt_equals_the_official_forward_and_merges():
    base = _model()
    model = copy.deepcopy(base)
    peft.apply_method(model, "fact-tt", fact_rank=3, fact_scale=0.7, fact_dropout=0.0)
    _perturb(model)  # V starts at zero: move every factor and core away from its init
    U, V = model.fact.u.detach(), model.fact.v.detach()  # nn.Linear weights: FacTu (3, 16), FacTv (16, 3)
    s, blk, ref = 0.7, model.blocks[0], base.blocks[0]
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    fu, fv = (lambda t: t @ U.T), (lambda t: t @ V.T)
    # fact_forward_attn: qkv = self.qkv(x); q = FacTv(q_FacTs(FacTu(x))) ...; qkv += cat([q, k, v]) * s
    qkv = torch.cat([ref.attn.q(x), ref.attn.k(x), ref.attn.v(x)], -1)
    deltas = [fv(fu(x) @ getattr(blk.attn, n).fact_s.detach().T) for n in "qkv"]
    expected = qkv + torch.cat(deltas, -1) * s
    assert (torch.cat([blk.attn.q(x), blk.attn.k(x), blk.attn.v(x)], -1) - expected).abs().max().item() < 1e-12
    # fact_forward_mlp: h = fc1(x) + FacTv(fc1_FacTs(FacTu(x)).reshape(B, N, c, dim)).reshape(B, N, c·C) * s
    B, N, C = x.shape
    c = base.config.mlp_dim // C
    s1, s2 = blk.mlp.fc1.fact_s.detach(), blk.mlp.fc2.fact_s.detach()
    h = ref.mlp.fc1(x) + fv((fu(x) @ s1.T).reshape(B, N, c, 3)).reshape(B, N, c * C) * s
    assert (blk.mlp.fc1(x) - h).abs().max().item() < 1e-12
    # h = fc2(x); x = x.reshape(B, N, c, C); h += FacTv(fc2_FacTs(FacTu(x).reshape(B, N, c·dim))) * s
    x2 = torch.randn(B, N, c * C, dtype=torch.float64)
    h2 = ref.mlp.fc2(x2) + fv(fu(x2.reshape(B, N, c, C)).reshape(B, N, c * 3) @ s2.T) * s
    assert (blk.mlp.fc2(x2) - h2).abs().max().item() < 1e-12
    merged = copy.deepcopy(model)
    peft.merge_adapters(merged)
    assert all(type(m) in (torch.nn.Linear,) for n, m in merged.named_modules() if n.endswith(("attn.q", "mlp.fc1")))
    assert (merged(_images()) - model(_images())).abs().max().item() < 1e-12
