"""BatchTransform: exact eval path, resize, greyscale, flips as exact mirrors, crops as exact windows of the padded
image, determinism under a seeded generator."""

import numpy as np
import pytest
import torch
from PIL import Image

from loaders.transforms import BatchTransform


def rand_images(b, h, w, c, seed=0):
    return torch.randint(0, 256, (b, h, w, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference_eval(images: torch.Tensor, mean=0.5, std=0.5) -> np.ndarray:
    """Independent float64 reference for the no-resize eval path: (x / 255 - mean) / std, channels first."""
    x = images.numpy().astype(np.float64) / 255.0
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return ((x - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)).transpose(0, 3, 1, 2)


def test_eval_identity_size_is_exact_normalisation():
    x = rand_images(5, 16, 16, 3)
    out = BatchTransform(16, train=False)(x)
    assert out.shape == (5, 3, 16, 16) and out.dtype == torch.float32 and out.device == x.device
    assert out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), reference_eval(x), rtol=0, atol=1e-6)
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = BatchTransform(16, train=False, mean=mean, std=std)(x)
    np.testing.assert_allclose(out.numpy(), reference_eval(x, mean, std), rtol=0, atol=1e-5)


def test_greyscale_becomes_three_equal_channels():
    g = rand_images(4, 12, 12, 1)
    for train in (False, True):
        out = BatchTransform(12, train=train)(g, torch.Generator().manual_seed(0))
        assert out.shape == (4, 3, 12, 12)
        assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    out = BatchTransform(12, train=False)(g)
    np.testing.assert_allclose(out.numpy(), reference_eval(g), atol=1e-6)
    # same as feeding the RGB image with the grey value repeated
    rgb = g.expand(-1, -1, -1, 3).contiguous()
    assert torch.allclose(BatchTransform(24, train=False)(g), BatchTransform(24, train=False)(rgb))


def test_resize_up_and_down():
    x = rand_images(3, 8, 8, 3)
    up = BatchTransform(16, train=False, interpolation="nearest")(x)
    ref = reference_eval(x).repeat(2, axis=2).repeat(2, axis=3)  # nearest x2 = each pixel as a 2x2 block
    np.testing.assert_allclose(up.numpy(), ref, atol=1e-6)
    # a constant image stays constant when shrunk
    const = torch.full((2, 32, 32, 3), 200, dtype=torch.uint8)
    down = BatchTransform(16, train=False)(const)
    np.testing.assert_allclose(down.numpy(), (200 / 255 - 0.5) / 0.5, atol=1e-5)
    # antialiased bilinear shrinking agrees with PIL's bilinear resize (run in float mode "F") per channel
    big = rand_images(2, 16, 12, 3, seed=4)
    small = BatchTransform(8, train=False)(big)
    pil = np.stack([np.stack([np.asarray(Image.fromarray(big[b, :, :, c].numpy().astype(np.float32) / 255, "F")
                                         .resize((8, 8), Image.BILINEAR)) for c in range(3)]) for b in range(2)])
    np.testing.assert_allclose(small.numpy(), (pil - 0.5) / 0.5, atol=1e-5)
    # non-square inputs are stretched to S x S
    assert BatchTransform(10, train=False)(rand_images(2, 6, 14, 3)).shape == (2, 3, 10, 10)


def test_flip_is_exact_mirror_for_about_half():
    x = rand_images(400, 8, 8, 3)
    plain = BatchTransform(8, train=False)(x)
    out = BatchTransform(8, train=True, crop_padding=0, flip=True)(x, torch.Generator().manual_seed(1))
    same = (out == plain).flatten(1).all(1)
    mirrored = (out == plain.flip(-1)).flatten(1).all(1)
    assert bool((same ^ mirrored).all())  # each sample is exactly one of the two (random images aren't symmetric)
    assert 0.4 < float(mirrored.float().mean()) < 0.6
    no_flip = BatchTransform(8, train=True, crop_padding=0, flip=False)(x, torch.Generator().manual_seed(1))
    assert torch.equal(no_flip, plain)


def _windows(padded: np.ndarray, S: int):
    """All S x S windows of a (C, H+2p, W+2p) array, keyed by (dy, dx)."""
    n = padded.shape[-1] - S + 1
    return {(dy, dx): padded[:, dy:dy + S, dx:dx + S] for dy in range(n) for dx in range(n)}


@pytest.mark.parametrize("padding_mode,np_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_crop_is_a_window_of_the_padded_image(padding_mode, np_mode):
    S, p, B = 10, 3, 64
    x = rand_images(B, S, S, 3, seed=2)
    t = BatchTransform(S, train=True, crop_padding=p, flip=True, padding_mode=padding_mode)
    out = t(x, torch.Generator().manual_seed(5)).numpy()
    base = (x.numpy().astype(np.float64) / 255).transpose(0, 3, 1, 2)
    offsets, flips = set(), 0
    for i in range(B):
        padded = np.pad(base[i], ((0, 0), (p, p), (p, p)), mode=np_mode)
        expected = {}
        for key, win in _windows(padded, S).items():
            expected[key + (False,)] = (win - 0.5) / 0.5
            expected[key + (True,)] = (win[:, :, ::-1] - 0.5) / 0.5
        hits = [k for k, v in expected.items() if np.allclose(out[i], v, rtol=0, atol=1e-6)]
        assert len(hits) == 1, (i, hits)
        offsets.add(hits[0][:2])
        flips += hits[0][2]
    assert len(offsets) > 15  # 49 possible offsets, 64 samples: drawn per sample, not one per batch
    assert {o[0] for o in offsets} == {o[1] for o in offsets} == set(range(2 * p + 1))  # 0..2p, both ends drawn
    assert 0 < flips < B


def test_random_window_draws_every_whole_pixel_offset_and_copies_pixels_exactly():
    """crop="random" (torchvision's RandomCrop, the official FGVC pipeline): an S x S window of a stored image at a
    uniform offset in 0..H-S on each axis, both ends included; whole-pixel boxes copy the pixels exactly."""
    S, side, B = 8, 12, 64
    x = rand_images(B, side, side, 3, seed=3)
    t = BatchTransform(S, train=True, crop="random", flip=False, mean=0, std=1)
    out = t(x, torch.Generator().manual_seed(7)).numpy()
    base = (x.numpy().astype(np.float64) / 255).transpose(0, 3, 1, 2)
    offsets = []
    for i in range(B):
        hits = [k for k, win in _windows(base[i], S).items() if np.allclose(out[i], win, rtol=0, atol=1e-6)]
        assert len(hits) == 1, (i, hits)
        offsets.append(hits[0])
    assert {o[0] for o in offsets} == {o[1] for o in offsets} == set(range(side - S + 1))  # 0..4, both ends


def test_default_padding_and_errors():
    assert BatchTransform(32, True).crop_padding == 4 and BatchTransform(224, True).crop_padding == 28
    with pytest.raises(ValueError, match="reflect"):
        BatchTransform(4, True, crop_padding=4)
    BatchTransform(4, True, crop_padding=4, padding_mode="zeros")
    with pytest.raises(ValueError, match="interpolation"):
        BatchTransform(8, True, interpolation="lanczos")
    with pytest.raises(ValueError, match="uint8"):
        BatchTransform(8, False)(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="uint8"):
        BatchTransform(8, False)(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_same_seed_same_output():
    x = rand_images(16, 12, 12, 3)
    t = BatchTransform(16, train=True)
    a = t(x, torch.Generator().manual_seed(0))
    b = t(x, torch.Generator().manual_seed(0))
    c = t(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(t(x, g), t(x, g))  # the generator advances
    assert t(x).shape == (16, 3, 16, 16)  # global RNG when no generator is given


def test_batch_stream_feeds_the_transform():
    from loaders.datasets import ImageDataset
    from loaders.datasets.stream import BatchStream

    ds = ImageDataset(rand_images(10, 8, 8, 1), torch.arange(10) % 2, ["even", "odd"], "toy")
    t = BatchTransform(8, train=True)
    seen = 0
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    for batch in BatchStream(ds, order.split(4), "cpu"):
        out = t(batch.images, torch.Generator().manual_seed(seen), batch.sizes, batch.rows)
        assert out.shape == (len(batch.labels), 3, 8, 8)
        seen += len(batch.labels)
    assert seen == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = rand_images(32, 20, 20, 3)
    for train in (False, True):
        t = BatchTransform(16, train=train)
        cpu = t(x, torch.Generator().manual_seed(3))
        gpu = t(x.cuda(), torch.Generator().manual_seed(3))
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


def test_the_factory_gives_each_kind_its_crops_and_no_augmentation_the_evaluation_pixels():
    from loaders.transforms import CenterCrop, RandomResizedCrop, RandomWindow, WholeImage
    from loaders.transforms_factory import create_transforms

    for kind, stored, train_box, eval_box in (("fixed", None, WholeImage, WholeImage),
                                               ("photos", None, RandomResizedCrop, CenterCrop),
                                               ("stored", 40, RandomWindow, CenterCrop)):
        train, ev = create_transforms(32, kind, stored)
        assert isinstance(train.sampler, train_box) and isinstance(ev.sampler, eval_box) and train.train, kind
        x = rand_images(4, 40, 40, 3)
        sizes = torch.tensor([[40, 40], [40, 31], [33, 40], [40, 40]])
        for off in (dict(augment=False), dict(crop=False, flip=False)):
            plain, ev = create_transforms(32, kind, stored, **off)
            if kind == "stored" and "crop" in off:
                continue  # the official FGVC pipeline crops whatever --crop says
            assert torch.equal(plain(x, torch.Generator().manual_seed(0), sizes), ev(x, sizes=sizes)), (kind, off)
    assert create_transforms(32, "fixed")[0].crop_padding == 4  # pad by S / 8
    with pytest.raises(ValueError, match="stored side"):
        create_transforms(32, "stored")
    with pytest.raises(ValueError, match="kind"):
        create_transforms(32, "squash")
