"""Many tasks on one frozen backbone: a named adapter, switched in with set_adapter, computes bit for bit what a
model adapted and trained for that task alone computes, without copying or moving the backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peft
from conftest import images, make_model


pytestmark = pytest.mark.usefixtures("torch_backend")


def train_alone(mode: str, num_classes: int, seed: int, **options):
    """A model adapted for one task alone and trained a few AdamW steps on random data."""
    model = make_model()
    with torch.no_grad():
        model.head = torch.nn.Linear(model.head.in_features, num_classes)
        torch.nn.init.zeros_(model.head.weight), torch.nn.init.zeros_(model.head.bias)
    model.config = model.config.replace(num_classes=num_classes)
    torch.manual_seed(seed)
    peft.apply_method(model, mode, **options)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(3):
        x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
        y = torch.randint(0, num_classes, (4,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


TASKS = [("pets", "rlrr", 5, {}), ("flowers", "lora", 3, {"lora_rank": 2}), ("dtd", "vpt", 4, {"vpt_tokens": 2}),
         ("cars", "adaptformer", 6, {}), ("birds", "ssf", 2, {}), ("dogs", "bitfit", 7, {})]


def test_switched_adapters_reproduce_their_separately_trained_models_exactly():
    x = images()
    alone = {name: train_alone(mode, k, seed=i, **opts) for i, (name, mode, k, opts) in enumerate(TASKS)}
    shared = make_model()
    base_logits = shared(x)
    backbone = {n: (p, p.data_ptr()) for n, p in shared.named_parameters()}
    for name, mode, k, opts in TASKS:
        peft.add_adapter(shared, name, method=mode, num_classes=k, **opts)
        peft.load_adapter_state_dict(shared, peft.adapter_state_dict(alone[name]), name=name)
    assert peft.adapter_names(shared) == [t[0] for t in TASKS] and peft.active_adapter(shared) is None
    for name, mode, k, _ in TASKS + TASKS[::-1]:  # in any order, several times
        peft.set_adapter(shared, name)
        with torch.no_grad():
            assert torch.equal(shared(x), alone[name](x)), name
        assert shared.config.num_classes == k
        trainable = {n for n, p in shared.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in alone[name].named_parameters() if p.requires_grad}
        for n, p in shared.named_parameters():  # the backbone is the same storage, never copied or moved
            if n in backbone and n not in trainable and not n.endswith(".bias"):
                assert p is backbone[n][0] and p.data_ptr() == backbone[n][1], n
    peft.set_adapter(shared, None)
    with torch.no_grad():
        assert torch.equal(shared(x), base_logits)
    assert {n: p for n, p in shared.named_parameters()}.keys() == backbone.keys()


def test_named_state_dict_round_trip_and_errors():
    model = make_model()
    peft.add_adapter(model, "a", method="rlrr", num_classes=4)
    state = peft.adapter_state_dict(model, "a")
    assert state["head.weight"].shape == (4, 16) and not state["head.weight"].any() and not state["head.bias"].any()
    peft.set_adapter(model, "a")  # a new task's head starts at zero: every class equally likely until trained
    with torch.no_grad():
        assert torch.equal(model(images()), torch.zeros(3, 4))
    assert "head.weight" in state and "blocks.0.attn.q.s_out" in state and "blocks.0.attn.q.weight" not in state
    with pytest.raises(ValueError, match="exists already"):
        peft.add_adapter(model, "a", method="lora")
    with pytest.raises(ValueError, match="cannot share one frozen backbone"):
        peft.add_adapter(model, "b", method="full")
    with pytest.raises(KeyError, match="no adapter named 'zzz'.*adapters: a"):
        peft.set_adapter(model, "zzz")
    bad = dict(state)
    bad.pop("head.bias")
    with pytest.raises(ValueError, match="missing keys \\(1\\): head.bias"):
        peft.load_adapter_state_dict(model, bad, name="a")
    applied = make_model()
    peft.apply_method(applied, "lora")
    with pytest.raises(ValueError, match="already has adapters from apply_method"):
        peft.add_adapter(applied, "x", method="rlrr")


def test_a_named_adapter_state_is_a_copy():
    model = make_model()
    peft.add_adapter(model, "a", method="lora", num_classes=4)
    state = peft.adapter_state_dict(model, "a")
    snapshot = {k: v.clone() for k, v in state.items()}
    peft.set_adapter(model, "a")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # training on
    assert all(torch.equal(state[k], snapshot[k]) for k in state)
