"""Batch transforms that run on the training device: uint8 (B, H, W, C) in, normalised float32 (B, 3, S, S) out.

Doing augmentation on whole batches on the GPU keeps the data pipeline out of the way without worker processes:
one resize, one pad and one gather per batch, all randomness drawn from a torch.Generator so a seed reproduces an
epoch exactly. Train mode is the classic small-image recipe (pad + random crop, random horizontal flip); eval mode
only resizes. Inputs are normalised with mean = std = 0.5 by default, the convention of Google's ViT checkpoints.

`iterate_batches` (defined in loaders.datasets) is re-exported here for convenience.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .datasets import count_batches, iterate_batches, shard_indices  # noqa: F401  (re-exported)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")
PADDING_MODES = ("reflect", "zeros")


def _per_channel(value: float | Sequence[float], what: str) -> tuple[float, float, float]:
    vals = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(vals) != 3:
        raise ValueError(f"{what} must be a number or 3 numbers (R, G, B), got {value!r}")
    return vals


class BatchTransform:
    """uint8 images (B, H, W, C), C in {1, 3}, on any device -> float32 (B, 3, S, S) on the same device.

    Steps: scale to [0, 1], channels first, resize to S x S if needed (F.interpolate; antialiased when shrinking
    with bilinear/bicubic; non-square inputs are stretched), then in train mode a random crop and a random
    horizontal flip per sample, greyscale repeated to 3 channels, and finally (x - mean) / std.

    The random crop pads the resized image by `crop_padding` pixels on each side (default S // 8, e.g. 4 for
    32 px; 0 disables the crop) and cuts an S x S window at a uniformly random offset in [0, 2 * crop_padding]^2.
    `padding_mode` "reflect" (default) mirrors the border, so shifted images show no artificial black frame;
    "zeros" pads with black (0 before normalisation), the original CIFAR recipe. Each sample is flipped with
    probability 1/2 when `flip`. Crop and flip are one vectorised gather, no loop over the batch.

    Randomness: offsets (B, 2) are drawn first, then flips (B,), from `generator` (on the generator's device,
    then moved), so the same seed gives the same batch on CPU and GPU.
    """

    def __init__(self, image_size: int, train: bool, mean: float | Sequence[float] = 0.5,
                 std: float | Sequence[float] = 0.5, crop_padding: int | None = None, flip: bool = True,
                 interpolation: str = "bilinear", padding_mode: str = "reflect"):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.mean = _per_channel(mean, "mean")
        self.std = _per_channel(std, "std")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must be non-zero, got {std!r}")
        self.crop_padding = self.image_size // 8 if crop_padding is None else int(crop_padding)
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if padding_mode == "reflect" and self.crop_padding >= self.image_size:
            raise ValueError(f"reflect padding needs crop_padding < image_size, got {self.crop_padding} >= "
                             f"{self.image_size}; use padding_mode='zeros' or a smaller crop_padding")
        self.flip = bool(flip)
        self.interpolation = interpolation
        self.padding_mode = padding_mode

    def __repr__(self) -> str:
        return (f"BatchTransform(image_size={self.image_size}, train={self.train}, mean={self.mean}, "
                f"std={self.std}, crop_padding={self.crop_padding}, flip={self.flip}, "
                f"interpolation={self.interpolation!r}, padding_mode={self.padding_mode!r})")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"BatchTransform expects uint8 images (B, H, W, C) with C in {{1, 3}}, got "
                             f"{images.dtype} {tuple(images.shape)}")
        S = self.image_size
        x = images.permute(0, 3, 1, 2).float().div_(255)  # (B, C, H, W) in [0, 1]
        if x.shape[-2:] != (S, S):
            x = self._resize(x)
        if self.train and (self.crop_padding > 0 or self.flip):
            x = self._crop_and_flip(x, generator)
        x = x.expand(-1, 3, -1, -1)  # greyscale -> 3 equal channels; no-op for RGB
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        S, mode = self.image_size, self.interpolation
        smooth = mode in ("bilinear", "bicubic")
        antialias = smooth and (x.shape[-2] > S or x.shape[-1] > S)
        x = F.interpolate(x, size=(S, S), mode=mode, align_corners=False if smooth else None, antialias=antialias)
        return x.clamp_(0, 1) if mode == "bicubic" else x  # bicubic overshoots

    def _crop_and_flip(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        B, _, S, _ = x.shape
        p = self.crop_padding
        rng_device = generator.device if generator is not None else torch.device("cpu")
        if p > 0:
            offsets = torch.randint(0, 2 * p + 1, (B, 2), generator=generator, device=rng_device).to(x.device)
            x = F.pad(x, (p, p, p, p), mode="reflect" if self.padding_mode == "reflect" else "constant")
        else:
            offsets = torch.zeros(B, 2, dtype=torch.int64, device=x.device)
        if self.flip:
            flips = (torch.rand(B, generator=generator, device=rng_device) < 0.5).to(x.device)
        else:
            flips = torch.zeros(B, dtype=torch.bool, device=x.device)
        ar = torch.arange(S, device=x.device)
        rows = offsets[:, 0, None] + ar  # (B, S) source row of each output row
        cols = offsets[:, 1, None] + torch.where(flips[:, None], S - 1 - ar, ar)  # (B, S), reversed if flipped
        b = torch.arange(B, device=x.device)[:, None, None]
        out = x[b, :, rows[:, :, None], cols[:, None, :]]  # advanced indices around ":" -> (B, S, S, C)
        return out.permute(0, 3, 1, 2)
