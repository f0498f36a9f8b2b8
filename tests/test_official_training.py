"""The comparison rows in training, against their official forwards re-derived here from the published equations and
the official code's facts: VPT-deep (KMnP/vpt), NOAH's LoRA and Adapter (ZhangYuanhan-AI/NOAH, timm 0.5.4) and
FacT-TT (JieShibo/PETL-ViT, timm 0.4.12). Float64, train mode, batch 3, the same seed: equal logits with every
dropout and drop-path mask, equal gradients, and initial values drawn from the official run's distribution (a KS
test, p > 1e-3, against the official init; a negative control shows the test can fail).

How the random streams line up: both forwards run right after ``torch.manual_seed(SEED)`` on the global CPU
generator, and the reference draws its masks in the order the official code does (per block: NOAH's LoRA dropout
on the attention input, drop-path after attention, drop-path after the MLP, the adapter's dropout; FacT's core
dropouts q, k, v, proj, drop-path, fc1, fc2, drop-path; VPT's prompt dropout before each block). Each mask is drawn
with the call the official code makes (``nn.Dropout`` on a tensor of the same shape; timm 0.5.4's
``bernoulli_(keep)``; timm 0.4.12's ``floor(keep + torch.rand)``), so one draw too many, too few or out of order
shows as different logits. Drop-path rates are the official ``torch.linspace(0, rate, depth)`` (float32), which
``vit.model.drop_path_rates`` computes the same way (checked for the recipes' 0.1 on 12 blocks); the tests use 0.5
so that masks do drop branches at batch 3.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

import peft
import vit

stats = pytest.importorskip("scipy.stats")

SEED, BATCH, RATE = 1234, 3, 0.5
KS_P = 1e-3  # a correct init fails this at a rate of 0.1 % per tensor (fixed seeds: never flaky)


def _model(drop_path=0.0, mode="sample", seed=0):
    torch.manual_seed(seed)
    cfg = vit.get_config("testing", num_classes=5, gelu="erf", drop_path_rate=drop_path, drop_path_mode=mode)
    return vit.VisionTransformer(cfg).double()


def _perturb(model, scale=0.3):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 32, 32, dtype=torch.float64, generator=g), torch.tensor([0, 3, 1])


def _leaves(model) -> dict:
    """Every parameter (a shared one once, under its first name) as a fresh leaf for the reference."""
    return {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}


def _official_rates(rate, depth):
    return [t.item() for t in torch.linspace(0, rate, depth)]  # timm's stochastic depth decay rule (float32)


# ------------------------------------------------------------------- the official pieces, written from the facts

def ln(h, P, name):
    return F.layer_norm(h, h.shape[-1:], P[name + ".weight"], P[name + ".bias"], eps=1e-6)


def embed(P, x):
    w = P["patch_embed.weight"]
    h = F.conv2d(x, w, P["patch_embed.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    return torch.cat([P["cls_token"].expand(len(x), -1, -1), h], 1) + P["pos_embed"]


def head(P, h):
    return F.linear(ln(h, P, "norm")[:, 0], P["head.weight"], P["head.bias"])


def fused_qkv(P, pre):
    """timm's one qkv Linear: the q, k, v weights stacked (3D, D)."""
    return (torch.cat([P[f"{pre}attn.{n}.weight"] for n in "qkv"]), torch.cat([P[f"{pre}attn.{n}.bias"] for n in "qkv"]))


def attention_core(qkv, heads):
    """timm's Attention after the qkv projection: reshape (B, N, 3, H, Dh), permute, softmax(q kᵀ · Dh^-½) v."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-2, -1) * (C3 // 3 // heads) ** -0.5, -1)
    return (a @ v).transpose(1, 2).reshape(B, N, C3 // 3)


def mlp(P, pre, h):
    return F.linear(F.gelu(F.linear(h, P[pre + "mlp.fc1.weight"], P[pre + "mlp.fc1.bias"])),
                    P[pre + "mlp.fc2.weight"], P[pre + "mlp.fc2.bias"])


def drop_path_timm05(x, p):
    """timm 0.5.4 ``drop_path``: a per-sample ``bernoulli_(keep)`` mask divided by keep."""
    if p == 0.0:
        return x
    keep = 1 - p
    return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)


def drop_path_timm04(x, p):
    """timm 0.4.12 ``drop_path``: floor(keep + U) per sample, x / keep times it."""
    if p == 0.0:
        return x
    keep = 1 - p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * mask


def _compare(model, P, reference, trainable_names, seed=SEED):
    """Same seed, train mode: logits and every trainable gradient equal in float64 (the seed is one under which no
    block drops its branch for all three samples, so every gradient is non-zero)."""
    x, y = _inputs()
    model.train()
    torch.manual_seed(seed)
    ours = model(x)
    torch.manual_seed(seed)
    theirs = reference(P, x)
    assert (ours - theirs).abs().max().item() <= 1e-12 * theirs.abs().max().item()
    model.eval()
    assert (model(x) - ours).abs().max().item() > 1e-3  # the masks mattered: eval mode gives other logits
    model.train()
    F.cross_entropy(ours, y).backward()
    F.cross_entropy(theirs, y).backward()
    params = dict(model.named_parameters())
    for name in trainable_names:
        g, ref = params[name].grad, P[name].grad
        assert ref is not None and ref.abs().max() > 0, name
        assert (g - ref).abs().max().item() <= 1e-10 * ref.abs().max().item(), name
    return ours


def _ks(values, cdf, *args) -> float:
    return stats.kstest(values.detach().double().flatten().numpy(), cdf, args=args).pvalue


def _ti(mode, **options):
    torch.manual_seed(0)
    model = vit.VisionTransformer(vit.get_config("ViT-Ti/16"))
    peft.apply_method(model, mode, **options)
    return model


# --------------------------------------------------------------------------------------------------------- VPT

def _vpt_reference(P, x, tokens, p, layers, heads, deep=True):
    """KMnP/vpt@4410440 ``PromptedTransformer``: prompts expanded to the batch, then ``prompt_dropout``; deep prompts
    replace the previous block's prompt outputs (shallow: inserted once); the frozen encoder runs in eval mode (no
    drop-path)."""
    h = embed(P, x)
    for i in range(layers):
        if i == 0 or deep:
            prompts = F.dropout(P[f"blocks.{i}.prompts"].expand(len(x), -1, -1), p, training=True)
            rest = h[:, 1:] if i == 0 else h[:, 1 + tokens:]
            h = torch.cat([h[:, :1], prompts, rest], 1)
        pre = f"blocks.{i}."
        h = h + F.linear(attention_core(F.linear(ln(h, P, pre + "norm1"), *fused_qkv(P, pre)), heads),
                         P[pre + "attn.proj.weight"], P[pre + "attn.proj.bias"])
        h = h + mlp(P, pre, ln(h, P, pre + "norm2"))
    return head(P, h)


@pytest.mark.parametrize("mode", ["vpt", "vpt-shallow"])
def test_vpt_drops_each_samples_prompts_with_its_own_mask(mode):
    model = _model()
    key = mode.replace("-", "_")
    peft.apply_method(model, mode, **{f"{key}_tokens": 4, f"{key}_dropout": 0.1})
    _perturb(model)
    P = _leaves(model)
    c = model.config
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    _compare(model, P, lambda P, x: _vpt_reference(P, x, 4, 0.1, c.num_layers, c.num_heads, deep=mode == "vpt"),
             trainable)


def test_vpts_eval_output_is_bit_identical_to_the_one_mask_code():
    """The fix changes training only: in eval mode the new forward equals, bit for bit, the former one (dropout on
    the (p, D) prompts, then expand); in train mode they differ at batch 3."""
    from peft.vpt import VPTBlock

    def former(self, x):  # the forward before the fix, verbatim
        prompts = self.prompt_dropout(self.prompts).expand(x.shape[0], -1, -1).to(x.dtype)
        rest = x[:, 1:] if self.insert else x[:, 1 + self.num_tokens:]
        return self.run_block(torch.cat([x[:, :1], prompts, rest], dim=1))

    for mode in ("vpt", "vpt-shallow"):
        model = _model()
        peft.apply_method(model, mode)
        _perturb(model)
        old = _model()
        peft.apply_method(old, mode)
        old.load_state_dict(model.state_dict())
        for b in old.blocks:
            if isinstance(b, VPTBlock):
                b.forward = types.MethodType(former, b)
        x, _ = _inputs()
        model.eval(), old.eval()
        assert torch.equal(model(x), old(x))
        model.train(), old.train()
        torch.manual_seed(SEED)
        a = model(x)
        torch.manual_seed(SEED)
        assert (a - old(x)).abs().max().item() > 1e-3


def test_vpt_prompts_start_uniform_as_vpts_init():
    model = _ti("vpt")
    c = model.config
    bound = math.sqrt(6.0 / (3 * c.patch_size**2 + c.hidden_size))  # vit.py: uniform_(-val, val)
    prompts = torch.cat([b.prompts for b in model.blocks])
    assert prompts.abs().max() <= bound and _ks(prompts, "uniform", -bound, 2 * bound) > KS_P
    assert _ks(prompts, "uniform", -0.9 * bound, 1.8 * bound) < 1e-6  # a narrower uniform is told apart


# ----------------------------------------------------------------------------------------------- NOAH's LoRA

def _noah_lora_reference(P, x, rates, p, heads):
    """NOAH's supernet_vision_transformer_timm.py: qkv(x) plus LoRA_b(LoRA_a(LoRA_drop(x))) split into q, k, v
    deltas (one dropout call: one mask for the three), no scaling; x + drop_path(attn), x + drop_path(mlp)."""
    h = embed(P, x)
    for i, rate in enumerate(rates):
        pre = f"blocks.{i}."
        a = ln(h, P, pre + "norm1")
        qkv = F.linear(a, *fused_qkv(P, pre))
        lora_a = P[pre + "attn.q.lora_A"].T  # LoRA_a.weight (r, D)
        lora_b = torch.cat([P[f"{pre}attn.{n}.lora_B"] for n in "qkv"], 1).T  # LoRA_b.weight (3D, r)
        qkv = qkv + F.linear(F.linear(F.dropout(a, p, training=True), lora_a), lora_b)
        out = F.linear(attention_core(qkv, heads), P[pre + "attn.proj.weight"], P[pre + "attn.proj.bias"])
        h = h + drop_path_timm05(out, rate)
        h = h + drop_path_timm05(mlp(P, pre, ln(h, P, pre + "norm2")), rate)
    return head(P, h)


def test_drop_path_rates_are_the_official_float32_linspace():
    cfg = vit.get_config("ViT-B/16", drop_path_rate=0.1)
    assert vit.model.drop_path_rates(cfg) == _official_rates(0.1, 12) and _official_rates(0.1, 12)[-1] != 0.1


def test_noah_lora_trains_as_noahs_vtab_runs():
    model = _model(RATE, "sample")
    peft.apply_method(model, "lora", lora_variant="noah", lora_rank=3, lora_dropout=0.1)
    _perturb(model)
    rates = _official_rates(RATE, model.config.num_layers)
    assert [b.drop_path1.p for b in model.blocks] == rates
    P = _leaves(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "blocks.0.attn.q.lora_A" in trainable and "blocks.0.attn.k.lora_A" not in trainable  # one shared A
    _compare(model, P, lambda P, x: _noah_lora_reference(P, x, rates, 0.1, model.config.num_heads), trainable)


def test_noah_lora_dropout_is_one_mask_for_q_k_and_v():
    model = _model()
    peft.apply_method(model, "lora", lora_variant="noah", lora_rank=3, lora_dropout=0.5)
    attn = model.blocks[0].attn
    assert attn.q.lora_dropout is attn.k.lora_dropout is attn.v.lora_dropout
    model.train()
    h = torch.randn(BATCH, 5, 16, dtype=torch.float64)
    q, k, v = attn.q.lora_dropout(h), attn.k.lora_dropout(h), attn.v.lora_dropout(h)
    assert q is k is v and (q == 0).any()
    assert not torch.equal(attn.q.lora_dropout(h), q)  # a fourth call is a new pass: a new mask


def test_noah_lora_starts_truncated_normal_as_noahs_init_weights():
    """_init_vit_weights re-draws LoRA_a and LoRA_b with trunc_normal_(std=.02) (timm: bounds ±2, absolute)."""
    model = _ti("lora", lora_variant="noah")
    A = torch.cat([b.attn.q.lora_A.flatten() for b in model.blocks])
    B = torch.cat([getattr(b.attn, n).lora_B.flatten() for b in model.blocks for n in "qkv"])
    for t in (A, B):
        assert t.abs().max() <= 2 and _ks(t, "norm", 0.0, 0.02) > KS_P
    r = model.blocks[0].attn.q.rank
    assert _ks(A, "uniform", -1 / math.sqrt(r), 2 / math.sqrt(r)) < 1e-6  # the module's own kaiming init fails it


# -------------------------------------------------------------------------------------------- NOAH's Adapter

def _noah_adapter_reference(P, x, rates, p, heads):
    """NOAH's Block.forward: x + drop_path(attn(norm1 x)); x + adapter(drop_path(mlp(norm2 x))) with
    AdapterSuper: ln2(dropout(QuickGELU(ln1(h)))) + h."""
    h = embed(P, x)
    for i, rate in enumerate(rates):
        pre = f"blocks.{i}."
        out = F.linear(attention_core(F.linear(ln(h, P, pre + "norm1"), *fused_qkv(P, pre)), heads),
                       P[pre + "attn.proj.weight"], P[pre + "attn.proj.bias"])
        h = h + drop_path_timm05(out, rate)
        m = drop_path_timm05(mlp(P, pre, ln(h, P, pre + "norm2")), rate)
        z = F.linear(m, P[pre + "adapter_down.weight"], P[pre + "adapter_down.bias"])
        z = F.dropout(z * torch.sigmoid(1.702 * z), p, training=True)
        h = h + (F.linear(z, P[pre + "adapter_up.weight"], P[pre + "adapter_up.bias"]) + m)
    return head(P, h)


def test_noah_adapter_trains_as_noahs_vtab_runs():
    model = _model(RATE, "sample")
    peft.apply_method(model, "adapter", adapter_dim=3, adapter_init="trunc-normal", adapter_dropout=0.1)
    _perturb(model)
    rates = _official_rates(RATE, model.config.num_layers)
    P = _leaves(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    _compare(model, P, lambda P, x: _noah_adapter_reference(P, x, rates, 0.1, model.config.num_heads), trainable,
             seed=SEED + 1)


def test_noah_adapter_starts_truncated_normal_with_zero_biases():
    model = _ti("adapter", adapter_init="trunc-normal")
    w = torch.cat([getattr(b, f"adapter_{n}").weight.flatten() for b in model.blocks for n in ("down", "up")])
    assert w.abs().max() <= 2 and _ks(w, "norm", 0.0, 0.02) > KS_P
    assert all(not getattr(b, f"adapter_{n}").bias.any() for b in model.blocks for n in ("down", "up"))
    xavier = torch.cat([b.adapter_down.weight.flatten() for b in _ti("adapter").blocks])  # AdapterSuper's own
    assert _ks(xavier, "norm", 0.0, 0.02) < 1e-6


# ------------------------------------------------------------------------------------------------- FacT-TT

def _fact_reference(P, x, rates, s, p, heads):
    """JieShibo/PETL-ViT@026e4f1 fact_tt.py on timm 0.4.12's ViT: fact_forward_attn / fact_forward_mlp with one
    dropout call per core (q, k, v, proj, fc1, fc2), timm 0.4.12's drop-path after each sub-layer."""
    U, V = P["fact.u"], P["fact.v"]  # FacTu.weight (r, D), FacTv.weight (D, r)
    r = U.shape[0]

    def core(pre, name, t):
        return F.dropout(F.linear(t, P[f"{pre}{name}.fact_s"]), p, training=True)

    h = embed(P, x)
    for i, rate in enumerate(rates):
        pre = f"blocks.{i}."
        a = ln(h, P, pre + "norm1")
        B, N, C = a.shape
        qkv = F.linear(a, *fused_qkv(P, pre))
        q, k, v = (F.linear(core(pre, f"attn.{n}", F.linear(a, U)), V) for n in "qkv")
        qkv = qkv + torch.cat([q, k, v], 2) * s
        o = attention_core(qkv, heads)
        proj = F.linear(o, P[pre + "attn.proj.weight"], P[pre + "attn.proj.bias"])
        proj = proj + F.linear(core(pre, "attn.proj", F.linear(o, U)), V) * s
        h = h + drop_path_timm04(proj, rate)
        m = ln(h, P, pre + "norm2")
        c = P[pre + "mlp.fc1.weight"].shape[0] // C
        f1 = F.linear(m, P[pre + "mlp.fc1.weight"], P[pre + "mlp.fc1.bias"])
        f1 = f1 + F.linear(core(pre, "mlp.fc1", F.linear(m, U)).reshape(B, N, c, r), V).reshape(B, N, c * C) * s
        g = F.gelu(f1)
        f2 = F.linear(g, P[pre + "mlp.fc2.weight"], P[pre + "mlp.fc2.bias"])
        f2 = f2 + F.linear(core(pre, "mlp.fc2", F.linear(g.reshape(B, N, c, C), U).reshape(B, N, c * r)), V) * s
        h = h + drop_path_timm04(f2, rate)
    return head(P, h)


def test_fact_tt_trains_as_its_official_run():
    model = _model(RATE, "sample-floor")
    peft.apply_method(model, "fact-tt", fact_rank=3, fact_scale=0.7, fact_dropout=0.1)
    _perturb(model)
    rates = _official_rates(RATE, model.config.num_layers)
    P = _leaves(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    reference = lambda P, x: _fact_reference(P, x, rates, 0.7, 0.1, model.config.num_heads)  # noqa: E731
    _compare(model, P, reference, trainable)
    vit.set_drop_path(model, RATE, "sample")  # timm >= 0.5's draw: the same distribution, another stream
    x, _ = _inputs()
    torch.manual_seed(SEED)
    a = model(x)
    torch.manual_seed(SEED)
    assert (a - reference(P, x)).abs().max().item() > 1e-3


def test_fact_tt_starts_with_nn_linears_default_init():
    """set_FacT builds its Linears after timm's init: PyTorch's default (kaiming-uniform a=√5: U(±1/√fan_in)) for
    FacTu and the cores, FacTv zero."""
    model = _ti("fact-tt")
    d, r = model.config.hidden_size, 8
    assert _ks(model.fact.u, "uniform", -1 / math.sqrt(d), 2 / math.sqrt(d)) > KS_P and not model.fact.v.any()
    for part, fan_in in (("attn.q", r), ("attn.proj", r), ("mlp.fc1", r), ("mlp.fc2", 4 * r)):
        s = torch.cat([model.get_submodule(f"blocks.{i}.{part}").fact_s.flatten() for i in range(12)])
        b = 1 / math.sqrt(fan_in)
        assert s.abs().max() <= b and _ks(s, "uniform", -b, 2 * b) > KS_P, part
    assert _ks(model.fact.u, "norm", 0.0, 0.02) < 1e-6
