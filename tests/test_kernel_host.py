"""The fused RLRR kernel's own source, executed on the CPU: ``peft/kernels/rlrr_kernel.cu`` compiled for the host
(launch lines rewritten mechanically, CUDA built-ins emulated with one fiber per CUDA thread, barriers and warp
shuffles as real rendezvous points; tests/kernel_host/) and compared with the PyTorch specification.

Sweeps: fp32/fp16/bf16 weights in and out, G in every dtype with W in every dtype, ranks 1-8, shapes that are not
multiples of any block or tile size, the three ViT-B/16 layer shapes, forced small grids (grid-stride loops), and
the autograd Function end to end with the kernel in place of the PyTorch path. A mutation check shows these tests
fail when the kernel is wrong. Skipped only where no C++ compiler exists.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from kernel_host.build import HostKernel, build, compiler, host_source
from peft import kernels
from peft.functional import rlrr_scale_grads
from peft.rlrr_function import RLRRLinearFunction

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C++ compiler (g++) to build the kernel for the host")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((1, 1), (67, 131), (130, 45), (129, 33))  # none a multiple of 32, 128 or 256
VIT_B16 = ((768, 768), (3072, 768), (768, 3072))  # q/k/v/proj, fc1, fc2 as (out, in)


@pytest.fixture(scope="module")
def host():
    return HostKernel(build(host_source()))


def problem(out_f, in_f, rank, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + out_f + in_f + rank)
    return (torch.randn(out_f, in_f, generator=g), torch.randn(out_f, in_f, generator=g),
            torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g))


def check_weight(got, w, s_out, s_in):
    """Within one rounding step of the output dtype of the exact value (plus fp32 arithmetic)."""
    exact = w.double() * (1 + s_out.double() @ s_in.double())
    err = (got.double() - exact).abs()
    bound = torch.finfo(got.dtype).eps * exact.abs() + 1e-6 * exact.abs().max()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} ({got.dtype})"


def check_grads(got, g, w, s_out, s_in):
    want = [t.double() for t in rlrr_scale_grads(g.double(), w.double(), s_out.double(), s_in.double())]
    for name, a, b in zip(("s_out", "s_in"), got, want):
        err = (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
        assert err <= 1e-5, f"grad {name}: relative error {err:.3g}"


@pytest.mark.parametrize("rank", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_weight_kernel_every_dtype_pair(host, rank, shape):
    w32, _, s_out, s_in = problem(*shape, rank)
    for w_dtype in DTYPES:
        w = w32.to(w_dtype)
        for out_dtype in DTYPES:
            check_weight(host.weight(w, s_out, s_in, out_dtype), w, s_out, s_in)


@pytest.mark.parametrize("rank", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_kernel_every_dtype_pair_and_deterministic(host, rank, shape):
    g32, w32, s_out, s_in = problem(*shape, rank)
    for g_dtype in DTYPES:
        for w_dtype in DTYPES:
            g, w = g32.to(g_dtype), w32.to(w_dtype)
            got = host.grad_scales(g, w, s_out, s_in)
            check_grads(got, g, w, s_out, s_in)
    again = host.grad_scales(g, w, s_out, s_in)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # no atomics: bitwise the same every time


@pytest.mark.parametrize("shape", VIT_B16, ids=["qkv-proj", "fc1", "fc2"])
def test_vit_b16_layer_shapes(host, shape):
    g, w, s_out, s_in = problem(*shape, 1)
    check_weight(host.weight(w, s_out, s_in, torch.bfloat16), w, s_out, s_in)
    check_grads(host.grad_scales(g.bfloat16(), w, s_out, s_in), g.bfloat16(), w, s_out, s_in)


def test_forced_small_grids_exercise_the_grid_stride_loops(host, monkeypatch):
    monkeypatch.setenv("CUDA_EMU_MAX_GRID", "3")  # 3 blocks for 130 rows (weight) and for the finishing sums
    for rank in (1, 5):
        g, w, s_out, s_in = problem(130, 45, rank)
        check_weight(host.weight(w, s_out, s_in, torch.float32), w, s_out, s_in)
        check_grads(host.grad_scales(g, w, s_out, s_in), g, w, s_out, s_in)


def test_the_host_build_passes_the_libraries_own_self_test(host):
    kernels.self_test(host, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the first RLRR forward of GPU training would
        kernels.self_test(host, device="cpu")


@pytest.mark.parametrize("rank", [1, 3])
def test_function_end_to_end_kernel_vs_torch_path(host, rank):
    torch.manual_seed(rank)
    x = torch.randn(2, 5, 45, requires_grad=True)
    w, b = torch.randn(67, 45), torch.randn(67)
    s_out, s_in, f = (torch.randn(67, rank, requires_grad=True), torch.randn(rank, 45, requires_grad=True),
                      torch.randn(67, requires_grad=True))

    def run():
        y = RLRRLinearFunction.apply(x, w, b, s_out, s_in, f)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, 67)).sum(), (x, s_out, s_in, f))
        return [y.detach(), *grads]

    kernels.set_backend("torch")
    reference = run()
    with kernels.use_host_build(host):
        kernels.set_backend("cuda")  # the kernel path, or an error: never a silent fallback
        fused = run()
        assert kernels.describe("cpu").startswith("fused kernel")
    kernels.set_backend(None)
    for a, b_ in zip(fused, reference):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


MUTANTS = {  # seeded bugs, each a one-line change a reviewer could miss
    "shuffle skips a step": ("for (int offset = 16; offset > 0; offset >>= 1)", "for (int offset = 8; offset > 0; offset >>= 1)"),
    "wrong rank index": ("scale += so[k] * s_in[(int64_t)k * cols + j];", "scale += so[k] * s_in[j];"),
    "missing barrier": ("    __syncthreads();\n    if (warp == 0 && col_ok) {", "    if (warp == 0 && col_ok) {"),
    "drops a partial": ("for (int64_t b = 0; b < n_col_tiles; ++b) s +=", "for (int64_t b = 1; b < n_col_tiles; ++b) s +="),
    "grid stride off by one": ("i += gridDim.x)", "i += gridDim.x + 1)"),
}


@pytest.mark.parametrize("name", MUTANTS)
def test_the_tests_catch_a_wrong_kernel(name, monkeypatch):
    before, after = MUTANTS[name]
    source = host_source()
    assert source.count(before) == 1, f"mutation site for {name!r} not found"
    mutant = HostKernel(build(source.replace(before, after)))
    monkeypatch.setenv("CUDA_EMU_MAX_GRID", "3")
    failures = 0
    for shape, rank in (((130, 45), 3), ((67, 131), 2)):
        g, w, s_out, s_in = problem(*shape, rank)
        for check in (lambda: check_weight(mutant.weight(w, s_out, s_in, torch.float32), w, s_out, s_in),
                      lambda: check_grads(mutant.grad_scales(g, w, s_out, s_in), g, w, s_out, s_in)):
            try:
                check()
            except AssertionError:
                failures += 1
    assert failures > 0, f"the mutant {name!r} passed every check"


def _layer(rank=1):
    from torch import nn

    from peft.rlrr import RLRRLinear

    torch.manual_seed(0)
    return RLRRLinear(nn.Linear(45, 67), rank=rank)


@pytest.mark.parametrize("path", ["torch", "fused"])
def test_an_rlrr_layer_compiles_with_zero_graph_breaks(host, path):
    import torch._dynamo

    layer = _layer(rank=2)
    x = torch.randn(3, 45, requires_grad=True)

    def step(x):
        return layer(x).square().sum()

    torch._dynamo.reset()
    kernels.set_backend("torch" if path == "torch" else "cuda")
    try:
        with kernels.use_host_build(host) if path == "fused" else contextlib.nullcontext():
            explanation = torch._dynamo.explain(step)(x)
            compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
            loss = compiled(x)
            loss.backward()
            expected = layer(x.detach().requires_grad_()).square().sum()
    finally:
        kernels.set_backend(None)
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert layer.s_out.grad is not None and layer.s_in.grad is not None


def test_a_graph_of_the_fused_backward_keeps_every_term(host):
    """A gradient penalty (create_graph=True) through the fused path equals the naive formula's, instead of
    silently dropping the terms that run through the kernels' outputs."""
    torch.manual_seed(1)
    x = torch.randn(4, 45, requires_grad=True)
    w, b = torch.randn(67, 45), torch.randn(67)
    s_out, s_in = torch.randn(67, 1, requires_grad=True), torch.randn(1, 45, requires_grad=True)
    f = torch.zeros(67, requires_grad=True)

    def penalty(fn):
        gx, = torch.autograd.grad(fn(x).tanh().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (s_out, s_in))

    naive = penalty(lambda x: torch.nn.functional.linear(x, w * (1 + s_out @ s_in), b + f))
    kernels.set_backend("cuda")
    try:
        with kernels.use_host_build(host):
            fused = penalty(lambda x: RLRRLinearFunction.apply(x, w, b, s_out, s_in, f))
    finally:
        kernels.set_backend(None)
    for a, c in zip(fused, naive):
        assert ((a - c).norm() / c.norm()).item() < 1e-5


@pytest.mark.parametrize("memory", ["keep", "reuse"])
def test_the_weight_memory_options_compile_too(memory):
    import torch._dynamo
    from torch import nn

    from peft.rlrr import RLRRLinear

    layer = RLRRLinear(nn.Linear(45, 67), weight_memory=memory)
    explanation = torch._dynamo.explain(lambda x: layer(x).sum())(torch.randn(3, 45, requires_grad=True))
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
