"""Every registered method through one table: what trains, the step-0 identity, merging, adapter state, counts.

The table is the registry itself (``peft.METHOD_NAMES``), so a new method is tested as soon as it is registered; the
expectations below say, per method, which parameters train, whether it starts as the pretrained model and whether
it merges. Merging is checked against the adapted model (relative error ≤ 1e-5) and must leave only plain layers.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import peft
import vit
from peft.base import Wrapper, LinearDelta, NotMergeableError
from conftest import b16, images, make_model, randomize_adapters, rel_err

TRAINABLE = {  # which parameter names train besides the head
    "head": lambda n: False,
    "mlp": lambda n: ".mlp.fc" in n,
    "full": lambda n: True,
    "bitfit": lambda n: n.endswith(".bias"),
    "vpt": lambda n: n.endswith(".prompts"),
    "adaptformer": lambda n: ".adapter_" in n,
    "lora": lambda n: "lora_" in n,
    "ssf": lambda n: n.endswith((".ssf.scale", ".ssf.shift")),
    "rlrr": lambda n: n.split(".")[-1] in ("s_out", "s_in", "f", "scale", "shift"),
    "vpt-shallow": lambda n: n.endswith(".prompts"),
    "adapter": lambda n: ".adapter_" in n,
    "dora": lambda n: "lora_" in n or n.endswith(".magnitude"),
    "fact-tt": lambda n: n.endswith(".fact_s") or n in ("fact.u", "fact.v"),
}
IDENTITY_OPTIONS = {  # options under which the adapted model is exactly the pretrained one at step 0 (None: never)
    "head": {}, "mlp": {}, "full": {}, "bitfit": {}, "adaptformer": {}, "lora": {},
    "ssf": {"ssf_init": "identity"}, "rlrr": {"rlrr_init": "identity"}, "vpt": None,
    "vpt-shallow": None, "adapter": None, "dora": {}, "fact-tt": {},  # NOAH's adapter starts with xavier weights: not identity
}
D, M, L = 768, 3072, 12  # ViT-B/16: width, MLP width, blocks
B16_BACKBONE = {  # trainable backbone parameters, written as each paper's count (the head, 769 × classes, apart)
    "head": 0,
    "mlp": L * (2 * D * M + M + D),  # fc1 and fc2 with their biases
    "full": 85_798_656,  # every parameter of ViT-B/16 without its head (Dosovitskiy et al.: 86M with it)
    "bitfit": D + L * (4 * D + M + D + 2 * D) + D,  # patch embedding; q, k, v, proj, fc1, fc2, two LayerNorms; norm
    "vpt": L * 10 * D,  # 10 prompts per block
    "vpt-shallow": 10 * D,  # 10 prompts once
    "adaptformer": L * (D * 8 + 8 + 8 * D + D),  # down and up with biases, d = 8
    "adapter": L * (D * 8 + 8 + 8 * D + D),  # one adapter per block, after the MLP
    "lora": L * 2 * 8 * (D + D),  # A (8 × D) and B (D × 8) on q and v
    "dora": L * 2 * 8 * (D + D) + 2 * L * D,  # LoRA's, plus a magnitude per output of q and v
    "fact-tt": 2 * D * 8 + L * (4 * 8 * 8 + 2 * (M // D) * 8 * 8),  # U, V; per-layer cores (fc1, fc2: 4 chunks)
    "ssf": 2 * (D + L * (7 * D + M) + D),  # scale and shift after every operation
    # s_out + s_in + f on q, k, v, proj (3D each), fc1 (2M + D), fc2 (2D + M); SSF after norm1, norm2 (2D each),
    # the patch embedding and the final norm
    "rlrr": L * (4 * 3 * D + (2 * M + D) + (2 * D + M) + 2 * 2 * D) + 2 * 2 * D,
}
PUBLISHED = {"rlrr": 288_768, "lora": 294_912, "ssf": 205_824, "vpt": 92_160, "adaptformer": 156_768,
             "bitfit": 102_912, "fact-tt": 21_504, "dora": 313_344, "vpt-shallow": 7_680,
             "adapter": 156_768}  # as the README's methods table states them


def test_the_table_covers_the_registry():
    assert set(TRAINABLE) == set(IDENTITY_OPTIONS) == set(B16_BACKBONE) == set(peft.METHOD_NAMES)


pytestmark = pytest.mark.usefixtures("torch_backend")


@pytest.mark.parametrize("mode", peft.METHOD_NAMES)
def test_only_the_methods_parameters_and_the_head_get_gradients(mode):
    model = make_model()
    peft.apply_method(model, mode)
    model.train()
    model(images()).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        expected = n.startswith("head.") or TRAINABLE[mode](n)
        assert p.requires_grad == expected, n
        assert (p.grad is not None) == expected, n
    assert sum(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None) > 1


@pytest.mark.parametrize("mode", peft.METHOD_NAMES)
def test_step_zero_identity_where_the_method_has_one(mode):
    options = IDENTITY_OPTIONS[mode]
    base = make_model()
    x = images()
    model = make_model()
    peft.apply_method(model, mode, **(options or {}))
    model.eval()
    with torch.no_grad():
        same = torch.equal(model(x), base(x))
    assert same == (options is not None)


@pytest.mark.parametrize("mode", peft.METHOD_NAMES)
def test_merge_equals_adapted_or_refuses_clearly(mode):
    model = make_model()
    peft.apply_method(model, mode)
    randomize_adapters(model)
    model.eval()
    x = images()
    with torch.no_grad():
        adapted = model(x)
    if not peft.METHODS[mode].mergeable:
        with pytest.raises(NotMergeableError, match="cannot be merged"):
            peft.merge_adapters(model)
        assert any(isinstance(m, Wrapper) for m in model.modules())  # refused before anything changed
        with torch.no_grad():
            assert torch.equal(model(x), adapted)
        return
    peft.merge_adapters(model)
    assert not any(isinstance(m, Wrapper) for m in model.modules())
    assert all(type(m) in (nn.Linear, nn.LayerNorm, nn.Conv2d) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d)))
    assert set(model.state_dict()) == set(make_model().state_dict())  # the plain ViT's names again
    with torch.no_grad():
        assert rel_err(model(x), adapted) <= 1e-5


@pytest.mark.parametrize("mode", peft.METHOD_NAMES)
def test_adapter_state_round_trip(mode):
    x = images()
    trained = make_model()
    peft.apply_method(trained, mode)
    randomize_adapters(trained)
    with torch.no_grad():
        trained.head.weight.normal_()
        if mode in ("mlp", "full"):
            trained.blocks[0].mlp.fc1.weight.add_(0.1)
    state = peft.adapter_state_dict(trained)
    snapshot = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():  # training on afterwards must not change a saved state: it is a copy
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert all(torch.equal(state[k], snapshot[k]) and not state[k].requires_grad for k in state)
    peft.load_adapter_state_dict(trained, snapshot)  # back to the saved values
    fresh = make_model()
    torch.manual_seed(123)  # a different adapter init
    peft.apply_method(fresh, mode)
    peft.load_adapter_state_dict(fresh, state)
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))


@pytest.mark.parametrize("mode", peft.METHOD_NAMES)
def test_vit_b16_backbone_counts(mode):
    model = b16()
    peft.apply_method(model, mode)
    trainable, total = peft.trainable_parameters(model)
    assert total == sum(p.numel() for p in model.parameters()) > trainable or mode == "full"
    assert trainable - 769 * 10 == B16_BACKBONE[mode] == PUBLISHED.get(mode, B16_BACKBONE[mode])


def test_vpt_prompts_are_inserted_then_replaced_and_maps_keep_them_out_of_the_grid():
    from vit import visualize

    model = make_model()
    peft.apply_method(model, "vpt", vpt_tokens=3, vpt_dropout=0.0)
    randomize_adapters(model)
    model.eval()
    x = images()
    seen = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape[1], out.shape[1])))
             for b in model.blocks]
    with torch.no_grad():
        feats = model.forward_features(x)
    for h in hooks:
        h.remove()
    g2 = model.config.num_patches
    assert seen == [(1 + g2, 1 + 3 + g2), (1 + 3 + g2, 1 + 3 + g2)]  # inserted once, then replaced
    assert feats.shape[1] == 1 + 3 + g2
    maps = visualize.attention_maps(model, x, per_layer=True)
    assert maps.rollout.shape == (3, 4, 4) and maps.cls_heads.shape == (3, 2, 4, 4)
    assert maps.prefix_share.shape == (3, 2) and (maps.prefix_share > 0).all() and (maps.prefix_share < 1).all()


@pytest.mark.parametrize("method", ["rollout", "grad-rollout"])
@pytest.mark.parametrize("mode", peft.METHOD_NAMES)
def test_attention_maps_work_for_every_method(mode, method):
    from vit import visualize

    model = make_model()
    peft.apply_method(model, mode)
    randomize_adapters(model)
    maps = visualize.attention_maps(model, images(), per_layer=True, method=method)
    assert maps.rollout.shape == (3, 4, 4) and torch.isfinite(maps.rollout).all()
    assert (maps.rollout.flatten(1).amax(1) - 1).abs().max() < 1e-6  # each map divided by its max
    assert maps.per_layer.shape == (2, 3, 4, 4)
    assert (maps.prefix_share > 0).all() == mode.startswith("vpt")  # prompt tokens: a prefix with attention


# ── the method config: one fact per option ─────────────────────────────────────────────────────────────────────

def _other_value(opt):
    """A valid value different from the option's default."""
    if opt.choices:
        return next(c for c in opt.choices if c != opt.default)
    if opt.kind is int:
        return opt.default + 1
    if opt.kind is float:
        return round(opt.default + 0.25, 6)
    return "q,k"  # LoRA / DoRA targets


@pytest.mark.parametrize("mode", peft.METHOD_NAMES)
def test_the_config_is_the_one_source_of_a_methods_options(mode):
    from peft.cli.args import parse_options
    from peft.finetune import FinetuneOptions

    method = peft.METHODS[mode]
    config = method.config()
    fields = dataclasses.fields(config)
    assert list(method.options) == [f"{config.PREFIX}_{f.name}" for f in fields]
    for key, opt in method.options.items():
        assert opt.default == getattr(config, opt.field) and opt.kind is type(opt.default), key
        assert len(opt.help) > 10 and "\n" not in opt.help, key  # the field's one-line comment
    assert method.config.from_options(config.to_options()) == config  # what checkpoints record reads back
    # the command line: one flag per field, parsed into the same config the Python API builds
    changed = {key: _other_value(opt) for key, opt in method.options.items()}
    argv = ["--mode", mode] + [a for k, v in changed.items() for a in (method.options[k].flag, str(v))]
    opts = parse_options(argv, FinetuneOptions, with_methods=True)
    expected = dataclasses.replace(config, **{method.options[k].field: v for k, v in changed.items()})
    assert opts.method_config() == expected == peft.configure_method(mode, **changed)


def _bounded(cls):
    return [f for f in dataclasses.fields(cls) if {"min", "choices"} & set(f.metadata)]


@pytest.mark.parametrize("mode", [m for m in peft.METHOD_NAMES if _bounded(peft.METHODS[m].config)])
def test_a_config_refuses_values_its_method_cannot_use_naming_the_flag(mode):
    cls = peft.METHODS[mode].config
    for f in _bounded(cls):
        flag = f"--{cls.PREFIX.replace('_', '-')}-{f.name.replace('_', '-')}"
        if "min" in f.metadata:
            with pytest.raises(ValueError, match=f"{flag} must be"):
                cls(**{f.name: f.metadata["min"] - 1})
        if "choices" in f.metadata:
            with pytest.raises(ValueError, match=f"{flag} 'nope'"):
                cls(**{f.name: "nope"})


def test_apply_method_takes_a_config_as_hf_peft_does():
    a, b = make_model(), make_model()
    torch.manual_seed(0)
    names = peft.apply_method(a, peft.LoraConfig(rank=3, targets=("q", "fc1")))
    torch.manual_seed(0)
    assert names == peft.apply_method(b, "lora", lora_rank=3, lora_targets="q,fc1")
    assert a.blocks[0].attn.q.lora_A.shape == (3, 16)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(TypeError, match="not the config of a registered method"):
        peft.apply_method(make_model(), object())


# ── the adapter contract ─────────────────────────────────────────────────────────────────────────────────────

def _outermost_adapters(model):
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, Wrapper)]
    return [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]


@pytest.mark.parametrize("mode", peft.METHOD_NAMES)
def test_wrappers_take_the_layer_over_and_say_once_whether_they_merge(mode):
    method = peft.METHODS[mode]
    model = make_model()
    before = dict(model.named_parameters())
    peft.apply_method(model, mode)
    own = set(peft.adapter_parameter_names(model))
    for name, p in model.named_parameters():  # the same tensor objects under the same names, frozen
        if name in before and name not in own and not method.trains_backbone and not name.startswith("head."):
            assert p is before[name] and not p.requires_grad, name
    kinds = {type(m) for _, m in _outermost_adapters(model)}
    assert kinds == set(method.wrappers)  # the registry lists exactly the wrappers the method puts in
    assert type(model.head) is nn.Linear  # the head trains as itself, never wrapped
    assert method.mergeable == all(k.CANNOT_MERGE is None for k in kinds)
    for _, module in _outermost_adapters(model):
        if module.CANNOT_MERGE is not None:
            with pytest.raises(NotMergeableError) as info:
                module.merge()
            assert module.CANNOT_MERGE in str(info.value)


WEIGHT_SPACE = [m for m in peft.METHOD_NAMES if any(issubclass(w, LinearDelta) for w in peft.METHODS[m].wrappers)]


def test_the_weight_space_methods_are_the_linear_ones():
    assert set(WEIGHT_SPACE) == {"lora", "dora", "rlrr", "fact-tt"}


@pytest.mark.parametrize("mode, options", [(m, {}) for m in WEIGHT_SPACE] + [("lora", {"lora_variant": "noah"})])
def test_delta_weight_merge_in_place_and_unmerge_mean_the_same_for_every_method(mode, options):
    """In float64: every wrapper computes F.linear(x, W + ΔW, b + Δb); merging in place gives the same model and
    unmerging restores the pretrained tensors bit for bit."""
    model = make_model().double()
    peft.apply_method(model, mode, **options)
    randomize_adapters(model)
    model.eval()
    x = images().double()
    wrappers = [m for m in model.modules() if isinstance(m, LinearDelta)]
    pretrained = {id(m): (m.weight.clone(), None if m.bias is None else m.bias.clone()) for m in wrappers}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in wrappers:
            t = torch.randn(5, m.in_features, generator=g, dtype=torch.float64)
            db = m.delta_bias()
            bias = m.bias if db is None else (m.bias if m.bias is not None else 0) + db
            expected = torch.nn.functional.linear(t, m.weight + m.delta_weight(), bias)
            torch.testing.assert_close(m(t), expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(m.merged_weight(), m.weight + m.delta_weight(), rtol=1e-14, atol=1e-14)
        adapted = model(x)
        plain = {id(m): m.merge() for m in wrappers}
        for m in wrappers:
            m.merge_in_place()
        assert all(m.merged for m in wrappers)
        torch.testing.assert_close(model(x), adapted, rtol=1e-12, atol=1e-12)
        for m in wrappers:  # merge() of a merged wrapper is the same plain layer (the update is not added twice)
            again = m.merge()
            assert torch.equal(again.weight, plain[id(m)].weight) and (again.bias is None or torch.equal(
                again.bias, plain[id(m)].bias))
        assert any(not torch.equal(m.weight, pretrained[id(m)][0]) for m in wrappers)
        for m in wrappers:
            m.unmerge()
        for m in wrappers:
            w, b = pretrained[id(m)]
            assert torch.equal(m.weight, w) and (b is None or torch.equal(m.bias, b))
        assert torch.equal(model(x), adapted)


def test_adaptformer_is_its_equation_at_non_zero_adapter_values():
    """x_mid = x + attn(norm1 x);  out = x_mid + mlp(norm2 x_mid) + s · up(ReLU(down(x_mid))), in float64, with
    every adapter weight non-zero and a scale that is not the default (so both the branch input and s matter)."""
    model = make_model().double()
    peft.apply_method(model, "adaptformer", adaptformer_scale=0.37, adaptformer_dim=3)
    randomize_adapters(model, scale=0.5)
    model.eval()
    t = torch.randn(2, 17, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        for block in model.blocks:
            mid = t + block.attn(block.norm1(t))
            down, up = block.adapter_down, block.adapter_up
            branch = torch.relu(mid @ down.weight.T + down.bias) @ up.weight.T + up.bias
            expected = mid + block.mlp(block.norm2(mid)) + 0.37 * branch
            torch.testing.assert_close(block(t), expected, rtol=1e-12, atol=1e-12)
            assert (0.37 * branch).abs().max() > 1e-2  # the branch is not negligible
            t = expected


class _DroppedBranch(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)  # drop-path that dropped the whole branch for every sample


def test_adaptformer_branch_is_outside_the_mlps_drop_path():
    """Official AdaptFormer adds its branch after the MLP's drop-path: with the MLP path dropped, the block's output
    is x_mid + s · branch(x_mid)."""
    model = make_model().double()
    peft.apply_method(model, "adaptformer")
    randomize_adapters(model, scale=0.5)
    model.eval()
    block = model.blocks[0]
    block.drop_path2 = _DroppedBranch()
    t = torch.randn(2, 17, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        mid = t + block.attn(block.norm1(t))
        down, up = block.adapter_down, block.adapter_up
        branch = torch.relu(mid @ down.weight.T + down.bias) @ up.weight.T + up.bias
        torch.testing.assert_close(block(t), mid + 0.1 * branch, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("placement", ["mlp", "both"])
def test_adapter_sits_after_the_drop_path_it_follows(placement):
    """NOAH's Adapter adapts the MLP output *after* its drop-path: with the MLP path dropped, the adapter sees zeros
    and adds only up(QuickGELU(down's bias)) + up's bias; "both" does the same after the attention's drop-path."""
    model = make_model().double()
    peft.apply_mode(model, "adapter", adapter_placement=placement)
    randomize_adapters(model, scale=0.5)
    model.eval()
    block = model.blocks[0]
    block.drop_path2 = _DroppedBranch()
    if placement == "both":
        block.drop_path1 = _DroppedBranch()
    t = torch.randn(2, 17, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def of_zeros(down, up):  # the adapter of an all-zero branch: h = 0
        z = down.bias
        return (z * torch.sigmoid(1.702 * z)) @ up.weight.T + up.bias

    with torch.no_grad():
        if placement == "both":
            mid = t + of_zeros(block.adapter_attn_down, block.adapter_attn_up)
        else:
            mid = t + block.attn(block.norm1(t))
        bias_path = of_zeros(block.adapter_down, block.adapter_up)
        torch.testing.assert_close(block(t), mid + bias_path, rtol=1e-12, atol=1e-12)
    assert bias_path.abs().max() > 1e-2  # the dropped sample still gets the adapter's bias path


def test_lora_dropout_is_on_the_branch_input_only_and_the_init_is_kaiming():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = peft.LoRALinear(base, rank=4, alpha=12.0, dropout=1.0)  # p = 1: the branch sees zeros
    randomize_adapters(layer)
    layer.train()
    x = torch.randn(6, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x))
        layer.eval()
        torch.testing.assert_close(layer(x), base(x) + 3.0 * x @ layer.lora_A.T @ layer.lora_B.T)
    fresh = peft.LoRALinear(nn.Linear(400, 50), rank=64)
    bound = 1 / math.sqrt(400)  # kaiming-uniform with a = √5 on (r, in): U(±1/√in)
    assert fresh.lora_A.abs().max() <= bound and fresh.lora_A.abs().max() > 0.98 * bound
    assert torch.all(fresh.lora_B == 0)


def test_vpt_prompts_follow_the_papers_uniform_init():
    model = vit.VisionTransformer(vit.get_config("testing"))
    peft.apply_method(model, "vpt", vpt_tokens=200)
    c = model.config
    bound = math.sqrt(6.0 / (c.in_channels * c.patch_size ** 2 + c.hidden_size))  # Xavier-uniform on (3·P², D)
    prompts = torch.cat([b.prompts.detach().flatten() for b in model.blocks])
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.98 * bound
    assert abs(prompts.mean().item()) < 0.05 * bound and abs(prompts.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def _uniform_bound_ok(t, bound):
    m = t.abs().max().item()
    return m <= bound * (1 + 1e-6) and m > 0.95 * bound


def test_every_init_follows_its_published_distribution():
    """Each method's new tensors, on ViT-Ti/16 (many draws): uniform bounds reached but not exceeded, normal
    standard deviations within 5 %, zeros where the method starts from zero."""
    def fresh(mode, **options):
        torch.manual_seed(0)
        model = vit.VisionTransformer(vit.get_config("ViT-Ti/16"))
        peft.apply_method(model, mode, **options)
        return model

    d = 192
    lora = fresh("lora").blocks[0].attn.q  # A: kaiming-uniform a=√5 on (r, in) → U(±1/√in); B = 0
    assert _uniform_bound_ok(lora.lora_A, 1 / math.sqrt(d)) and not lora.lora_B.any()
    noah = fresh("lora", lora_variant="noah").blocks[0].attn.q  # as NOAH's runs: A, B truncated-normal std 0.02
    for t in (noah.lora_A, noah.lora_B):
        assert abs(t.std().item() - 0.02) < 0.002 and t.abs().max() <= 2  # timm: bounds ±2 absolute (KS test: test_official_training)
    rlrr = fresh("rlrr").blocks[0].mlp.fc1  # S_in U(±√(6/in)), S_out U(±√(6/r)), f = 0
    assert _uniform_bound_ok(rlrr.s_in, math.sqrt(6 / d)) and rlrr.s_out.abs().max() <= math.sqrt(6)
    assert not rlrr.f.any()
    ssf_model = fresh("ssf")
    ssf = torch.cat([b.attn.q.ssf.scale.detach() for b in ssf_model.blocks])  # scale ~ N(1, 0.02)
    assert abs(ssf.mean().item() - 1) < 0.005 and abs(ssf.std().item() - 0.02) < 0.001
    shift = torch.cat([b.attn.q.ssf.shift.detach() for b in ssf_model.blocks])  # shift ~ N(0, 0.02)
    assert abs(shift.mean().item()) < 0.005 and abs(shift.std().item() - 0.02) < 0.001
    af = fresh("adaptformer").blocks[0]  # down kaiming-uniform a=√5: U(±1/√D); up and biases 0
    assert _uniform_bound_ok(af.adapter_down.weight, 1 / math.sqrt(d))
    assert not (af.adapter_up.weight.any() or af.adapter_up.bias.any() or af.adapter_down.bias.any())
    ad = fresh("adapter").blocks[0]  # AdapterSuper's own init: xavier-uniform weights, biases N(0, 1e-6)
    assert _uniform_bound_ok(ad.adapter_down.weight, math.sqrt(6 / (d + 8)))
    assert 0 < ad.adapter_up.bias.abs().max() < 1e-5
    fact = fresh("fact-tt")  # U kaiming-uniform on (r, D): U(±1/√D); V = 0; cores U(±1/√fan_in)
    assert _uniform_bound_ok(fact.fact.u, 1 / math.sqrt(d)) and not fact.fact.v.any()
    assert _uniform_bound_ok(fact.blocks[0].mlp.fc2.fact_s, 1 / math.sqrt(4 * 8))
    dora = fresh("dora").blocks[0].attn.v  # magnitude = ‖W‖ per output unit
    torch.testing.assert_close(dora.magnitude, dora.weight.norm(dim=1), rtol=0, atol=0)
    plain = vit.VisionTransformer(vit.get_config("ViT-Ti/16"))
    pretrained_bias = plain.blocks[0].mlp.fc1.bias
    peft.apply_method(plain, "bitfit")  # the bias to train starts as a copy of the pretrained one
    trained_bias = plain.blocks[0].mlp.fc1.bias
    assert torch.equal(trained_bias, pretrained_bias) and trained_bias is not pretrained_bias
    assert trained_bias.requires_grad and not pretrained_bias.requires_grad


@pytest.mark.parametrize("mode", ["vpt", "vpt-shallow", "adaptformer"])
def test_block_adapters_trace_as_one_graph(mode):
    """The BlockWrapper mechanism (the block's own forward on a view with substituted sub-modules) is plain
    Python that torch.compile's tracer follows: one graph, no break."""
    import torch._dynamo as dynamo

    model = make_model()
    peft.apply_method(model, mode)
    model.eval()
    dynamo.reset()
    explained = dynamo.explain(model)(images())
    dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_vpt_dropout_touches_the_prompts_only():
    """Prompt dropout at p = 1 zeroes the prompts and nothing else: block 0 then runs on [CLS, zeros, patches]."""
    plain = make_model()
    model = make_model()
    peft.apply_method(model, "vpt", vpt_tokens=2, vpt_dropout=1.0)
    model.train()
    t = torch.randn(2, 17, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = plain.blocks[0](torch.cat([t[:, :1], torch.zeros(2, 2, 16), t[:, 1:]], dim=1))
        torch.testing.assert_close(model.blocks[0](t), expected, rtol=1e-6, atol=1e-6)


PUBLISHED_DEFAULTS = {  # the defaults each method's paper / official code states (see each config's docstring)
    "lora": dict(rank=8, alpha=8.0, targets="q,v", dropout=0.0, variant="loralib"),
    "dora": dict(rank=8, alpha=8.0, targets="q,v"),
    "rlrr": dict(rank=1, init="official", impl="function", weight_memory="rebuild"),
    "ssf": dict(init="official"),
    "vpt": dict(tokens=10, dropout=0.1),
    "vpt-shallow": dict(tokens=10, dropout=0.1),
    "adaptformer": dict(dim=8, scale=0.1, dropout=0.1),
    "adapter": dict(dim=8, placement="mlp", init="xavier", dropout=0.0),  # AdapterSuper's own (the run's: adapter-noah)
    "fact-tt": dict(rank=8, scale=1.0, dropout=0.1),
}


@pytest.mark.parametrize("mode", peft.METHOD_NAMES)
def test_each_method_defaults_to_its_published_values(mode):
    assert dataclasses.asdict(peft.METHODS[mode].config()) == PUBLISHED_DEFAULTS.get(mode, {})


def _residual_off_span(delta, basis):
    """‖delta − its projection on the column space of ``basis``‖ / ‖delta‖ (rows of delta are vectors)."""
    q, _ = torch.linalg.qr(basis)
    return ((delta - delta @ q @ q.T).norm() / delta.norm()).item()


def test_dropout_sits_inside_the_low_rank_branches():
    """With dropout active, AdaptFormer's branch minus up's bias stays in the span of up's columns (dropout acts
    between ReLU and up), and a FacT layer's increment stays in the span of V (dropout acts on the cores' output):
    both low-rank, which dropout after the last projection would break."""
    model = make_model().double()
    peft.apply_method(model, "adaptformer", adaptformer_dim=3, adaptformer_dropout=0.5)
    randomize_adapters(model, scale=0.5)
    model.train()
    block = model.blocks[0]
    block.drop_path2 = _DroppedBranch()  # the block's output is then x_mid + s · branch
    t = torch.randn(4, 17, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with torch.no_grad():
        mid = t + block.attn(block.norm1(t))
        branch = (block(t) - mid) / block.scale - block.adapter_up.bias
    assert branch.norm() > 0 and _residual_off_span(branch.reshape(-1, 16), block.adapter_up.weight) < 1e-10

    model = make_model().double()
    peft.apply_method(model, "fact-tt", fact_rank=2, fact_dropout=0.5)
    randomize_adapters(model, scale=0.5)
    model.train()
    v = model.fact.v
    for name, width in (("attn.q", 16), ("mlp.fc1", 16), ("mlp.fc2", 32)):  # square, expand (4 chunks), reduce
        layer = model.blocks[0].get_submodule(name)
        x = torch.randn(40, width, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        with torch.no_grad():
            delta = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
        chunks = delta.reshape(-1, 16)  # fc1's output: each D-chunk is V applied to its own core output
        assert delta.norm() > 0 and _residual_off_span(chunks, v) < 1e-10, name


def test_adapter_both_placement_adds_houlsbys_second_adapter_after_the_attention():
    model = make_model()
    names = peft.apply_method(model, "adapter", adapter_placement="both")
    assert names == [f"blocks.{i}" for i in range(2)]  # one block wrapper: its adapters follow both drop-paths
    trained = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head")}
    assert trained == {f"blocks.{i}.adapter_{s}{p}.{t}" for i in range(2) for s in ("", "attn_")
                       for p in ("down", "up") for t in ("weight", "bias")}
    big = b16()
    peft.apply_method(big, "adapter", adapter_placement="both")
    assert peft.trainable_parameters(big)[0] - 769 * 10 == 2 * B16_BACKBONE["adapter"]  # 313,536 (NOAH: 156,768 × 2)


def test_a_config_and_fields_combine_and_a_foreign_config_is_refused():
    model = make_model()
    peft.apply_lora(model, peft.LoraConfig(rank=3, targets="q"), alpha=6.0)  # the fields replace the config's
    q = model.blocks[0].attn.q
    assert q.rank == 3 and q.scaling == 2.0 and type(model.blocks[0].attn.v) is nn.Linear
    with pytest.raises(TypeError, match="expected a LoraConfig, got RLRRConfig"):
        peft.apply_lora(make_model(), peft.RLRRConfig())
