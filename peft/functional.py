"""The RLRR specification: the rescaled weight, the scale gradients, and the official "materialise W'" form.

RLRR (Dong et al., "Low-Rank Rescaled Vision Transformer Fine-Tuning: A Residual Design Approach",
CVPR 2024; official code zstarN70/RLRR ``models/networks.py``) fine-tunes a frozen Linear (W, b) as

    W' = W ⊙ (1 + S_out S_in)      S_out: (out, r), S_in: (r, in)       b' = b + f
    y  = x W'ᵀ + b'

With G = dYᵀX the full (out, in) weight gradient, the chain rule through the Hadamard product gives

    ∂L/∂W'         = G
    ∂L/∂S_out[i,k] = Σ_j G[i,j] W[i,j] S_in[k,j]        i.e. (G ⊙ W) S_inᵀ
    ∂L/∂S_in[k,j]  = Σ_i G[i,j] W[i,j] S_out[i,k]       i.e. S_outᵀ (G ⊙ W)
    ∂L/∂X          = dY W'
    ∂L/∂f          = Σ over all rows of dY

The PyTorch code in this file is the specification: ``peft.rlrr_function`` builds the memory-lean autograd
Function from it, and the fused CUDA kernels in ``peft.kernels`` are checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it already has it (the RLRR layers do this ~20 times per step)."""
    return t if t.dtype == dtype else t.to(dtype)


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """At least float32 (float64 stays float64): where sums and the scale matrix are formed."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def rlrr_weight(weight: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """W ⊙ (1 + S_out S_in), formed in float32 (or float64) and returned in ``dtype`` (default: W's)."""
    acc = _acc_dtype(weight.dtype, s_out.dtype, s_in.dtype)
    scaled = torch.mm(_as(s_out, acc), _as(s_in, acc)).add_(1.0).mul_(_as(weight, acc))  # one out×in temporary
    return _as(scaled, dtype or weight.dtype)


def rlrr_scale_grads(grad_weight: torch.Tensor, weight: torch.Tensor, s_out: torch.Tensor,
                     s_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂s_out, ∂s_in) = ((G ⊙ W) S_inᵀ, S_outᵀ (G ⊙ W)), accumulated in float32 (or float64)."""
    acc = _acc_dtype(grad_weight.dtype, weight.dtype, s_out.dtype)
    gw = _as(grad_weight, acc) * _as(weight, acc)  # (out, in)
    return gw @ _as(s_in, acc).t(), _as(s_out, acc).t() @ gw


def official_rlrr_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s_out: torch.Tensor,
                         s_in: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The official code's formulation, for benchmarks and as an independent reference.

    Materialises W' with plain tensor ops (for r = 1 exactly as zstarN70/RLRR: ``W * s_in * s_out + W``,
    three elementwise passes, then F.linear's cast under autocast), and lets autograd keep what it needs:
    W' and the intermediate products stay alive until backward.
    """
    if s_out.shape[1] == 1:
        w_eff = weight * s_in * s_out + weight  # (out, in): s_in (1, in) and s_out (out, 1) broadcast
    else:
        w_eff = weight * (s_out @ s_in) + weight
    b_eff = f if bias is None else bias + f
    return F.linear(x, w_eff, b_eff)
