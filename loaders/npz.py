"""Google's ViT ``.npz`` checkpoints ⇄ :class:`vit.VisionTransformer`, driven by one table.

Reference: google-research/vision_transformer (``vit_jax/checkpoint.py`` writes and reads these files).
A checkpoint is a flat ``.npz`` archive of float32 arrays keyed by Flax parameter paths joined with "/",
for example ``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel``. Each key maps to
exactly one PyTorch tensor; what differs is the memory layout, which a named *converter* fixes:

    dense         Flax Dense kernel (in, out)            ⇄ nn.Linear weight (out, in)
    attn_in       q/k/v kernel split per head (D, H, Dh)  ⇄ nn.Linear weight (H*Dh, D)
    attn_in_bias  q/k/v bias (H, Dh)                     ⇄ (H*Dh,)
    attn_out      out kernel (H, Dh, D)                   ⇄ nn.Linear weight (D, H*Dh)
    conv          patch kernel HWIO (P, P, C, D)          ⇄ nn.Conv2d weight OIHW (D, C, P, P)
    as_is         the same array (biases, LayerNorm scale/bias, cls, pos_embedding)

Every converter is an einops pattern; reading it right to left gives the inverse, so the table below drives
both :func:`load_npz` and :func:`save_npz`, and a save → load round trip is bit-exact.
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from .atomic import atomic_write
from vit import VisionTransformer, ViTConfig, resample_pos_embed

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "Converter", "CONVERTERS", "checkpoint_table", "read_npz", "infer_config",
           "load_npz", "save_npz", "params_to_model", "model_to_params"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message names file and keys."""


# ── converters ───────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class Converter:
    """A layout change written as an einops pattern from the npz layout to the PyTorch layout."""

    name: str
    pattern: str  # "npz axes -> torch axes"; letters: d hidden, h heads, k head dim, i/o in/out, p/q patch

    @property
    def inverse_pattern(self) -> str:
        npz, torch_ = self.pattern.split("->")
        return f"{torch_.strip()} -> {npz.strip()}"

    def _axes(self, num_heads: int) -> dict:
        return {"h": num_heads} if re.search(r"\bh\b", self.pattern) else {}

    def to_torch(self, array, num_heads: int):
        return rearrange(array, self.pattern, **self._axes(num_heads))

    def to_npz(self, tensor, num_heads: int):
        return rearrange(tensor, self.inverse_pattern, **self._axes(num_heads))

    def npz_shape(self, torch_shape, num_heads: int) -> tuple[int, ...]:
        """The shape a checkpoint array must have to become a tensor of ``torch_shape`` (no memory used)."""
        meta = torch.empty(torch_shape, device="meta")
        return tuple(self.to_npz(meta, num_heads).shape)


dense = Converter("dense", "i o -> o i")
attn_in = Converter("attn_in", "d h k -> (h k) d")
attn_in_bias = Converter("attn_in_bias", "h k -> (h k)")
attn_out = Converter("attn_out", "h k d -> d (h k)")
conv = Converter("conv", "p q i o -> o i p q")  # HWIO -> OIHW
as_is = Converter("as_is", "... -> ...")
CONVERTERS = {c.name: c for c in (dense, attn_in, attn_in_bias, attn_out, conv, as_is)}


# ── the table: (PyTorch name, npz key, converter) ───────────────────────────────────────────────────────

_BLOCK = "Transformer/encoderblock_{i}"
_ATTN = _BLOCK + "/MultiHeadDotProductAttention_1"
_MLP = _BLOCK + "/MlpBlock_3"

EMBEDDING_ROWS = [
    ("patch_embed.weight", "embedding/kernel", conv),
    ("patch_embed.bias", "embedding/bias", as_is),
    ("cls_token", "cls", as_is),
    ("pos_embed", "Transformer/posembed_input/pos_embedding", as_is),
]
BLOCK_ROWS = [  # repeated for i = 0 .. num_layers-1
    ("blocks.{i}.norm1.weight", _BLOCK + "/LayerNorm_0/scale", as_is),
    ("blocks.{i}.norm1.bias", _BLOCK + "/LayerNorm_0/bias", as_is),
    ("blocks.{i}.attn.q.weight", _ATTN + "/query/kernel", attn_in),
    ("blocks.{i}.attn.q.bias", _ATTN + "/query/bias", attn_in_bias),
    ("blocks.{i}.attn.k.weight", _ATTN + "/key/kernel", attn_in),
    ("blocks.{i}.attn.k.bias", _ATTN + "/key/bias", attn_in_bias),
    ("blocks.{i}.attn.v.weight", _ATTN + "/value/kernel", attn_in),
    ("blocks.{i}.attn.v.bias", _ATTN + "/value/bias", attn_in_bias),
    ("blocks.{i}.attn.proj.weight", _ATTN + "/out/kernel", attn_out),
    ("blocks.{i}.attn.proj.bias", _ATTN + "/out/bias", as_is),
    ("blocks.{i}.norm2.weight", _BLOCK + "/LayerNorm_2/scale", as_is),
    ("blocks.{i}.norm2.bias", _BLOCK + "/LayerNorm_2/bias", as_is),
    ("blocks.{i}.mlp.fc1.weight", _MLP + "/Dense_0/kernel", dense),
    ("blocks.{i}.mlp.fc1.bias", _MLP + "/Dense_0/bias", as_is),
    ("blocks.{i}.mlp.fc2.weight", _MLP + "/Dense_1/kernel", dense),
    ("blocks.{i}.mlp.fc2.bias", _MLP + "/Dense_1/bias", as_is),
]
FINAL_NORM_ROWS = [
    ("norm.weight", "Transformer/encoder_norm/scale", as_is),
    ("norm.bias", "Transformer/encoder_norm/bias", as_is),
]
PRE_LOGITS_ROWS = [  # only in the original ImageNet-21k files (representation_size set)
    ("pre_logits.weight", "pre_logits/kernel", dense),
    ("pre_logits.bias", "pre_logits/bias", as_is),
]
HEAD_ROWS = [
    ("head.weight", "head/kernel", dense),
    ("head.bias", "head/bias", as_is),
]


def checkpoint_table(config: ViTConfig) -> list[tuple[str, str, Converter]]:
    """Every (PyTorch name, npz key, converter) row for a model with this config, in file order."""
    rows = list(EMBEDDING_ROWS)
    for i in range(config.num_layers):
        rows += [(t.format(i=i), k.format(i=i), c) for t, k, c in BLOCK_ROWS]
    rows += FINAL_NORM_ROWS
    if config.representation_size:
        rows += PRE_LOGITS_ROWS
    return rows + HEAD_ROWS


# ── reading files ────────────────────────────────────────────────────────────────────────────────────────

TARGET_PREFIX = "opt/target/"  # Flax optimizer exports keep the parameters under this path


def _describe_non_npz(path: Path, head: bytes) -> str | None:
    """What a file that is not an .npz archive looks like, from its first bytes (None: it is a zip)."""
    if not head:
        return "it is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return None
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array, not an .npz archive of named arrays"
    if head[:1] == b"\x80":
        return ("it is a Python pickle (perhaps a legacy torch.save file); pickles are never loaded here, "
                "use torch.load(..., weights_only=True) for PyTorch files")
    text = head.decode("utf-8", errors="replace")
    if text.startswith("version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights: run `git lfs pull` or download the real file"
    if text.lstrip().lower().startswith(("<!doctype html", "<html", "<?xml")):
        return "it is an HTML/XML page (an error page saved by a failed download?)"
    if all(ch.isprintable() or ch in "\r\n\t" for ch in text[:64]):
        return f"it is a text file starting with {text[:40]!r}"
    return f"its first bytes {head[:8]!r} are not a zip archive (.npz files start with b'PK')"


def read_npz(path) -> dict[str, np.ndarray]:
    """All arrays of a Google-style ``.npz`` file, keys without an ``opt/target/`` prefix.

    Never unpickles anything. Anything that is not a readable .npz (a missing, empty, truncated or text file,
    a torch.save ``.pt``) raises :class:`CheckpointError` saying which file and what it looks like.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, expected an .npz file")
    with open(path, "rb") as f:
        head = f.read(64)
    problem = _describe_non_npz(path, head)
    if problem:
        raise CheckpointError(f"{path} is not an .npz checkpoint: {problem}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = archive.files
            with zipfile.ZipFile(path) as z:
                members = z.namelist()
            if any(m.endswith("data.pkl") for m in members):
                raise CheckpointError(
                    f"{path} is not an .npz checkpoint: it is a PyTorch torch.save file (a zip holding "
                    "data.pkl); load it with torch.load(..., weights_only=True)")
            not_arrays = [m for m in members if not m.endswith(".npy")]
            if not_arrays:
                raise CheckpointError(f"{path} is a zip archive but not an .npz: members {not_arrays[:5]} "
                                      "are not .npy arrays")
            params = {}
            for name in names:
                try:
                    params[name] = archive[name]
                except ValueError as e:  # object arrays need pickle, which is refused
                    raise CheckpointError(f"{path}: array {name!r} cannot be read without pickle ({e})") from e
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} ({size:,} bytes) looks like a truncated or corrupt .npz/zip file ({type(e).__name__}: {e}); "
            "download it again") from e
    if not params:
        raise CheckpointError(f"{path} is an .npz archive with no arrays in it")
    return _strip_prefix(params, path)


def _strip_prefix(params: dict[str, np.ndarray], source="checkpoint") -> dict[str, np.ndarray]:
    if not any(k.startswith(TARGET_PREFIX) for k in params):
        return dict(params)
    others = [k for k in params if not k.startswith(TARGET_PREFIX)]
    if others:
        log.info("%s: using the %d arrays under %r, ignoring %d others (optimizer state), e.g. %s",
                 source, len(params) - len(others), TARGET_PREFIX, len(others), others[0])
    return {k[len(TARGET_PREFIX):]: v for k, v in params.items() if k.startswith(TARGET_PREFIX)}


# ── the config is written in the shapes ─────────────────────────────────────────────────────────────────

def _shape(params, key, ndim, what, source):
    if key not in params:
        raise CheckpointError(f"{source}: cannot infer {what}: key {key!r} is missing")
    shape = tuple(params[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: cannot infer {what}: {key!r} has shape {shape}, expected {ndim} dims")
    return shape


def infer_config(params: dict[str, np.ndarray], source: str = "checkpoint") -> ViTConfig:
    """Read the ViTConfig from array shapes (hidden size, patch, depth, heads, MLP width, grid, head)."""
    params = _strip_prefix(params, source)
    if any(k.startswith("ResNet/") for k in params):
        raise CheckpointError(f"{source} is a hybrid ResNet+ViT checkpoint ('ResNet/...' keys); only plain "
                              "ViT checkpoints (patch embedding by one convolution) are supported")
    p, q, channels, hidden = _shape(params, "embedding/kernel", 4, "patch size and hidden size", source)
    if p != q:
        raise CheckpointError(f"{source}: 'embedding/kernel' has shape {(p, q, channels, hidden)}: "
                              "patches must be square (expected HWIO kernel (P, P, C, D))")

    blocks = sorted({int(m.group(1)) for k in params if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    if not blocks:
        raise CheckpointError(f"{source}: cannot infer depth: no 'Transformer/encoderblock_<i>/...' keys")
    missing = sorted(set(range(blocks[-1] + 1)) - set(blocks))
    if missing:
        raise CheckpointError(f"{source}: encoder blocks {missing} are missing (found blocks up to {blocks[-1]})")

    qkey = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    if qkey in params and params[qkey].ndim != 3:
        raise CheckpointError(
            f"{source}: cannot infer num_heads: {qkey!r} has shape {tuple(params[qkey].shape)}; Google's layout "
            f"splits heads, (D, H, Dh) = ({hidden}, H, {hidden}/H)")
    d, heads, head_dim = _shape(params, qkey, 3, "num_heads", source)
    if d != hidden or heads * head_dim != hidden:
        raise CheckpointError(f"{source}: cannot infer num_heads: {qkey!r} has shape {(d, heads, head_dim)}, "
                              f"expected (D, H, Dh) with D = H*Dh = {hidden} (the hidden size of 'embedding/kernel')")

    _, mlp_dim = _shape(params, "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", 2, "mlp_dim", source)

    pos_key = "Transformer/posembed_input/pos_embedding"
    _, tokens, _ = _shape(params, pos_key, 3, "image size", source)
    grid = math.isqrt(max(tokens - 1, 0))
    if grid * grid != tokens - 1 or grid == 0:
        raise CheckpointError(f"{source}: {pos_key!r} has {tokens} positions; expected 1 CLS + a square grid "
                              "of patches (e.g. 1 + 14*14 = 197)")

    representation_size = None
    if "pre_logits/kernel" in params:
        representation_size = _shape(params, "pre_logits/kernel", 2, "representation_size", source)[1]
    _, num_classes = _shape(params, "head/kernel", 2, "num_classes", source)
    try:
        return ViTConfig(image_size=grid * p, patch_size=p, hidden_size=hidden, mlp_dim=mlp_dim,
                         num_heads=heads, num_layers=blocks[-1] + 1, num_classes=num_classes,
                         representation_size=representation_size, in_channels=channels)
    except ValueError as e:
        raise CheckpointError(f"{source}: inconsistent shapes: {e}") from e


# ── loading ──────────────────────────────────────────────────────────────────────────────────────────────

def _check_against_table(params, config, source):
    """Missing keys, unexpected keys and every shape, all reported at once, before anything is copied."""
    table = checkpoint_table(config)
    expected = {key for _, key, _ in table}
    missing = [key for _, key, _ in table if key not in params]
    unexpected = sorted(set(params) - expected)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_some(unexpected)}")
    torch_shapes = _torch_shapes(config)
    for name, key, conv_ in table:
        if key in params:
            want = conv_.npz_shape(torch_shapes[name], config.num_heads)
            if tuple(params[key].shape) != want:
                problems.append(f"{key!r} has shape {tuple(params[key].shape)}, expected {want} "
                                f"(for {name}, converter {conv_.name})")
            elif not np.issubdtype(params[key].dtype, np.floating):
                problems.append(f"{key!r} has dtype {params[key].dtype}, expected floating point")
    if problems:
        raise CheckpointError(f"{source} does not fit the ViT its shapes describe ({_describe(config)}):\n  "
                              + "\n  ".join(problems))


def _some(keys: list[str], limit: int = 20) -> str:
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _describe(c: ViTConfig) -> str:
    pre = f", pre_logits {c.representation_size}" if c.representation_size else ""
    return (f"patch {c.patch_size}, hidden {c.hidden_size}, {c.num_layers} blocks, {c.num_heads} heads, "
            f"MLP {c.mlp_dim}, {c.image_size} px, {c.num_classes} classes{pre}")


def _torch_shapes(config: ViTConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in VisionTransformer(config).state_dict().items()}


def params_to_model(params: dict[str, np.ndarray], num_classes: int | None = None,
                    image_size: int | None = None, *, dropout_rate: float = 0.0,
                    attention_dropout_rate: float = 0.0, source: str = "checkpoint") -> VisionTransformer:
    """Build a VisionTransformer from Google-layout arrays (what :func:`load_npz` does after reading)."""
    params = _strip_prefix(params, source)
    file_config = infer_config(params, source)
    _check_against_table(params, file_config, source)

    config = file_config.replace(dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate)
    if num_classes is not None:  # Google's fine-tuning: no pre_logits, a new zero-initialised head
        if num_classes < 1:
            raise CheckpointError(f"num_classes must be positive, got {num_classes}")
        config = config.replace(num_classes=num_classes, representation_size=None)
    if image_size is not None and image_size != config.image_size:
        p = config.patch_size
        if image_size % p:
            raise CheckpointError(
                f"{source}: image_size={image_size} is not divisible by the checkpoint's patch size {p}; "
                f"use a multiple of {p} such as {image_size // p * p or p} or {(image_size // p + 1) * p}")
        config = config.replace(image_size=image_size)

    with torch.device("meta"):  # no random init: every tensor is overwritten below
        model = VisionTransformer(config)
    model = model.to_empty(device="cpu").float()
    state = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for name, key, conv_ in checkpoint_table(file_config):
            if name not in state:  # pre_logits/head when num_classes is given
                continue
            if name.startswith("head.") and num_classes is not None:
                continue
            value = torch.from_numpy(np.ascontiguousarray(conv_.to_torch(params[key], config.num_heads)))
            if name == "pos_embed" and config.grid_size != file_config.grid_size:
                log.info("%s: resizing the position embedding from a %dx%d to a %dx%d patch grid "
                         "(image size %d -> %d), CLS position kept", source, file_config.grid_size,
                         file_config.grid_size, config.grid_size, config.grid_size,
                         file_config.image_size, config.image_size)
                value = resample_pos_embed(value.float(), config.grid_size)
            state[name].copy_(value)
            loaded.add(name)
        if num_classes is not None:
            model.head.weight.zero_()
            model.head.bias.zero_()
            loaded |= {"head.weight", "head.bias"}
    assert loaded == set(state), f"table does not cover {sorted(set(state) - loaded)}"  # a bug, not bad input
    return model.eval()


def load_npz(path, num_classes: int | None = None, image_size: int | None = None, *,
             dropout_rate: float = 0.0, attention_dropout_rate: float = 0.0) -> VisionTransformer:
    """Load a Google ViT ``.npz`` checkpoint into a VisionTransformer (eval mode, float32).

    The config (size, depth, heads, patch, resolution, pre_logits, classes) is read from the array shapes.
    Every key and shape is checked before anything is copied. ``num_classes=K`` drops ``pre_logits`` and
    starts a zero-initialised K-way head (Google's fine-tuning recipe); ``image_size=S`` resizes the
    position-embedding grid bilinearly (S must be a multiple of the patch size). The dropout rates are not
    stored in checkpoints; set them here for fine-tuning (the model is returned in eval mode either way).
    """
    return params_to_model(read_npz(path), num_classes=num_classes, image_size=image_size,
                           dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate,
                           source=str(path))


# ── saving ───────────────────────────────────────────────────────────────────────────────────────────────

def model_to_params(model: VisionTransformer) -> dict[str, np.ndarray]:
    """The model's weights as Google-layout float32 arrays (the inverse of :func:`params_to_model`)."""
    config = model.config
    state = model.state_dict()
    table = checkpoint_table(config)
    names = {name for name, _, _ in table}
    missing = sorted(names - set(state))
    unexpected = sorted(set(state) - names)
    if missing or unexpected:
        raise CheckpointError(
            "the model's parameters do not match Google's layout"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unexpected: {', '.join(unexpected)}" if unexpected else "")
            + ". Merge adapters first (peft.merge_adapters) so that only plain ViT weights remain.")
    out = {}
    for name, key, conv_ in table:
        tensor = state[name].detach().to("cpu", torch.float32)
        out[key] = np.ascontiguousarray(conv_.to_npz(tensor, config.num_heads).numpy())
    return out


def save_npz(model: VisionTransformer, path) -> Path:
    """Write the model in Google's ``.npz`` layout, atomically (a temp file in the same folder, then rename)."""
    path = Path(path)
    params = model_to_params(model)
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save {path}: folder {path.parent} does not exist")
    with atomic_write(path) as f:
        np.savez(f, **params)
    return path
