"""vit.visualize: attention rollout, position-embedding similarity and patch-filter PCA against numpy references."""

import numpy as np
import pytest
import torch

import vit
from vit import plots as P
from vit import visualize as V


def random_attention(b=2, h=3, n=10, layers=4, seed=0):
    """Per-layer softmax maps (B, H, N, N), rows summing to 1, like vit.record_attention returns."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, n, generator=g).mul(2).softmax(dim=-1) for _ in range(layers)]


def numpy_rollout(attentions, discard_ratio=0.0):
    """Independent reference: mean heads, discard patch-to-patch minima, (A+I)/2, row-normalise, multiply."""
    layers = [a.double().numpy().mean(axis=1) for a in attentions]
    b, n, _ = layers[0].shape
    r = np.broadcast_to(np.eye(n), (b, n, n))
    for a in layers:
        a = a.copy()
        for s in range(b):
            flat = a[s, 1:, 1:].flatten()  # a copy
            k = int(flat.size * discard_ratio)
            flat[np.argsort(flat, kind="stable")[:k]] = 0.0
            a[s, 1:, 1:] = flat.reshape(n - 1, n - 1)
        a = (a + np.eye(n)) / 2
        a = a / a.sum(axis=-1, keepdims=True)
        r = np.einsum("bij,bjk->bik", a, r)
    m = r[:, 0, 1:]
    g = int(np.sqrt(n - 1))
    return (m / m.max(axis=1, keepdims=True)).reshape(b, g, g)


@pytest.mark.parametrize("fusion", V.HEAD_FUSIONS)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_each_normalised_layer_is_row_stochastic(fusion, ratio):
    for a in V.rollout_layers(random_attention(), fusion, ratio):
        assert torch.all(a >= 0)
        torch.testing.assert_close(a.sum(dim=-1), torch.ones(a.shape[:2], dtype=a.dtype))


def test_fusion_modes_match_numpy():
    a = random_attention(layers=1)[0]
    np.testing.assert_allclose(V.fuse_heads(a, "mean"), a.numpy().mean(1), rtol=1e-6)
    np.testing.assert_allclose(V.fuse_heads(a, "max"), a.numpy().max(1))
    np.testing.assert_allclose(V.fuse_heads(a, "min"), a.numpy().min(1))
    with pytest.raises(ValueError, match="head fusion"):
        V.fuse_heads(a, "median")


def test_identity_attention_gives_uniform_map():
    n = 17  # 1 CLS + 4x4 patches
    eye = [torch.eye(n).expand(2, 3, n, n) for _ in range(3)]
    m = V.attention_rollout(eye)
    assert m.shape == (2, 4, 4)
    assert torch.isfinite(m).all() and torch.all(m == m.flatten()[0])  # CLS never looks at a patch: all 0
    uniform = [torch.full((2, 3, n, n), 1.0 / n) for _ in range(3)]
    torch.testing.assert_close(V.attention_rollout(uniform), torch.ones(2, 4, 4))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.8])
def test_rollout_equals_direct_product(ratio):
    attentions = random_attention(b=3, n=26, layers=5, seed=1)  # 5x5 grid
    expected = numpy_rollout(attentions, ratio)
    np.testing.assert_allclose(V.attention_rollout(attentions, "mean", ratio).numpy(), expected, rtol=1e-5)
    per_layer = V.per_layer_rollout(attentions, "mean", ratio)
    assert per_layer.shape == (5, 3, 5, 5)
    for layer in range(5):
        np.testing.assert_allclose(per_layer[layer].numpy(), numpy_rollout(attentions[:layer + 1], ratio),
                                   rtol=1e-5)
    flat = V.attention_rollout(attentions, "mean", ratio, as_grid=False)
    np.testing.assert_allclose(flat.numpy(), expected.reshape(3, 25), rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.25, 0.9, 0.99])
def test_discard_keeps_cls_row_and_column(ratio):
    a = V.fuse_heads(random_attention(b=2, n=37, layers=1, seed=2)[0], "max")  # 6x6 grid
    out = V.discard_lowest(a, ratio)
    torch.testing.assert_close(out[:, 0, :], a[:, 0, :])
    torch.testing.assert_close(out[:, :, 0], a[:, :, 0])
    block_in, block_out = a[:, 1:, 1:].flatten(1), out[:, 1:, 1:].flatten(1)
    k = int(block_in.shape[1] * ratio)
    for s in range(2):
        zeroed = block_out[s] == 0
        assert int(zeroed.sum()) == k
        assert block_in[s][zeroed].max() <= block_in[s][~zeroed].min()  # exactly the lowest were dropped
        torch.testing.assert_close(block_out[s][~zeroed], block_in[s][~zeroed])
    normalised = V.normalize_layer(out)
    torch.testing.assert_close(normalised.sum(-1), torch.ones(2, 37))
    with pytest.raises(ValueError, match="discard_ratio"):
        V.discard_lowest(a, 1.0)


def test_cls_attention_and_upsampling():
    a = random_attention(b=2, h=4, n=50, layers=1)[0]  # 7x7 grid
    c = V.cls_attention(a)
    assert c.shape == (2, 4, 7, 7)
    torch.testing.assert_close(c.flatten(2), a[:, :, 0, 1:])
    up = V.upsample_masks(c, 28)
    assert up.shape == (2, 4, 28, 28)
    torch.testing.assert_close(up.mean(dim=(-2, -1)), c.mean(dim=(-2, -1)), rtol=1e-3, atol=1e-6)


def test_attention_maps_from_model_match_recorded_rollout():
    torch.manual_seed(0)
    model = vit.VisionTransformer(vit.get_config("testing")).eval()
    x = torch.randn(3, 3, 32, 32)
    maps = V.attention_maps(model, x, head_fusion="max", discard_ratio=0.5, per_layer=True)
    with torch.no_grad(), vit.record_attention(model) as recorded:
        logits = model(x)
    assert model.blocks[0].attn.fused  # the fused path is back on afterwards
    torch.testing.assert_close(maps.probs, logits.softmax(-1))
    torch.testing.assert_close(maps.rollout, V.attention_rollout(recorded, "max", 0.5))
    torch.testing.assert_close(maps.cls_heads, recorded[-1][:, :, 0, 1:].reshape(3, 2, 4, 4))
    assert maps.per_layer.shape == (2, 3, 4, 4)
    torch.testing.assert_close(maps.per_layer[-1], maps.rollout)


def test_pos_embed_similarity_of_one_hot_embeddings_is_identity_tiles():
    g = 4
    e = torch.cat([torch.randn(1, 2 * g * g), torch.eye(g * g, 2 * g * g)])  # CLS row first, then one-hots
    sim = V.pos_embed_similarity(e[None])
    assert sim.shape == (g, g, g, g)
    for i in range(g):
        for j in range(g):
            expected = torch.zeros(g, g)
            expected[i, j] = 1.0
            torch.testing.assert_close(sim[i, j], expected)


def test_pos_embed_similarity_known_values():
    g, d = 3, 8
    e = torch.randn(1 + g * g, d, generator=torch.Generator().manual_seed(3))
    e[1 + 4] = 2.5 * e[1 + 0]  # position (1, 1) points the same way as (0, 0): similarity 1
    e[1 + 8] = -e[1 + 0]  # position (2, 2) the opposite way: similarity -1
    sim = V.pos_embed_similarity(e)
    assert sim[0, 0, 1, 1] == pytest.approx(1.0) and sim[1, 1, 0, 0] == pytest.approx(1.0)
    assert sim[0, 0, 2, 2] == pytest.approx(-1.0)
    p = e[1:].numpy().astype(np.float64)
    cos = p @ p.T / np.outer(np.linalg.norm(p, axis=1), np.linalg.norm(p, axis=1))
    np.testing.assert_allclose(sim.numpy(), cos.reshape(g, g, g, g), atol=1e-6)
    assert float(sim.min()) >= -1 and float(sim.max()) <= 1


def test_patch_filter_pca_matches_numpy_svd():
    w = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    comps, explained = V.patch_filter_pca(w, k=28)
    assert comps.shape == (28, 3, 4, 4) and explained.shape == (28,)
    flat = comps.reshape(28, -1).double()
    torch.testing.assert_close(flat @ flat.T, torch.eye(28, dtype=torch.float64), atol=1e-5, rtol=0)
    x = w.reshape(40, -1).double().numpy()
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    for c, ref in zip(flat.numpy(), vt[:28]):
        sign = np.sign(c @ ref)
        np.testing.assert_allclose(c, sign * ref, atol=1e-5)
    np.testing.assert_allclose(explained.numpy(), (s**2 / (s**2).sum())[:28], rtol=1e-5)
    assert torch.all(explained[:-1] >= explained[1:])


def test_patch_filter_pca_returns_fewer_when_fewer_exist():
    w = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(5))  # 6 centred filters: rank 5
    comps, explained = V.patch_filter_pca(w)
    assert comps.shape == (5, 3, 2, 2)
    assert float(explained.sum()) == pytest.approx(1.0, abs=1e-6)


def test_plots_return_figures_with_expected_panels():
    from matplotlib.figure import Figure

    images = P.denormalize(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert images.shape == (2, 32, 32, 3) and images.min() >= 0 and images.max() <= 1
    fig = P.plot_attention(images, [("rollout", np.random.rand(2, 4, 4)), ("head 1", np.random.rand(2, 4, 4))],
                           titles=["a", "b"])
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * 2 + 1  # panels + colour bar
    shown = [np.asarray(ax.images[0].get_array()) for ax in fig.axes[:6]]
    assert np.allclose(shown[0], images[0]) and np.allclose(shown[1], images[1])  # the inputs, in column order
    assert all(np.allclose(shown[k], images[k % 2]) for k in range(2, 6))  # every map is drawn over its own image
    overlay = np.asarray(fig.axes[2].images[1].get_array())
    assert overlay.shape == (32, 32) and np.ptp(overlay) > 0  # the map itself, upsampled to the image
    fig = P.plot_pos_embed_similarity(V.pos_embed_similarity(torch.randn(1, 17, 8)))
    assert len(fig.axes) == 2
    comps, explained = V.patch_filter_pca(torch.randn(16, 3, 4, 4))
    fig = P.plot_patch_filters(comps, explained, raw=torch.randn(7, 3, 4, 4))
    assert len(fig.axes) == len(comps) + 7


def test_grad_rollout_equals_an_independent_finite_difference_computation():
    """Gradient-weighted rollout on a tiny model against a computation that shares nothing with the library but
    the model: ∂logit/∂A by central finite differences through a hook that perturbs one attention entry, then
    the formula (mean over heads of A ⊙ max(∂y/∂A, 0); (Ā + I)/2 row-normalised; product; CLS row) in numpy."""
    torch.manual_seed(0)
    model = vit.VisionTransformer(vit.get_config("testing", num_layers=2)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    target = 3
    maps = V.attention_maps(model, x, method="grad-rollout", target=target)

    with vit.record_attention(model) as attn:
        model(x)
    attn = [a[0].numpy() for a in attn]  # (H, N, N) per layer
    eps, grads = 1e-6, []
    for layer, a in enumerate(attn):
        g = np.zeros_like(a)
        softmax = model.blocks[layer].attn.softmax
        for idx in np.ndindex(*a.shape):
            values = []
            for sign in (1, -1):
                def nudge(_m, _i, out, idx=idx, sign=sign):
                    out = out.clone()
                    out[(0, *idx)] += sign * eps
                    return out
                h = softmax.register_forward_hook(nudge)
                with torch.no_grad(), vit.record_attention(model):
                    values.append(model(x)[0, target].item())
                h.remove()
            g[idx] = (values[0] - values[1]) / (2 * eps)
        grads.append(g)
    r = None
    for a, g in zip(attn, grads):
        fused = (a * np.maximum(g, 0)).mean(0)
        fused = (fused + np.eye(len(fused))) / 2
        fused /= fused.sum(-1, keepdims=True)
        r = fused if r is None else fused @ r
    expected = r[0, 1:].reshape(4, 4)
    np.testing.assert_allclose(maps.rollout[0].numpy(), expected / expected.max(), atol=1e-5)
    plain = V.attention_maps(model, x)  # the class-agnostic rollout is a different map
    assert not np.allclose(plain.rollout.numpy(), maps.rollout.numpy(), atol=1e-3)
