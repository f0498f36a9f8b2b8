"""Batch transforms that run on the training device: uint8 (B, H, W, C) in, normalised float32 (B, 3, S, S) out.

Doing augmentation on whole batches on the GPU keeps the data pipeline out of the way without worker processes:
one resampling call per batch, all randomness drawn from a torch.Generator so a seed reproduces an epoch exactly.

Two families, chosen by the data:

* fixed-size images (CIFAR, Fashion-MNIST, VTAB-1k's stored 224²): ``resize="squash"`` to S × S, and in training
  the classic small-image recipe ``crop="pad"`` (reflect-pad, random crop, random flip);
* photos of any size (image folders, CSV lists), read as a padded canvas plus each image's (h, w):
  ``crop="resized"``, timm's RandomResizedCrop (area scale and log-uniform aspect ratio, ten tries, then the
  whole image clipped to the ratio range) with a random flip, and ``resize="center"`` for evaluation, timm's
  resize-shorter-side-to-S/crop_pct and centre crop. One batched bilinear resampling (two gathers, a box per
  sample) rather than a loop over images; the aspect ratio is never distorted. The sampling positions are clamped
  to each image's own pixels, so the padding of the canvas never leaks in. No antialiasing: the decode cache
  stores photos at about S / crop_pct, so a crop is shrunk by at most ~1.5×;
* images stored larger than S at a fixed size (the official FGVC pipeline's 256²): ``crop="random"``, an S × S
  window at a uniform whole-pixel offset (torchvision's RandomCrop) plus flip, and ``resize="center"`` with
  crop_pct = S / 256 for the centre crop; whole-pixel boxes of side S copy pixels exactly.

Inputs are normalised with mean = std = 0.5 by default, the convention of Google's ViT checkpoints. Which of
these a run uses is chosen in one place, :mod:`loaders.transforms_factory`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")
PADDING_MODES = ("reflect", "zeros")
# training crops: pad + random crop (small fixed-size images) | random resized crop (photos) | random S × S window
# at whole-pixel offsets, no padding (torchvision's RandomCrop: the official FGVC pipeline's 224 from 256²)
CROPS = ("pad", "resized", "random")
RESIZES = ("squash", "center")  # evaluation: stretch to S x S | shorter side to S / crop_pct, centre crop S x S
RRC_SCALE, RRC_RATIO, CROP_PCT = (0.08, 1.0), (3 / 4, 4 / 3), 0.875  # timm's defaults (timm/data/transforms*.py)
_RRC_TRIES = 10  # timm's RandomResizedCrop.get_params tries ten boxes before falling back


def _per_channel(value: float | Sequence[float], what: str) -> tuple[float, float, float]:
    vals = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(vals) != 3:
        raise ValueError(f"{what} must be a number or 3 numbers (R, G, B), got {value!r}")
    return vals


def _bilinear(canvas: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Sample a uint8 canvas (B, Hc, Wc, C) at rows ys (B, S) × columns xs (B, S) (pixel coordinates, float64,
    inside each image) → float32 (B, C, S, S) in [0, 1]. Four uint8 gathers of the corner pixels, then two linear
    blends: only the output's pixels are ever converted to float, never the whole canvas. Weights come from
    float64 positions, so a whole-pixel position returns that pixel exactly."""
    B, Hc, Wc, _ = canvas.shape
    y0, x0 = ys.floor().long(), xs.floor().long()
    y1, x1 = (y0 + 1).clamp_max(Hc - 1), (x0 + 1).clamp_max(Wc - 1)
    wy = (ys - y0).float()[:, :, None, None]  # (B, S, 1, 1)
    wx = (xs - x0).float()[:, None, :, None]  # (B, 1, S, 1)
    b = torch.arange(B, device=canvas.device)[:, None, None]
    at = lambda yi, xi: canvas[b, yi[:, :, None], xi[:, None, :]].float()  # noqa: E731  (B, S, S, C)
    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return (top * (1 - wy) + bottom * wy).div_(255).permute(0, 3, 1, 2)


def _draw(n: int, shape: tuple, generator, rows, device, dtype=torch.float64) -> torch.Tensor:
    """Uniform [0, 1) numbers for all ``n`` rows of a global batch, from the generator on its own device; this
    process's rows (``rows`` = (start, stop, n)) moved to ``device``."""
    start, stop, _ = rows
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, *shape, generator=generator, device=dev, dtype=dtype)[start:stop].to(device)


class BoxSampler:
    """A crop: one source box (y0, x0, h, w) in pixels of each image and a horizontal flip per image. Every
    crop below is one of these; the resampling that follows is the same for all (:meth:`BatchTransform._resample`)."""

    flip = False

    def __call__(self, h: torch.Tensor, w: torch.Tensor, generator: torch.Generator | None,
                 rows: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must define __call__: the boxes and the flips")

    def _flips(self, h: torch.Tensor, generator, rows) -> torch.Tensor:
        if not self.flip:
            return torch.zeros(len(h), dtype=torch.bool, device=h.device)
        return _draw(rows[2], (), generator, rows, h.device, torch.float32) < 0.5


class WholeImage(BoxSampler):
    """The whole image, stretched to S × S ("squash")."""

    def __call__(self, h, w, generator=None, rows=None):
        return torch.stack([torch.zeros_like(h), torch.zeros_like(w), h, w], 1), self._flips(h, None, rows)


class CenterCrop(BoxSampler):
    """timm's evaluation crop: the centred square of side min(h, w) · S / floor(S / crop_pct), at whole-pixel
    offsets as timm's CenterCrop rounds them (a stored 256 px side gives the exact centre 224 pixels)."""

    def __init__(self, image_size: int, crop_pct: float = CROP_PCT):
        self.image_size, self.crop_pct = image_size, crop_pct

    def __call__(self, h, w, generator=None, rows=None):
        side = torch.minimum(h, w) * self.image_size / math.floor(self.image_size / self.crop_pct + 1e-9)  # 1e-9: 384/(384/439)
        return torch.stack([torch.round((h - side) / 2), torch.round((w - side) / 2), side, side], 1), \
            self._flips(h, None, rows)


class RandomResizedCrop(BoxSampler):
    """timm's RandomResizedCrop with continuous boxes: area scale and log-uniform aspect ratio, ten tries, then the
    whole image clipped to the ratio range, centred; then the flips."""

    def __init__(self, scale: tuple[float, float] = RRC_SCALE, ratio: tuple[float, float] = RRC_RATIO,
                 flip: bool = True):
        self.scale, self.ratio, self.flip = scale, ratio, flip

    def __call__(self, h, w, generator, rows):
        u = _draw(rows[2], (_RRC_TRIES, 4), generator, rows, h.device)
        flips = self._flips(h, generator, rows)
        area = (h * w)[:, None] * (self.scale[0] + u[..., 0] * (self.scale[1] - self.scale[0]))
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        r = torch.exp(lo + u[..., 1] * (hi - lo))
        cw, ch = torch.sqrt(area * r), torch.sqrt(area / r)
        fits = (cw <= w[:, None]) & (ch <= h[:, None])
        pick = fits.double().argmax(1)  # the first box that fits
        take = lambda t: t.gather(1, pick[:, None])[:, 0]  # noqa: E731
        cw, ch, uy, ux = take(cw), take(ch), take(u[..., 2]), take(u[..., 3])
        # no box fits: the whole image, clipped to the ratio range, centred (timm's fallback)
        aspect = w / h
        fw = torch.where(aspect < self.ratio[0], w, torch.where(aspect > self.ratio[1], h * self.ratio[1], w))
        fh = torch.where(aspect < self.ratio[0], w / self.ratio[0], h)
        ok = fits.any(1)
        cw, ch = torch.where(ok, cw, fw), torch.where(ok, ch, fh)
        uy, ux = torch.where(ok, uy, 0.5), torch.where(ok, ux, 0.5)
        return torch.stack([uy * (h - ch), ux * (w - cw), ch, cw], 1), flips


class RandomWindow(BoxSampler):
    """torchvision's RandomCrop: an S × S window at a uniform whole-pixel offset in 0..h-S, then the flips."""

    def __init__(self, image_size: int, flip: bool = True):
        self.image_size, self.flip = image_size, flip

    def __call__(self, h, w, generator, rows):
        u = _draw(rows[2], (2,), generator, rows, h.device)
        flips = self._flips(h, generator, rows)
        side_h, side_w = h.clamp(max=self.image_size), w.clamp(max=self.image_size)
        oy, ox = torch.floor(u[:, 0] * (h - side_h + 1)), torch.floor(u[:, 1] * (w - side_w + 1))
        return torch.stack([oy, ox, side_h, side_w], 1), flips


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
                 interpolation: str = "bilinear", padding_mode: str = "reflect", crop: str = "pad",
                 resize: str = "squash", scale: tuple[float, float] = RRC_SCALE,
                 ratio: tuple[float, float] = RRC_RATIO, crop_pct: float = CROP_PCT):
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
        if crop not in CROPS or resize not in RESIZES:
            raise ValueError(f"crop must be one of {CROPS} and resize one of {RESIZES}, got {crop!r}, {resize!r}")
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]) or not 0 < crop_pct <= 1:
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1, 0 < ratio[0] <= ratio[1] and 0 < crop_pct <= 1, "
                             f"got scale={scale}, ratio={ratio}, crop_pct={crop_pct}")
        self.crop, self.resize = crop, resize
        self.scale, self.ratio, self.crop_pct = tuple(map(float, scale)), tuple(map(float, ratio)), float(crop_pct)
        self._constants: dict = {}
        # the one choice of crop: a box per image (resampled), or for "pad" the whole image then pad-crop-flip
        if self.train and crop == "resized":
            self.sampler: BoxSampler = RandomResizedCrop(self.scale, self.ratio, self.flip)
        elif self.train and crop == "random":
            self.sampler = RandomWindow(self.image_size, self.flip)
        elif resize == "center":
            self.sampler = CenterCrop(self.image_size, self.crop_pct)
        else:
            self.sampler = WholeImage()

    def __repr__(self) -> str:
        return (f"BatchTransform(image_size={self.image_size}, train={self.train}, mean={self.mean}, "
                f"std={self.std}, crop_padding={self.crop_padding}, flip={self.flip}, "
                f"interpolation={self.interpolation!r}, padding_mode={self.padding_mode!r}, crop={self.crop!r}, "
                f"resize={self.resize!r}, scale={self.scale}, ratio={self.ratio}, crop_pct={self.crop_pct})")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 sizes: torch.Tensor | None = None, rows: tuple[int, int, int] | None = None) -> torch.Tensor:
        """``sizes``: (B, 2) true (h, w) of each image inside a padded canvas (None: every image fills it).
        ``rows``: (start, stop, n) when ``images`` are rows start:stop of a global batch of n (data parallelism):
        the randomness of all n is drawn, so each rank gets exactly its slice of the one-process batch."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"BatchTransform expects uint8 images (B, H, W, C) with C in {{1, 3}}, got "
                             f"{images.dtype} {tuple(images.shape)}")
        S = self.image_size
        rows = rows or (0, images.shape[0], images.shape[0])
        resample = sizes is not None or not isinstance(self.sampler, WholeImage)
        if resample:
            x = self._resample(images, sizes, generator, rows)  # (B, C, S, S) in [0, 1]
        else:
            x = images.permute(0, 3, 1, 2).float().div_(255)  # (B, C, H, W) in [0, 1]
            if x.shape[-2:] != (S, S):
                x = self._resize(x)
        if self.train and self.crop == "pad" and (self.crop_padding > 0 or self.flip):
            x = self._crop_and_flip(x, generator, rows)
        x = x.expand(-1, 3, -1, -1)  # greyscale -> 3 equal channels; no-op for RGB
        mean, std = self._normalisers(x.device)
        return ((x - mean) / std).contiguous()

    def _normalisers(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (1, 3, 1, 1) tensors, built once per device (no host-to-device copy per batch)."""
        key = str(device)
        if key not in self._constants:
            self._constants[key] = (torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                                    torch.tensor(self.std, device=device).view(1, 3, 1, 1))
        return self._constants[key]

    # -- one box per image, one resampling per batch -----------------------------------------------------------
    def boxes(self, sizes: torch.Tensor, generator: torch.Generator | None = None,
              rows: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Source boxes (B, 4) float64 (y0, x0, h, w) in pixels of each image, and flips (B,) bool: this
        transform's :class:`BoxSampler` (``self.sampler``)."""
        h, w = sizes[:, 0].double(), sizes[:, 1].double()  # on the device of sizes: no host synchronisation
        return self.sampler(h, w, generator, rows or (0, len(h), len(h)))

    def _resample(self, x: torch.Tensor, sizes, generator, rows) -> torch.Tensor:
        B, Hc, Wc, _ = x.shape  # the uint8 canvas
        if sizes is None:
            sizes = torch.tensor([[Hc, Wc]], dtype=torch.int64).expand(B, 2)
        sizes = sizes.to(x.device, non_blocking=True)
        boxes, flips = self.boxes(sizes, generator, rows)
        S = self.image_size
        j = (torch.arange(S, dtype=torch.float64, device=x.device) + 0.5) / S  # output pixel centres, box fractions
        jx = torch.where(flips[:, None], 1 - j, j)  # a flipped sample reads its box right to left
        ys = boxes[:, 0:1] + j * boxes[:, 2:3] - 0.5  # (B, S) source rows in pixel coordinates
        xs = boxes[:, 1:2] + jx * boxes[:, 3:4] - 0.5
        ys = torch.minimum(ys.clamp_min(0), (sizes[:, 0:1] - 1).double())  # stay on the image's own pixels
        xs = torch.minimum(xs.clamp_min(0), (sizes[:, 1:2] - 1).double())
        if self.interpolation == "nearest":
            ys, xs = ys.round(), xs.round()
        return _bilinear(x, ys, xs)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        S, mode = self.image_size, self.interpolation
        smooth = mode in ("bilinear", "bicubic")
        antialias = smooth and (x.shape[-2] > S or x.shape[-1] > S)
        x = F.interpolate(x, size=(S, S), mode=mode, align_corners=False if smooth else None, antialias=antialias)
        return x.clamp_(0, 1) if mode == "bicubic" else x  # bicubic overshoots

    def _crop_and_flip(self, x: torch.Tensor, generator: torch.Generator | None, rows) -> torch.Tensor:
        B, _, S, _ = x.shape
        p = self.crop_padding
        start, stop, n = rows
        rng_device = generator.device if generator is not None else torch.device("cpu")
        if p > 0:
            offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator, device=rng_device)[start:stop]
            offsets = offsets.to(x.device)
            x = F.pad(x, (p, p, p, p), mode="reflect" if self.padding_mode == "reflect" else "constant")
        else:
            offsets = torch.zeros(B, 2, dtype=torch.int64, device=x.device)
        if self.flip:
            flips = (torch.rand(n, generator=generator, device=rng_device) < 0.5)[start:stop].to(x.device)
        else:
            flips = torch.zeros(B, dtype=torch.bool, device=x.device)
        ar = torch.arange(S, device=x.device)
        rows = offsets[:, 0, None] + ar  # (B, S) source row of each output row
        cols = offsets[:, 1, None] + torch.where(flips[:, None], S - 1 - ar, ar)  # (B, S), reversed if flipped
        b = torch.arange(B, device=x.device)[:, None, None]
        out = x[b, :, rows[:, :, None], cols[:, None, :]]  # advanced indices around ":" -> (B, S, S, C)
        return out.permute(0, 3, 1, 2)
