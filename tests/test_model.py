"""The PyTorch ViT loaded from an .npz computes what Google's model computes from the same arrays.

The reference (tests/google_reference.py) is an independent float64 numpy forward pass written directly in Google's
layout, following vit_jax/models_vit.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vit
from google_reference import ODD, google_forward
from google_reference import images as _images
from google_reference import rel_err as _rel_err
from loaders import KNOWN_WEIGHTS, infer_config, load_npz
from npz_factory import google_shapes, write_google_npz


# ── exactness against Google's computation ──────────────────────────────────────────────────────────────

@pytest.mark.parametrize("config", [vit.get_config("testing"), ODD], ids=["testing", "odd"])
@pytest.mark.parametrize("pre_logits", [None, 11], ids=["augreg", "i21k"])
@pytest.mark.parametrize("prefix", ["", "opt/target/"], ids=["plain", "opt-target"])
def test_logits_match_google_reference(tmp_path, config, pre_logits, prefix):
    path = tmp_path / "ckpt.npz"
    params = write_google_npz(path, config, seed=3, prefix=prefix, pre_logits=pre_logits)
    model = load_npz(path)
    assert not model.training and all(t.dtype == torch.float32 for t in model.state_dict().values())
    assert model.config.representation_size == pre_logits
    images = _images(config)
    with torch.no_grad():
        logits = model(images).numpy()
    expected = google_forward(params, images.numpy())
    assert logits.shape == (3, config.num_classes)
    assert np.abs(expected).max() > 0.1  # a meaningful, non-degenerate output
    assert _rel_err(logits, expected) <= 1e-5


@pytest.mark.parametrize("mistake", ["exact_gelu", "torch_default_eps"])
def test_reference_catches_the_usual_mistakes(tmp_path, mistake):
    """Exact GELU or PyTorch's LayerNorm eps (1e-5) moves the logits far more than the fp32 error does."""
    path = tmp_path / "ckpt.npz"
    params = write_google_npz(path, ODD, seed=4, pre_logits=8)
    images = _images(ODD)
    expected = google_forward(params, images.numpy())
    model = load_npz(path)
    with torch.no_grad():
        right = _rel_err(model(images).numpy(), expected)
        for module in model.modules():
            if mistake == "exact_gelu" and isinstance(module, torch.nn.GELU):
                module.approximate = "none"
            if mistake == "torch_default_eps" and isinstance(module, torch.nn.LayerNorm):
                module.eps = 1e-5
        wrong = _rel_err(model(images).numpy(), expected)
    assert wrong > 10 * right


# ── attention paths ─────────────────────────────────────────────────────────────────────────────────────

def test_fused_and_manual_attention_agree_and_maps_are_distributions(tmp_path):
    config = ODD
    path = tmp_path / "ckpt.npz"
    write_google_npz(path, config, seed=5)
    model = load_npz(path)
    images = _images(config, n=2)
    with torch.no_grad():
        vit.set_fused_attention(model, True)
        fused = model(images)
        vit.set_fused_attention(model, False)
        manual = model(images)
        vit.set_fused_attention(model, True)
        with vit.record_attention(model) as maps:
            recorded = model(images)
    torch.testing.assert_close(manual, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recorded, manual, rtol=0, atol=0)
    n = 1 + config.num_patches
    assert len(maps) == config.num_layers
    for attn in maps:
        assert attn.shape == (2, config.num_heads, n, n)
        assert (attn >= 0).all()
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, config.num_heads, n), rtol=0, atol=1e-5)
    assert all(a.fused for a in model.modules() if isinstance(a, vit.Attention))  # restored


# ── position-embedding resampling ───────────────────────────────────────────────────────────────────────

def _bilinear_half_pixel_1d(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation matrix: sample at (i + 0.5) * n_in / n_out - 0.5, clamped at the edges."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1 - frac
        m[i, i1] += frac
    return m


def test_resample_pos_embed_hand_computed_case():
    # grid value at (row r, col c) = 2r + c; 2x2 -> 4x4. Half-pixel sample positions per axis:
    # -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to the last cell): weights [0, .25, .75, 1].
    grid = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 4, 1)
    cls = torch.tensor([[[-7.0]]])
    out = vit.resample_pos_embed(torch.cat([cls, grid], dim=1), 4)
    u = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = (2 * u[:, None] + u[None, :]).reshape(1, 16, 1)
    assert out[0, 0, 0] == -7.0
    torch.testing.assert_close(out[:, 1:], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("old,new", [(3, 7), (5, 3), (4, 6), (14, 24)])
def test_resample_pos_embed_matches_numpy_bilinear(old, new):
    rng = np.random.default_rng(old * 100 + new)
    pos = rng.standard_normal((1, 1 + old * old, 5)).astype(np.float32)
    out = vit.resample_pos_embed(torch.from_numpy(pos), new).numpy()
    assert out.shape == (1, 1 + new * new, 5)
    np.testing.assert_array_equal(out[:, 0], pos[:, 0])  # CLS position kept as is
    m = _bilinear_half_pixel_1d(old, new)
    grid = pos[0, 1:].reshape(old, old, 5).astype(np.float64)
    expected = np.einsum("ai,bj,ijd->abd", m, m, grid).reshape(new * new, 5)
    np.testing.assert_allclose(out[0, 1:], expected, rtol=0, atol=1e-5)


def test_resample_pos_embed_identity_is_exact():
    pos = torch.randn(1, 1 + 9, 4)
    assert torch.equal(vit.resample_pos_embed(pos, 3), pos)
    assert torch.equal(vit.resample_pos_embed(pos, (3, 3)), pos)
    with pytest.raises(ValueError, match="not a square"):
        vit.resample_pos_embed(torch.randn(1, 1 + 8, 4), 3)


# ── configs ─────────────────────────────────────────────────────────────────────────────────────────────

def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size=8"):
        vit.get_config("testing", image_size=30)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        vit.get_config("testing", num_heads=3)
    model = vit.VisionTransformer(vit.get_config("testing"))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 16, 16))


OFFICIAL = ["ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-B/32", "ViT-L/16", "ViT-L/32", "ViT-H/14"]


@pytest.mark.parametrize("name", OFFICIAL)
@pytest.mark.parametrize("pre_logits", [False, True], ids=["augreg", "i21k"])
def test_infer_config_for_official_shapes(name, pre_logits):
    # Shapes only: broadcast views of one zero cost no memory, even for ViT-H/14.
    config = vit.get_config(name, num_classes=21843 if pre_logits else 1000)
    rep = config.hidden_size if pre_logits else None
    shapes = google_shapes(config, pre_logits=rep)
    params = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    assert infer_config(params) == config.replace(representation_size=rep)
    # a fine-tuned 384-px file: grid 24x24 (or 27x27 for /14); image size follows from the grid
    size = 384 if config.patch_size != 14 else 378
    big = config.replace(image_size=size)
    params = {k: np.broadcast_to(np.float32(0), s) for k, s in google_shapes(big).items()}
    assert infer_config(params).image_size == size


def test_google_b16_i21k_has_202_arrays():
    """Matches the real file's key count (REFERENCE: 202 arrays for ViT-B/16 i21k)."""
    assert len(google_shapes(vit.get_config("ViT-B/16", num_classes=21843), pre_logits=768)) == 202


@pytest.mark.slow
def test_full_size_b16_i21k_loads(tmp_path):
    """A full-size ViT-B/16 i21k file: config from shapes, every array placed in its layout (no forward:
    the small models above already check the computation, and a B/16 forward is slow on 2 cores)."""
    config = vit.get_config("ViT-B/16", num_classes=21843)
    path = tmp_path / "ViT-B_16.npz"
    params = write_google_npz(path, config, pre_logits=768)
    # Same keys, shapes and dtype as the real file give the same archive size, byte for byte.
    assert path.stat().st_size == KNOWN_WEIGHTS["ViT-B_16"].size == 412_815_506
    model = load_npz(path)
    assert model.config == config.replace(representation_size=768)
    assert sum(t.numel() for t in model.state_dict().values()) == sum(v.size for v in params.values())
    att = "Transformer/encoderblock_11/MultiHeadDotProductAttention_1"
    block = model.blocks[11]
    h, k, d = 7, 63, 700  # head 7, head-dim index 63, hidden index 700
    assert block.attn.v.weight[h * 64 + k, d] == params[f"{att}/value/kernel"][d, h, k]
    assert block.attn.v.bias[h * 64 + k] == params[f"{att}/value/bias"][h, k]
    assert block.attn.proj.weight[d, h * 64 + k] == params[f"{att}/out/kernel"][h, k, d]
    assert block.mlp.fc1.weight[3000, d] == params["Transformer/encoderblock_11/MlpBlock_3/Dense_0/kernel"][d, 3000]
    assert model.patch_embed.weight[d, 2, 15, 3] == params["embedding/kernel"][15, 3, 2, d]
    assert model.head.weight[21842, 767] == params["head/kernel"][767, 21842]


def test_from_scratch_init_is_googles():
    """models_vit.py's initialisers: xavier-uniform attention and MLP kernels (bound sqrt(6 / (in + out))), MLP
    biases N(0, 1e-6), attention and pre-logits biases zero (Flax's default), lecun-normal patch and pre-logits
    kernels (a normal cut at two standard deviations, variance 1 / fan_in), positions N(0, 0.02), zero CLS and
    head; the same seed gives the same model."""
    torch.manual_seed(0)
    config = vit.get_config("ViT-Ti/16").replace(representation_size=64)
    model = vit.VisionTransformer(config)
    d = config.hidden_size
    blk = model.blocks[0]
    for lin in (blk.attn.q, blk.attn.proj, blk.mlp.fc1):
        bound = math.sqrt(6 / sum(lin.weight.shape))
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.99 * bound
    assert not blk.attn.q.bias.any() and not blk.attn.proj.bias.any() and not model.pre_logits.bias.any()
    assert 0.5e-6 < blk.mlp.fc1.bias.std() < 1.5e-6
    for layer, fan_in in ((model.patch_embed, 3 * 16 * 16), (model.pre_logits, d)):
        assert abs(layer.weight.std().item() * math.sqrt(fan_in) - 1) < 0.05  # variance 1 / fan_in
        assert layer.weight.abs().max() <= 2 / 0.8796 / math.sqrt(fan_in)  # cut at two of the normal's stds
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert not model.cls_token.any() and not model.head.weight.any() and not model.head.bias.any()
    torch.manual_seed(0)
    again = vit.VisionTransformer(config)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


@pytest.mark.parametrize("mode", ["sample", "element"])
def test_drop_path_keeps_the_expected_value_of_the_branch(mode):
    """Training-time drop-path scales what it keeps by 1/(1 - p), so the branch's mean is unchanged; eval is the
    identity. Both kinds: each sample's branch whole (stochastic depth) or each element (the official RLRR code)."""
    p = 0.25
    x = torch.ones(4000, 3, 2)
    torch.manual_seed(0)
    y = vit.DropPath(p, mode).train()(x)
    kept = y.unique()
    assert len(kept) == 2 and kept[0] == 0 and kept[1].item() == pytest.approx(1 / (1 - p), rel=1e-6)
    assert abs(y.mean().item() - 1) < 0.03  # 4000 samples (whole-sample mode): over 3 standard errors
    assert torch.equal(vit.DropPath(p, mode).eval()(x), x)


def test_set_dropout_leaves_the_attention_dropout_and_set_drop_path_sets_the_schedule():
    """set_dropout changes every dropout rate but the attention probabilities' (its own config field); set_drop_path
    gives block i the rate i / (L - 1) of the last block's, as float32 linspace values."""
    model = vit.VisionTransformer(vit.get_config("testing", attention_dropout_rate=0.05))
    vit.set_dropout(model, 0.2)
    rates = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    attn = {n for n in rates if n.endswith("attn_drop")}
    assert attn and all(rates[n] == 0.05 for n in attn) and all(rates[n] == 0.2 for n in set(rates) - attn)
    assert (model.config.dropout_rate, model.config.attention_dropout_rate) == (0.2, 0.05)
    vit.set_drop_path(model, 0.1, "element")
    want = np.linspace(0, 0.1, len(model.blocks), dtype=np.float32).tolist()
    assert [(b.drop_path1.p, b.drop_path2.p, b.drop_path2.mode) for b in model.blocks] == [(r, r, "element") for r in want]
