"""An analytic FLOP model of ViT fine-tuning: what each method must compute per image, forward and backward.

2 FLOPs per multiply-add; only matrix products are counted (patch embedding, the linear layers, the two
attention products, the head, the adapters' products). LayerNorm, softmax, GELU, bias and residual adds, SSF and the optimizer
are not counted. The backward pass is counted layer by layer: the activation gradient only where something below
still needs it, the weight gradient only where the weight trains. What a method adds (its layers' work, extra
tokens, branches, which weights train) is declared by the method itself (``Method.cost``, :class:`peft.base.Cost`). ``tests/test_benchmark.py`` checks it against
``torch.utils.flop_counter.FlopCounterMode`` on real passes.
"""

from __future__ import annotations

from vit.config import ViTConfig

from ..base import Cost, MethodConfig, Work
from ..registry import get_method


def forward_macs(config: ViTConfig, extra_tokens: int = 0) -> dict[str, int]:
    """Multiply-adds of one image's forward pass through the plain ViT, by part.

    With N = 1 + patches tokens, D hidden, M mlp_dim, L layers, K classes, C·P² values per patch:
    patch embedding (N−1)·D·C·P²; per block q, k, v, proj 4·N·D², attention scores and weighted sum 2·N²·D,
    MLP 2·N·D·M; head D·K on the CLS token (plus D·R for a pre-logits layer of size R). ``extra_tokens``:
    prompt tokens every block also processes (VPT).
    """
    c = config
    n, d, m = 1 + c.num_patches + extra_tokens, c.hidden_size, c.mlp_dim
    rep = c.representation_size
    head = (d * rep + rep * c.num_classes) if rep else d * c.num_classes
    return {
        "patch_embed": c.num_patches * d * c.in_channels * c.patch_size ** 2,
        "qkv_proj": c.num_layers * 4 * n * d * d,
        "attention": c.num_layers * 2 * n * n * d,
        "mlp": c.num_layers * 2 * n * d * m,
        "head": head,
    }


def train_macs(config: ViTConfig, method: str, batch_size: int = 1,
               method_config: MethodConfig | None = None) -> dict[str, float]:
    """Multiply-adds per image of a forward pass and of a training step (forward + backward) with ``method``, with
    its config (default: the registry's, i.e. the published defaults: ranks, targets, widths, tokens). What the
    method changes comes from its registry entry's :class:`peft.base.Cost`; the rules are the same for all:

    * forward: :func:`forward_macs` (with the method's extra tokens), plus each adapted layer's own work and the
      bottleneck branches (2·N·D·d each); work done once per pass (a weight rebuilt from factors) is divided by
      the batch size;
    * backward of a linear layer: the activation gradient dX (tokens·in·out) only if its input depends on
      something trainable; the weight gradient dW = dYᵀX (tokens·in·out) if its weight trains; plus its adapter's
      backward work (:class:`peft.base.Work`);
    * attention core: dV = Pᵀ dO if V needs a gradient; dP = dO Vᵀ if Q or K does; then dQ, dK each if needed
      (N²·D each); the patch embedding's weight gradient only when every weight trains (the image never needs one).
    """
    cfg = method_config if method_config is not None else get_method(method).config()
    cost: Cost = get_method(method).cost(cfg)
    c = config
    n, d, m = 1 + c.num_patches + cost.extra_tokens, c.hidden_size, c.mlp_dim
    fwd = float(sum(forward_macs(c, cost.extra_tokens).values()))
    bwd = once_fwd = once_bwd = 0.0
    everywhere = cost.trains_everywhere  # something trains after every layer: every activation needs a gradient
    stream_grad = everywhere or cost.trains_input  # does the residual stream entering block 0 need a gradient?

    def trains(name: str) -> bool:
        return "*" in cost.trains_weights or name in cost.trains_weights

    if trains("patch_embed"):
        bwd += forward_macs(c)["patch_embed"]  # dW of the conv; never dX (the image)

    def linear(name: str, tokens: int, fan_in: int, fan_out: int, input_grad: bool, weight_trains: bool) -> bool:
        """Add this layer's backward work and its adapter's; return whether its output needs a gradient."""
        nonlocal fwd, bwd, once_fwd, once_bwd
        product = tokens * fan_in * fan_out
        bwd += product * (int(input_grad) + int(weight_trains))  # dX = dY W, dW = dYᵀ X
        work: Work | None = cost.linears[name](tokens, fan_in, fan_out, input_grad) if name in cost.linears else None
        if work is not None:
            fwd, bwd = fwd + work.forward, bwd + work.backward
            once_fwd, once_bwd = once_fwd + work.forward_once, once_bwd + work.backward_once
        return input_grad or weight_trains or work is not None

    def branch(width: int, input_grad: bool) -> bool:
        """A trained down (D → width) / up pair: its forward, then both layers' backward."""
        nonlocal fwd
        fwd += 2 * n * d * width
        down = linear("down", n, d, width, input_grad, True)  # its input needs dX only if below trains
        return linear("up", n, width, d, down, True)

    for _ in range(c.num_layers):
        h1 = stream_grad or everywhere  # norm1's output: the stream's gradient, or a vector trained after it
        if "qkv" in cost.linears:  # one fused (D → 3D) layer, as in timm
            qkv = dict.fromkeys("qkv", linear("qkv", n, d, 3 * d, h1, trains("qkv")))
        else:
            qkv = {name: linear(name, n, d, d, h1, trains(name)) for name in "qkv"}
        # attention core: scores S = Q Kᵀ, P = softmax(S), O = P V
        if qkv["v"]:
            bwd += n * n * d  # dV = Pᵀ dO
        if qkv["q"] or qkv["k"]:
            bwd += n * n * d  # dP = dO Vᵀ
            bwd += n * n * d * (int(qkv["q"]) + int(qkv["k"]))  # dQ = dS K, dK = dSᵀ Q
        stream_grad = linear("proj", n, d, d, any(qkv.values()), trains("proj")) or stream_grad
        if "attn" in cost.branches:
            stream_grad = branch(cost.branches["attn"], stream_grad)
        h2 = stream_grad or everywhere
        a = linear("fc1", n, d, m, h2, trains("fc1"))
        stream_grad = linear("fc2", n, m, d, a, trains("fc2")) or stream_grad
        if "mlp" in cost.branches:
            stream_grad = branch(cost.branches["mlp"], stream_grad)

    # final norm, CLS token, optional pre-logits, head (always trains)
    feat_grad = stream_grad or everywhere
    rep = c.representation_size
    if rep:
        pre = linear("pre_logits", 1, d, rep, feat_grad, trains("pre_logits"))
        linear("head", 1, rep, c.num_classes, pre, True)
    else:
        linear("head", 1, d, c.num_classes, feat_grad, True)
    forward = fwd + once_fwd / batch_size
    return {"forward": float(forward), "train": float(forward + bwd + once_bwd / batch_size)}
