"""One function from a run's data and options to its transforms (timm's ``transforms_factory`` idea).

Which transform a batch gets depends on what the images are, said once here:

* ``"fixed"``: small images of one size (CIFAR, Fashion-MNIST, VTAB-1k's stored 224²): squash to S × S; training
  pads by S / 8, crops at random and flips (the classic small-image recipe);
* ``"photos"``: images of any size (image folders, CSV lists): training takes timm's RandomResizedCrop + flip,
  evaluation resizes the shorter side to S / crop_pct and takes the centre S × S;
* ``"stored"``: images stored at a fixed ``stored``² larger than S (the official FGVC pipeline's 256²): training
  takes an S × S window at a random whole-pixel offset (whatever ``crop`` says: the official pipeline always
  crops) + flip (torchvision's RandomCrop), evaluation the centre window (crop_pct = S / stored).

With ``augment`` False (for "fixed" and "photos" also with neither ``crop`` nor ``flip``), training uses the
evaluation transform itself.
"""

from __future__ import annotations

from typing import Sequence

from .transforms import CROP_PCT, RRC_SCALE, BatchTransform

KINDS = ("fixed", "photos", "stored")


def create_eval_transform(image_size: int, kind: str, stored: int | None = None, crop_pct: float = CROP_PCT,
                          mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5) -> BatchTransform:
    """The evaluation transform for images of ``kind`` (see the module docstring)."""
    _check(kind, stored)
    if kind == "stored":
        return BatchTransform(image_size, train=False, resize="center", crop_pct=image_size / stored, mean=mean, std=std)
    if kind == "photos":
        return BatchTransform(image_size, train=False, resize="center", crop_pct=crop_pct, mean=mean, std=std)
    return BatchTransform(image_size, train=False, mean=mean, std=std)


def create_transforms(image_size: int, kind: str, stored: int | None = None, augment: bool = True,
                      crop: bool = True, flip: bool = True, crop_scale: tuple[float, float] = RRC_SCALE,
                      crop_pct: float = CROP_PCT, mean: float | Sequence[float] = 0.5,
                      std: float | Sequence[float] = 0.5) -> tuple[BatchTransform, BatchTransform]:
    """(training transform, evaluation transform) for images of ``kind`` (see the module docstring)."""
    _check(kind, stored)
    eval_tf = create_eval_transform(image_size, kind, stored, crop_pct, mean, std)
    if kind == "stored":  # the official RLRR pipeline (RLRRDatasets/fgvc_tranforms.py): always its random window
        if not augment:
            return eval_tf, eval_tf
        return BatchTransform(image_size, train=True, crop="random", flip=flip, mean=mean, std=std), eval_tf
    if not (augment and (crop or flip)):
        return eval_tf, eval_tf
    if kind == "photos":
        train_tf = BatchTransform(image_size, train=True, crop="resized" if crop else "pad",
                                  crop_padding=None if crop else 0, flip=flip, resize="center", scale=crop_scale,
                                  crop_pct=crop_pct, mean=mean, std=std)
    else:
        train_tf = BatchTransform(image_size, train=True, crop_padding=None if crop else 0, flip=flip, mean=mean,
                                  std=std)
    return train_tf, eval_tf


def _check(kind: str, stored: int | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (kind == "stored") != (stored is not None):
        raise ValueError(f"kind 'stored' needs the stored side (and only it), got kind={kind!r}, stored={stored}")
