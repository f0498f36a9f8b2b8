"""Shared test helpers: a tiny ViT with every parameter random, inputs, adapter perturbation, relative error.

Tests import the helpers (``from conftest import make_model, images``) and use the fixtures by name; the folder is
on ``sys.path`` so that small modules beside the tests (``npz_factory``, ``benchmark_trees``) import too.
"""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import peft  # noqa: E402  (this project's, from the repository root)
import vit  # noqa: E402


def make_model(seed=0, name="testing"):
    """A tiny ViT (2 blocks, width 16, 32 px, patch 8) whose every parameter is random, so that norms, biases,
    CLS, positions and head all matter; eval mode."""
    torch.manual_seed(seed)
    model = vit.VisionTransformer(vit.get_config(name))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm1.weight") or n.endswith("norm2.weight") or n == "norm.weight":
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(max(p.shape[-1], 1)))
    return model.eval()


def images(seed=1, n=3, size=32):
    """n random images in [-1, 1] (the model's normalised input range)."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def randomize_adapters(model, seed=5, scale=0.3):
    """Move every adapter parameter away from its init, as training would (zero-initialised B, up, V too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in peft.adapter_parameter_names(model):
            p = model.get_parameter(name)
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def rel_err(a, b):
    """‖a − b‖ / ‖b‖."""
    return ((a - b).norm() / b.norm()).item()


def b16(num_classes=10):
    """ViT-B/16 on the meta device: shapes and counts without memory or init cost."""
    with torch.device("meta"):
        return vit.VisionTransformer(vit.get_config("ViT-B/16", num_classes=num_classes))


@pytest.fixture
def torch_backend():
    """RLRR on its PyTorch path (not the fused kernel) for the test, restored afterwards."""
    peft.set_backend("torch")
    yield
    peft.set_backend(None)


@pytest.fixture
def single_process(monkeypatch):
    """No torchrun variables and one torch thread (a shared 2-core machine is ~10x slower with two), restored."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
