"""Every registered method through one table: what trains, the step-0 identity, merging, adapter state, counts.

The table is the registry itself (``peft.MODES``), so a new method is tested as soon as it is registered; the
expectations below say, per method, which parameters train, whether it starts as the pretrained model and whether
it merges. Merging is checked against the adapted model (relative error ≤ 1e-5) and must leave only plain layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peft
import vit
from peft.base import Adapter, NotMergeableError
from test_peft import images, make_model, randomize_adapters, rel_err

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
B16_BACKBONE = {"head": 0, "mlp": 56_669_184, "full": 85_798_656, "bitfit": 102_912, "vpt": 92_160,
                "adaptformer": 156_768, "lora": 294_912, "ssf": 205_824, "rlrr": 288_768,
                "vpt-shallow": 7_680, "adapter": 156_768, "dora": 313_344, "fact-tt": 21_504}


def test_the_table_covers_the_registry():
    assert set(TRAINABLE) == set(IDENTITY_OPTIONS) == set(B16_BACKBONE) == set(peft.MODES)


@pytest.fixture(autouse=True)
def torch_backend():
    peft.set_backend("torch")
    yield
    peft.set_backend(None)


@pytest.mark.parametrize("mode", peft.MODES)
def test_only_the_methods_parameters_and_the_head_get_gradients(mode):
    model = make_model()
    peft.apply_mode(model, mode)
    model.train()
    model(images()).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        expected = n.startswith("head.") or TRAINABLE[mode](n)
        assert p.requires_grad == expected, n
        assert (p.grad is not None) == expected, n
    assert sum(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None) > 1


@pytest.mark.parametrize("mode", peft.MODES)
def test_step_zero_identity_where_the_method_has_one(mode):
    options = IDENTITY_OPTIONS[mode]
    base = make_model()
    x = images()
    model = make_model()
    peft.apply_mode(model, mode, **(options or {}))
    model.eval()
    with torch.no_grad():
        same = torch.equal(model(x), base(x))
    assert same == (options is not None)


@pytest.mark.parametrize("mode", peft.MODES)
def test_merge_equals_adapted_or_refuses_clearly(mode):
    model = make_model()
    peft.apply_mode(model, mode)
    randomize_adapters(model)
    model.eval()
    x = images()
    with torch.no_grad():
        adapted = model(x)
    if not peft.METHODS[mode].mergeable:
        with pytest.raises(NotMergeableError, match="cannot be merged"):
            peft.merge_adapters(model)
        assert any(isinstance(m, Adapter) for m in model.modules())  # refused before anything changed
        with torch.no_grad():
            assert torch.equal(model(x), adapted)
        return
    peft.merge_adapters(model)
    assert not any(isinstance(m, Adapter) for m in model.modules())
    assert all(type(m) in (nn.Linear, nn.LayerNorm, nn.Conv2d) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d)))
    assert set(model.state_dict()) == set(make_model().state_dict())  # the plain ViT's names again
    with torch.no_grad():
        assert rel_err(model(x), adapted) <= 1e-5


@pytest.mark.parametrize("mode", peft.MODES)
def test_adapter_state_round_trip(mode):
    x = images()
    trained = make_model()
    peft.apply_mode(trained, mode)
    randomize_adapters(trained)
    with torch.no_grad():
        trained.head.weight.normal_()
        if mode in ("mlp", "full"):
            trained.blocks[0].mlp.fc1.weight.add_(0.1)
    state = peft.adapter_state_dict(trained)
    fresh = make_model()
    torch.manual_seed(123)  # a different adapter init
    peft.apply_mode(fresh, mode)
    peft.load_adapter_state_dict(fresh, state)
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))


@pytest.mark.parametrize("mode", peft.MODES)
def test_vit_b16_backbone_counts(mode):
    with torch.device("meta"):
        model = vit.VisionTransformer(vit.get_config("ViT-B/16", num_classes=10))
    peft.apply_mode(model, mode)
    trainable, _ = peft.trainable_parameters(model)
    assert trainable - 769 * 10 == B16_BACKBONE[mode]


def test_published_counts_by_hand():
    d, m, layers = 768, 3072, 12
    assert B16_BACKBONE["bitfit"] == d + layers * (4 * d + m + d + 2 * d) + d  # patch, q/k/v/proj, fc1, fc2, 2 LN; norm
    assert B16_BACKBONE["ssf"] == 2 * (d + layers * (7 * d + m) + d)
    assert B16_BACKBONE["vpt"] == layers * 10 * d
    assert B16_BACKBONE["adaptformer"] == layers * (d * 8 + 8 + 8 * d + d)
    assert B16_BACKBONE["vpt-shallow"] == 10 * d
    assert B16_BACKBONE["adapter"] == layers * (d * 8 + 8 + 8 * d + d)  # one adapter per block, after the MLP
    assert B16_BACKBONE["dora"] == B16_BACKBONE["lora"] + 2 * layers * d  # + a magnitude per output of q and v
    r = 8
    assert B16_BACKBONE["fact-tt"] == 2 * d * r + layers * (4 * r * r + 2 * (m // d) * r * r)  # U, V; per-layer cores


def test_vpt_prompts_are_inserted_then_replaced_and_maps_keep_them_out_of_the_grid():
    from vit import visualize

    model = make_model()
    peft.apply_mode(model, "vpt", vpt_tokens=3, vpt_dropout=0.0)
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
@pytest.mark.parametrize("mode", peft.MODES)
def test_attention_maps_work_for_every_method(mode, method):
    from vit import visualize

    model = make_model()
    peft.apply_mode(model, mode)
    randomize_adapters(model)
    maps = visualize.attention_maps(model, images(), per_layer=True, method=method)
    assert maps.rollout.shape == (3, 4, 4) and torch.isfinite(maps.rollout).all()
    assert (maps.rollout.flatten(1).amax(1) - 1).abs().max() < 1e-6  # each map divided by its max
    assert maps.per_layer.shape == (2, 3, 4, 4)
    assert (maps.prefix_share > 0).all() == mode.startswith("vpt")  # prompt tokens: a prefix with attention
