"""A Vision Transformer written to be read top to bottom, and to match Google's model number for number.

Paper: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021.
Reference implementation: google-research/vision_transformer, ``vit_jax/models_vit.py`` (Flax).

Structure (pre-norm Transformer encoder):

    image (B, 3, H, W) ──patch_embed──► (B, N-1, D) ──prepend CLS, add pos_embed──► (B, N, D)
        └─► blocks × L:  x = x + attn(norm1(x));  x = x + mlp(norm2(x))
        └─► norm ──► CLS token (B, D) ──[pre_logits: Dense + tanh]──► head ──► logits (B, num_classes)

Shape vocabulary used in comments: B batch, N tokens (1 CLS + patches), D hidden size, H heads,
Dh = D / H head size. Details that matter for exactness against Google's checkpoints:
LayerNorm epsilon 1e-6 (PyTorch's default is 1e-5), tanh-approximate GELU (Flax ``nn.gelu``'s default; ``gelu="erf"``
in the config gives the exact form the PEFT papers' PyTorch code used),
attention scaled by 1/sqrt(Dh), inputs normalised to [-1, 1] (mean = std = 0.5).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import ViTConfig

LAYER_NORM_EPS = 1e-6


class AttentionSoftmax(nn.Softmax):
    """The softmax over keys, as a named module (``blocks.{i}.attn.softmax``).

    Only the manual attention path calls it, so a forward hook on it sees the post-softmax probabilities
    (B, H, N, N) without anything changing what ``forward`` returns. See :func:`record_attention`.
    """

    def __init__(self):
        super().__init__(dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections, as in Google's checkpoints."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.softmax = AttentionSoftmax()
        self.attn_drop = nn.Dropout(attention_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        # True: one fused scaled_dot_product_attention call (fast, no probabilities visible).
        # False: the same math spelled out, through self.softmax (what the attention tools use).
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, D)
        b, n, _ = x.shape
        # Split heads, "b n (h d) -> b h n d", with plain reshape/transpose rather than einops: this runs 3× per
        # block and step, where einops' few microseconds per call show when a GPU waits on Python.
        q, k, v = (f(x).reshape(b, n, self.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.fused:
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, N, Dh)
        else:
            attn = self.softmax((q * self.scale) @ k.transpose(-2, -1))  # (B, H, N, N), rows sum to 1
            out = self.attn_drop(attn) @ v  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(b, n, -1)  # merge heads: "b h n d -> b n (h d)"
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Dense → GELU → Dense, with dropout after each (Google's MlpBlock). ``gelu="tanh"`` is Flax's default
    approximation (what Google's model computes); ``"erf"`` the exact form of the PyTorch ports."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, gelu: str = "tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Randomly drop a residual branch while training, scaled by 1/(1-p) (identity in eval mode or at p = 0).

    mode "sample": stochastic depth (Huang et al., ECCV 2016; timm's DropPath): each sample's whole branch is kept
    or dropped. mode "element": every element independently, i.e. plain dropout on the branch, which is what the
    official RLRR code applies under the name drop_path. mode "sample-floor": stochastic depth drawn the way timm
    0.4.12 draws it (``floor(keep + U)`` with U uniform, then ``x / keep``; timm 0.4.12 ``layers/drop.py:154-156``):
    the same distribution as "sample" (timm >= 0.5: ``bernoulli_(keep)``, ``layers/drop.py:149-152`` of 0.5.4) from
    another random stream, so a run seeded like an official timm-0.4 run (FacT's) draws the same masks. The modes
    stay here because ``ViTConfig.drop_path_mode`` (and so every saved run's model config) names them.
    """

    def __init__(self, p: float = 0.0, mode: str = "sample"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mode == "element":
            return F.dropout(x, self.p, training=True)
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        if self.mode == "sample-floor":
            keep = (1.0 - self.p + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
            return x.div(1.0 - self.p) * keep
        keep = x.new_empty(shape).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode}"


def drop_path_rates(config: ViTConfig) -> list[float]:
    """Per-block drop-path rates, rising linearly from 0 (first block) to ``drop_path_rate`` (last block), computed
    as every official PEFT code computes them: a float32 ``torch.linspace`` read back as Python floats (so 0.1
    becomes 0.10000000149...; zstarN70/RLRR ``models/networks.py:217``, dongzelian/SSF
    ``models/vision_transformer.py:454``, ZhangYuanhan-AI/NOAH ``model/supernet_vision_transformer_timm.py:422``).
    On the CPU whatever the default device, so that a model built on the meta device gets numbers too."""
    return torch.linspace(0, config.drop_path_rate, config.num_layers, dtype=torch.float32, device="cpu").tolist()


class EncoderBlock(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then + mlp(norm2(x)) (each branch through drop-path)."""

    def __init__(self, config: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.attn = Attention(d, config.num_heads, config.attention_dropout_rate, config.dropout_rate)
        self.drop_path1 = DropPath(drop_path, config.drop_path_mode)
        self.norm2 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(d, config.mlp_dim, config.dropout_rate, config.gelu)
        self.drop_path2 = DropPath(drop_path, config.drop_path_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def lecun_normal_(weight: torch.Tensor) -> None:
    """jax's ``lecun_normal``: a normal cut at ±2 standard deviations, widened by 1/0.8796 (the std of N(0, 1) cut
    at ±2) so that the variance is 1 / fan_in (``jax.nn.initializers.variance_scaling``, "truncated_normal")."""
    std = math.sqrt(1 / weight[0].numel()) / 0.87962566103423978
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class VisionTransformer(nn.Module):
    """ViT classifier. ``forward`` takes (B, 3, H, W) floats normalised with mean = std = 0.5."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        # A P×P convolution with stride P is a linear map applied to each patch independently.
        self.patch_embed = nn.Conv2d(config.in_channels, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, d))
        self.pos_drop = nn.Dropout(config.dropout_rate)
        self.blocks = nn.ModuleList(EncoderBlock(config, rate) for rate in drop_path_rates(config))
        self.norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        # Only the original ImageNet-21k checkpoints have this Dense+tanh layer before the head.
        rep = config.representation_size
        self.pre_logits = nn.Linear(d, rep) if rep else None
        self.head = nn.Linear(rep or d, config.num_classes)
        if not self.cls_token.is_meta:  # the loader's meta-device model gets every tensor from the file: no init
            self.reset_parameters()

    def reset_parameters(self):
        """Initialisation for training from scratch, as Google's ``models_vit.py`` (checkpoints overwrite all of it):
        xavier-uniform kernels of the attention and MLP Dense layers, MLP biases N(0, 1e-6), other biases zero,
        lecun-normal patch and pre-logits kernels, positions N(0, 0.02), zero CLS and head."""
        for block in self.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            for fc in (block.mlp.fc1, block.mlp.fc2):  # Flax's MlpBlock bias_init
                nn.init.normal_(fc.bias, std=1e-6)
        for layer in (self.patch_embed, self.pre_logits):  # Flax's default kernel init for Conv and Dense
            if layer is not None:
                lecun_normal_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.cls_token)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) → tokens (B, N, D): patches, CLS prepended, positions added."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(
                f"expected images of shape (B, {c.in_channels}, {c.image_size}, {c.image_size}), got "
                f"{tuple(x.shape)}; load the checkpoint with image_size=... to change the resolution"
            )
        x = self.patch_embed(x)  # (B, D, H/P, W/P)
        x = rearrange(x, "b d gh gw -> b (gh gw) d")  # row-major patch order, as in Google's reshape
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N, D)
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image → all tokens after the final LayerNorm, (B, N, D)."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) → logits (B, num_classes), read from the CLS token."""
        x = features[:, 0]
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def set_fused_attention(model: nn.Module, fused: bool) -> None:
    """Switch every attention layer between the fused (SDPA) and the manual path. Outputs do not change."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused = fused


@contextlib.contextmanager
def record_attention(model: nn.Module, keep_grad: bool = False):
    """Collect post-softmax attention probabilities, one (B, H, N, N) tensor per block, in block order.

    Inside the ``with`` the model runs its manual attention path and forward hooks on each
    ``attn.softmax`` record what it returns; afterwards the previous paths are restored. With
    ``keep_grad=True`` the maps stay in the autograd graph and keep their ``.grad`` after a backward pass
    (for gradient-weighted rollout); otherwise they are detached.

        with record_attention(model) as maps:
            logits = model(images)
        # maps[i]: block i's attention, (B, H, N, N)
    """
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    previous = [a.fused for a in attns]
    maps: list[torch.Tensor] = []

    def record(_module, _inputs, out):
        if keep_grad and out.requires_grad:
            out.retain_grad()
        maps.append(out if keep_grad else out.detach())

    hooks = [a.softmax.register_forward_hook(record) for a in attns]
    try:
        for a in attns:
            a.fused = False
        yield maps
    finally:
        for a, fused in zip(attns, previous):
            a.fused = fused
        for h in hooks:
            h.remove()


RESIZE_METHODS = ("google", "bilinear", "bicubic")


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int | tuple[int, int],
                       num_prefix_tokens: int = 1, method: str = "bilinear") -> torch.Tensor:
    """Resize a (1, prefix + g*g, D) position embedding to a new patch grid, keeping the prefix (CLS) rows.

    ``method``: "google" is linear interpolation with corners aligned, what Google's ``load_pretrained`` gets
    from ``scipy.ndimage.zoom(order=1)`` (output sample i sits at i·(g-1)/(g'-1) of the input), computed in
    float64; "bilinear" is half-pixel bilinear (timm's npz loader); "bicubic" is antialiased half-pixel bicubic
    (timm's ``resample_abs_pos_embed``). The target may be non-square and smaller; the same grid returns the
    input unchanged.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown position-embedding resize {method!r}; choose one of {', '.join(RESIZE_METHODS)}")
    gh, gw = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} grid positions, which is not a square")
    if (gh, gw) == (old, old):
        return pos_embed
    grid = rearrange(grid, "1 (gh gw) d -> 1 d gh gw", gh=old)
    if method == "google":
        grid = F.interpolate(grid.double(), size=(gh, gw), mode="bilinear", align_corners=True)
    elif method == "bilinear":
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bilinear", align_corners=False)
    else:
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
    grid = rearrange(grid.to(pos_embed.dtype), "1 d gh gw -> 1 (gh gw) d")
    return torch.cat([prefix, grid], dim=1)
