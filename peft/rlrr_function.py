"""The RLRR linear map as a memory-lean autograd Function (the layer behind :class:`peft.rlrr.RLRRLinear`).

Autograd through the naive formula keeps W' (and its fp32 intermediates) alive until backward: one out×in
tensor per adapted layer, the same whatever the batch size. :class:`RLRRLinearFunction` saves only x, W,
S_out and S_in and rebuilds W' in backward (an elementwise pass, cheap next to the two GEMMs). The math is
:mod:`peft.functional`'s; on CUDA, ``peft.kernels`` can replace its two elementwise/reduction steps by fused
kernels (``VIT_PEFT_KERNEL=auto|cuda``); the GEMMs stay on cuBLAS.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import kernels
from .functional import _acc_dtype, _as, rlrr_scale_grads, rlrr_weight


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: the autocast dtype when autocast is on for x's device, else x's dtype."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type) or not x.is_floating_point() or x.dtype == torch.float64:
        return x.dtype
    return torch.get_autocast_dtype(device_type)


def _autocast_off(device_type: str):
    """A context with autocast disabled for ``device_type`` (nothing to enter when it is off already: a context
    per layer and step costs more than the layer's own arithmetic at small sizes)."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


WEIGHT_MEMORY = ("rebuild", "keep", "reuse")


class WeightCache:
    """One layer's W', kept while W, S_out and S_in are unchanged (same storage, same version counters).

    An optimizer step changes S_out and S_in in place, which bumps their versions, so W' is built once per step
    and reused by every gradient-accumulation micro-batch (and evaluation pass) in between.
    """

    def __init__(self):
        self.key, self.w_eff = None, None

    def get(self, weight, s_out, s_in, dtype, build):
        key = (dtype, weight.data_ptr(), weight._version, s_out.data_ptr(), s_out._version, s_in.data_ptr(),
               s_in._version)
        if key != self.key:
            self.w_eff, self.key = build(weight, s_out, s_in, dtype), key
        return self.w_eff


class RLRRLinearFunction(torch.autograd.Function):
    """y = x (W ⊙ (1 + S_out S_in))ᵀ + b + f, saving only x, W, S_out, S_in for backward.

    Arguments: x (..., in), weight (out, in), bias (out,) or None, s_out (out, r), s_in (r, in), f (out,), and
    optionally ``memory`` and ``cache``: "rebuild" (default) rebuilds W' in backward; "keep" saves the forward's
    W' for backward instead (+ out×in elements of the compute dtype per layer until backward, one build less);
    "reuse" also keeps W' in ``cache`` (a :class:`WeightCache`) between calls while S is unchanged (one persistent
    W' per layer; one build per optimizer step whatever the number of micro-batches; eager only: under
    ``torch.compile`` it acts as "keep").
    Under autocast, W' is built directly in the autocast dtype and x is cast to it, as ``F.linear`` would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, s_out, s_in, f, *options):
        memory, cache = options if options else ("rebuild", None)
        dtype = _compute_dtype(x)
        fused = kernels.use_kernel(x.device.type, weight.device.type, s_out.shape[1], dtype, weight.dtype)
        with _autocast_off(x.device.type):
            xc = _as(x, dtype)
            build = kernels.rlrr_weight if fused else rlrr_weight
            w_eff = cache.get(weight, s_out, s_in, dtype, build) if memory == "reuse" else build(
                weight, s_out, s_in, dtype)
            b_eff = _as(f, _acc_dtype(f.dtype)) if bias is None else _as(bias, _acc_dtype(bias.dtype)) + f
            y = F.linear(xc, w_eff, _as(b_eff, dtype))
        if memory == "rebuild":
            ctx.save_for_backward(xc, weight, s_out, s_in)  # not w_eff: it is rebuilt in backward
        else:
            ctx.save_for_backward(xc, weight, s_out, s_in, w_eff)
        ctx.n_options = len(options)
        ctx.fused = fused
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.f_dtype = f.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xc, weight, s_out, s_in, *kept = ctx.saved_tensors
        # The kernels' outputs carry no autograd graph, so a graph of this backward (create_graph=True, e.g. a
        # gradient penalty) is built on the PyTorch path, which is differentiable; otherwise terms would drop.
        fused = ctx.fused and not torch.is_grad_enabled()
        need_x, need_w, need_b, need_so, need_si, need_f = ctx.needs_input_grad[:6]
        dtype = xc.dtype
        grad_x = grad_w = grad_b = grad_so = grad_si = grad_f = None
        with _autocast_off(grad_y.device.type):
            dy = _as(grad_y, dtype)
            if need_x:
                if kept and not torch.is_grad_enabled():  # a graph of the backward needs the differentiable build
                    w_eff = kept[0]
                else:
                    build = kernels.rlrr_weight if fused else rlrr_weight
                    w_eff = build(weight, s_out, s_in, dtype)
                grad_x = _as(dy @ w_eff, ctx.x_dtype)  # (..., in)
                del w_eff
            if need_w or need_so or need_si:
                dy2 = dy.reshape(-1, dy.shape[-1])  # (M, out)
                x2 = xc.reshape(-1, xc.shape[-1])  # (M, in)
                g = dy2.t() @ x2  # (out, in): the full weight gradient, from cuBLAS
                if need_so or need_si:
                    if fused:
                        grad_so, grad_si = kernels.rlrr_grad_scales(g, weight, s_out, s_in)
                    else:
                        grad_so, grad_si = rlrr_scale_grads(g, weight, s_out, s_in)
                    grad_so = _as(grad_so, s_out.dtype) if need_so else None
                    grad_si = _as(grad_si, s_in.dtype) if need_si else None
                if need_w:  # only when someone unfreezes W: ∂L/∂W = G ⊙ (1 + S_out S_in)
                    acc = _acc_dtype(g.dtype, s_out.dtype)
                    grad_w = (g.to(acc) * torch.mm(s_out.to(acc), s_in.to(acc)).add_(1.0)).to(weight.dtype)
                del g
            if need_b or need_f:
                db = dy.reshape(-1, dy.shape[-1]).sum(0, dtype=_acc_dtype(dy.dtype))  # (out,)
                grad_b = _as(db, ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
                grad_f = _as(db, ctx.f_dtype) if need_f else None
        return (grad_x, grad_w, grad_b, grad_so, grad_si, grad_f) + (None,) * ctx.n_options


def rlrr_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s_out: torch.Tensor,
                s_in: torch.Tensor, f: torch.Tensor, memory: str = "rebuild",
                cache: WeightCache | None = None) -> torch.Tensor:
    """RLRR linear map through :class:`RLRRLinearFunction` (``memory``: see there; the default rebuilds W')."""
    if memory == "rebuild":
        return RLRRLinearFunction.apply(x, weight, bias, s_out, s_in, f)
    if memory not in WEIGHT_MEMORY or (memory == "reuse" and cache is None):
        raise ValueError(f"memory={memory!r}: choose one of {', '.join(WEIGHT_MEMORY)} (reuse needs a cache)")
    if memory == "reuse" and torch.compiler.is_compiling():
        memory = "keep"  # the cache is Python state a compiled graph cannot carry: keep W' for backward instead
    return RLRRLinearFunction.apply(x, weight, bias, s_out, s_in, f, memory, cache if memory == "reuse" else None)
