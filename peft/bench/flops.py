"""An analytic FLOP model of ViT fine-tuning: what each mode must compute per image, forward and backward.

2 FLOPs per multiply-add; only matrix products are counted (patch embedding, the linear layers, the two
attention products, the head, LoRA's and RLRR's rank-r products). LayerNorm, softmax, GELU, bias and residual
adds, SSF and the optimizer are not counted. The backward pass is counted layer by layer: the activation
gradient only where something below still needs it, the weight gradient only where the weight or an adapter
that needs it (RLRR needs the full dYᵀX) trains. ``tests/test_benchmark.py`` checks it against
``torch.utils.flop_counter.FlopCounterMode`` on real passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from vit.config import ViTConfig

from ..base import MethodConfig
from ..lora import LoraConfig
from ..modes import get_method

VECTOR_MODES = ("bitfit", "ssf")  # trainable vectors after every layer: gradients flow everywhere, no dW
PROMPT_MODES = ("vpt", "vpt-shallow")  # prompt tokens from block 0 on (deep replaces them, the count is the same)
BOTTLENECK_MODES = ("adaptformer", "adapter")  # a trained down/up pair per block, beside or after the MLP
MODELED = ("head", "mlp", "lora", "dora", "rlrr", "full", "fact-tt") + PROMPT_MODES + BOTTLENECK_MODES + VECTOR_MODES


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


@dataclass
class _Linear:
    """One linear layer in the FLOP model: tokens × in × out multiply-adds per matrix product."""
    name: str
    tokens: int
    fan_in: int
    fan_out: int
    weight_trains: bool = False  # full / mlp modes: its own weight gets a gradient
    adapter: str | None = None  # "lora", "rlrr", or "vector" (a trained bias or SSF after it: no extra products)


def train_macs(config: ViTConfig, mode: str, batch_size: int = 1,
               method_config: MethodConfig | None = None) -> dict[str, float]:
    """Multiply-adds per image of a forward pass and of a training step (forward + backward) in ``mode``, with the
    method's config (default: the registry's, i.e. the published defaults: ranks, targets, widths, tokens).

    Rules (what autograd must compute, nothing more):
    * forward: :func:`forward_macs`, plus LoRA's two rank-r products per target (tokens·r·(in + out)) and,
      for RLRR, S_out·S_in per adapted layer (out·r·in, once per step, so divided by the batch size; counted
      for the official formula too, where broadcasting does the same multiplications);
    * backward of a linear layer: the activation gradient dX (tokens·in·out) only if its input depends on
      something trainable; the weight gradient dW = dYᵀX (tokens·in·out) if its weight trains or it has RLRR
      (whose scale gradients are built from the full dYᵀX), plus RLRR's two rank-r reductions (2·out·r·in per
      step) and, on the Function path, W' rebuilt for dX; LoRA: dB, d(Ax) and dA (tokens·r·(2·out + in)) and,
      when the input needs a gradient, the branch's dX (tokens·r·in);
    * attention core: dV = Pᵀ dO if V needs a gradient; dP = dO Vᵀ if Q or K does; then dQ, dK each if needed
      (N²·D each); the patch embedding's weight gradient only in full mode (the image never needs one).
    """
    if mode == "timm-lora":  # HF peft's LoRA on timm's fused qkv layer
        mode, method_config = "lora", LoraConfig(targets="qkv")
    mode = {"merged": "head", "timm": "full"}.get(mode, mode)  # merged: the plain ViT; timm: full fine-tuning
    base_mode = "rlrr" if mode.startswith("rlrr") else mode
    if base_mode not in MODELED:
        raise ValueError(f"no FLOP model for mode {mode!r}")
    cfg = method_config if method_config is not None else get_method(base_mode).config()
    rank = getattr(cfg, "rank", 0)  # LoRA / DoRA / RLRR / FacT-TT rank
    lora_targets = tuple(t.strip() for t in getattr(cfg, "targets", "").split(","))
    bottleneck = getattr(cfg, "dim", 0)  # AdaptFormer / Adapter width
    c = config
    extra = cfg.tokens if base_mode in PROMPT_MODES else 0
    n, d, m = 1 + c.num_patches + extra, c.hidden_size, c.mlp_dim
    fwd = dict(forward_macs(c, extra))
    per_step = 0.0  # work done once per step whatever the batch size (RLRR's W' and its gradient sums)
    per_forward = 0.0  # work done once per forward pass (DoRA's B A for the norm of its direction)
    bwd = 0.0

    # Embedding: patch conv (its weight trains only in full mode), CLS and positions (full), SSF (rlrr).
    # Does the residual stream entering block 0 need a gradient? Where something trains in the embedding (full;
    # RLRR's, SSF's and BitFit's patch-embedding vectors) or in block 0's input itself (VPT's prompts).
    everywhere = base_mode in ("full", "rlrr") + VECTOR_MODES  # something trains after every norm
    stream_grad = everywhere or base_mode in PROMPT_MODES
    if base_mode == "full":
        bwd += fwd["patch_embed"]  # dW of the conv; never dX (the image)

    def linear(lin: _Linear, input_grad: bool) -> bool:
        """Add this layer's forward extras and backward work; return whether its output needs a gradient."""
        nonlocal bwd, per_step, per_forward
        t, i, o = lin.tokens, lin.fan_in, lin.fan_out
        if input_grad:
            bwd += t * i * o  # dX = dY W
        if lin.weight_trains or lin.adapter == "rlrr":
            bwd += t * i * o  # dW = dYᵀ X
        if lin.adapter == "rlrr":
            per_step += o * rank * i  # W' = W ⊙ (1 + S_out S_in) in forward
            per_step += 2 * o * rank * i  # (G ⊙ W) S_inᵀ and S_outᵀ (G ⊙ W)
            if mode not in ("rlrr-official", "rlrr-kernel-keep", "rlrr-kernel-reuse") and input_grad:
                per_step += o * rank * i  # the Function rebuilds W' for dX (unless it kept W')
        if lin.adapter == "dora":  # LoRA's products, plus B A (out·r·in) for ‖W + s B A‖ in every forward
            per_forward += o * rank * i
        if lin.adapter == "fact":  # x → U → S → V, every factor trains (U and V are shared, their gradients add)
            r, chunks = rank, max(o, i) // min(o, i)
            if o > i:  # fc1: U on the tokens, S to c·d, V on each of the c chunks
                chain = [(t, i, r), (t, r, chunks * r), (t * chunks, r, o // chunks)]
            elif i > o:  # fc2: U on each of the c chunks, S from c·d, V on the tokens
                chain = [(t * chunks, i // chunks, r), (t, chunks * r, r), (t, r, o)]
            else:
                chain = [(t, i, r), (t, r, r), (t, r, o)]
            grad = input_grad
            for rows, fi, fo in chain:
                fwd["fact"] = fwd.get("fact", 0) + rows * fi * fo
                bwd += rows * fi * fo + (rows * fi * fo if grad else 0)  # dW always, dX where the input needs it
                grad = True
        if lin.adapter in ("lora", "dora"):
            r = rank
            fwd["lora"] = fwd.get("lora", 0) + t * r * (i + o)
            bwd += t * r * (2 * o + i)  # dB = dYᵀ (A x), d(Ax) = dY B, dA = d(Ax)ᵀ x
            if input_grad:
                bwd += t * r * i  # the branch's share of dX
        return input_grad or lin.weight_trains or lin.adapter is not None

    def adapter_on(name: str) -> str | None:
        if base_mode == "rlrr" or (base_mode in ("lora", "dora") and name in lora_targets):
            return base_mode
        if base_mode == "fact-tt" and name in ("q", "k", "v", "proj", "fc1", "fc2"):
            return "fact"
        return "vector" if base_mode in VECTOR_MODES else None  # a trained bias / SSF: its output needs a gradient

    mlp_trains = base_mode in ("mlp", "full")
    attn_trains = base_mode == "full"
    for _ in range(c.num_layers):
        # norm1 (+ SSF in rlrr): its output needs a gradient if the stream does or its SSF trains
        h1 = stream_grad or everywhere
        if "qkv" in lora_targets and base_mode == "lora":  # one fused (D → 3D) layer, as in timm
            qkv = dict.fromkeys("qkv", linear(_Linear("qkv", n, d, 3 * d, attn_trains, "lora"), h1))
        else:
            qkv = {name: linear(_Linear(name, n, d, d, attn_trains, adapter_on(name)), h1) for name in "qkv"}
        # attention core: scores S = Q Kᵀ, P = softmax(S), O = P V
        if qkv["v"]:
            bwd += n * n * d  # dV = Pᵀ dO
        if qkv["q"] or qkv["k"]:
            bwd += n * n * d  # dP = dO Vᵀ
            bwd += n * n * d * (int(qkv["q"]) + int(qkv["k"]))  # dQ = dS K, dK = dSᵀ Q
        o_grad = any(qkv.values())
        stream_grad = linear(_Linear("proj", n, d, d, attn_trains, adapter_on("proj")), o_grad) or stream_grad
        if base_mode == "adapter" and cfg.placement == "both":  # Houlsby's second adapter, after the attention
            fwd["adapter"] = fwd.get("adapter", 0) + 2 * n * d * bottleneck
            down = linear(_Linear("down", n, d, bottleneck, True), stream_grad)
            stream_grad = linear(_Linear("up", n, bottleneck, d, True), down)
        h2 = stream_grad or everywhere
        a = linear(_Linear("fc1", n, d, m, mlp_trains, adapter_on("fc1")), h2)
        stream_grad = linear(_Linear("fc2", n, m, d, mlp_trains, adapter_on("fc2")), a) or stream_grad
        if base_mode in BOTTLENECK_MODES:  # AdaptFormer: x + mlp(..) + s·up(ReLU(down(x))); Adapter: h + up(g(down(h)))
            dim = bottleneck
            fwd["adapter"] = fwd.get("adapter", 0) + 2 * n * d * dim
            down = linear(_Linear("down", n, d, dim, True), stream_grad)  # its input needs dX only if below trains
            stream_grad = linear(_Linear("up", n, dim, d, True), down)

    # final norm (+ SSF), CLS token, optional pre-logits, head (always trains)
    feat_grad = stream_grad or everywhere
    rep = c.representation_size
    if rep:
        pre = linear(_Linear("pre_logits", 1, d, rep, base_mode == "full"), feat_grad)
        linear(_Linear("head", 1, rep, c.num_classes, True), pre)
    else:
        linear(_Linear("head", 1, d, c.num_classes, True), feat_grad)

    forward = sum(fwd.values()) + per_forward / batch_size
    if base_mode == "rlrr":
        forward_step = forward + sum(rank * o * i for o, i in _rlrr_shapes(c)) / batch_size
    else:
        forward_step = forward
    return {"forward": float(forward_step), "train": float(forward + bwd + per_step / batch_size)}


def _rlrr_shapes(c: ViTConfig):
    d, m = c.hidden_size, c.mlp_dim
    return [(d, d)] * (4 * c.num_layers) + [(m, d), (d, m)] * c.num_layers
