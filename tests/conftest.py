"""Shared test helpers: a tiny ViT with every parameter random, inputs, adapter perturbation, relative error.

Tests import the helpers (``from conftest import make_model, images``) and use the fixtures by name; the folder is
on ``sys.path`` so that small modules beside the tests (``npz_factory``, ``benchmark_trees``) import too.
"""

import http.server
import math
import os
import sys
import threading
from pathlib import Path

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


@pytest.fixture()
def server():
    """A loopback HTTP server (tests/loopback.py): yields its base URL and its state (requests seen, whether Range
    is honoured, after how many bytes the connection drops)."""
    from loopback import Handler

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = {"requests": [], "honour_range": True, "drop_after": 0}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state
    finally:
        httpd.shutdown()
        httpd.server_close()


# ── fine-tuning runs on real Fashion-MNIST (Debian's dataset-fashion-mnist) ──────────────────────────────────────

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason=f"real Fashion-MNIST not installed at {FMNIST} "
                                         "(apt-get install dataset-fashion-mnist)")


def tiny(tmp_path, name="run", **kw):
    """Options of a run of the "testing" ViT (32 px, D=16) from scratch on 256 Fashion-MNIST images of classes 0-4."""
    from peft.finetune.options import FinetuneOptions

    base = dict(mode="full", weights="none", model="testing", data="fashion_mnist", data_root=str(FMNIST),
                classes="0-4", max_train_samples=256, max_eval_samples=96, epochs=2, warmup_epochs=0.5,
                batch_size=32, lr=3e-3, device="cpu", output_dir=str(tmp_path / name), progress=False)
    base.update(kw)
    return FinetuneOptions(**base)


@pytest.fixture(scope="session")
def mini_npz(tmp_path_factory):
    """A random ViT-Mini/4 checkpoint in Google's layout, as a stand-in for pretrained weights."""
    from npz_factory import write_google_npz

    path = tmp_path_factory.mktemp("weights") / "mini.npz"
    write_google_npz(path, vit.get_config("ViT-Mini/4"), seed=0)
    return path


@pytest.fixture(scope="session")
def testing_npz(tmp_path_factory):
    """A random ``testing`` ViT (the tiny config) in Google's layout."""
    from npz_factory import write_google_npz

    path = tmp_path_factory.mktemp("weights") / "testing.npz"
    write_google_npz(path, vit.get_config("testing"), seed=0)
    return path
