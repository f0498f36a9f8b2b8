"""The fused RLRR CUDA kernel: compile checks (need only nvcc / g++) and kernel-vs-PyTorch checks (need a GPU).

The PyTorch path in peft/functional.py is the specification; on a GPU the kernel must match it (float32
tightly, bfloat16/float16 loosely) and be deterministic. Without a GPU those tests skip with a reason, and
the sources are still compiled for sm_80 and sm_90 when nvcc is on PATH.
"""

import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

from peft import kernels
from peft.functional import rlrr_scale_grads, rlrr_weight
from peft.rlrr_function import RLRRLinearFunction

KERNEL_CU = kernels.KERNEL_DIR / "rlrr_kernel.cu"
BINDING_CPP = kernels.KERNEL_DIR / "rlrr_binding.cpp"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


# ── compile checks: no GPU needed ──────────────────────────────────────────────────────────────────────

@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernel_source_compiles(arch, tmp_path):
    """The .cu includes no PyTorch header, so this takes a few seconds per architecture."""
    obj = tmp_path / f"rlrr_sm{arch}.o"
    cmd = [NVCC, "-c", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", str(KERNEL_CU),
           "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert obj.stat().st_size > 0
    # the launchers the binding declares are exported with C linkage
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True).stdout
        for name in ("rlrr_weight", "rlrr_grad", "rlrr_grad_workspace", "rlrr_max_rank", "rlrr_error_string"):
            assert f" T {name}\n" in symbols, f"{name} not exported"


def test_kernel_max_rank_matches_python():
    source = KERNEL_CU.with_name("rlrr_kernel.h").read_text()
    assert f"#define RLRR_MAX_RANK {kernels.MAX_RANK}\n" in source


def _cuda_lib_dir():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "lib64", "libcudart.so")):
            return os.path.join(home, "lib64")
    return None


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None or GXX is None, reason="needs nvcc and g++")
@pytest.mark.skipif(os.environ.get("VIT_PEFT_TEST_BINDING") != "1",
                    reason="compiling against the PyTorch headers takes ~1 min; set VIT_PEFT_TEST_BINDING=1 to run")
def test_binding_builds_links_and_checks_inputs(tmp_path):
    """Build the extension by hand (as cpp_extension.load would) against this PyTorch, even a CPU-only one,
    import it, and call it: the C launchers link, the signatures are as Python calls them, inputs are checked."""
    import importlib.util

    from torch.utils.cpp_extension import include_paths

    lib = _cuda_lib_dir()
    if lib is None:
        pytest.skip("libcudart.so not found (set CUDA_HOME)")
    kernel_o = tmp_path / "kernel.o"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    module = tmp_path / f"rlrr_linkcheck{suffix}"
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    steps = [
        [NVCC, "-c", "-O1", "-std=c++20", "-Xcompiler", "-fPIC", "-gencode=arch=compute_80,code=sm_80",
         str(KERNEL_CU), "-o", str(kernel_o)],
        [GXX, "-std=c++20", "-O0", "-fPIC", "-shared", "-DTORCH_EXTENSION_NAME=rlrr_linkcheck",
         "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{sysconfig.get_paths()['include']}"]
        + [f"-I{p}" for p in include_paths()]
        + [str(BINDING_CPP), str(kernel_o), f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
           f"-L{lib}", "-lcudart", f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{lib}", "-o", str(module)],
    ]
    for cmd in steps:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
    spec = importlib.util.spec_from_file_location("rlrr_linkcheck", module)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    assert ext.max_rank() == kernels.MAX_RANK
    w, s_out, s_in = torch.randn(4, 3), torch.randn(4, 1), torch.randn(1, 3)
    with pytest.raises(RuntimeError, match="must be on CUDA"):
        ext.rlrr_weight_out(w, s_out, s_in, torch.empty(4, 3), 0)
    with pytest.raises(RuntimeError, match="must be on CUDA"):
        ext.rlrr_grad_scales(w, w, s_out, s_in, 0)


# ── kernel vs PyTorch: need a GPU ──────────────────────────────────────────────────────────────────────

SHAPES = [(768, 768, 1), (3072, 768, 1), (768, 3072, 1), (300, 77, 1), (129, 33, 2), (64, 40, 8), (1, 1, 1)]
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
              torch.float16: dict(rtol=2e-3, atol=1e-3)}


@pytest.fixture
def cuda_kernel():
    try:
        kernels.load_extension()
    except kernels.KernelUnavailableError as exc:  # e.g. a GPU machine without nvcc/ninja: auto falls back
        pytest.skip(f"the RLRR extension cannot be built here: {exc}")
    kernels.set_backend("cuda")
    yield kernels.load_extension()
    kernels.set_backend(None)


def _params(out, inp, rank, seed=0, w_dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out, inp, device="cuda", generator=g).to(w_dtype)
    s_out = torch.rand(out, rank, device="cuda", generator=g) * 2 - 1
    s_in = torch.rand(rank, inp, device="cuda", generator=g) * 2 - 1
    return w, s_out, s_in


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("out, inp, rank", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_kernel_matches_reference(cuda_kernel, out, inp, rank, dtype):
    w, s_out, s_in = _params(out, inp, rank)
    got = kernels.rlrr_weight(w, s_out, s_in, dtype)
    ref = rlrr_weight(w, s_out, s_in, dtype)
    assert got.dtype == dtype and got.shape == (out, inp)
    torch.testing.assert_close(got.float(), ref.float(), **TOLERANCES[dtype])


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("out, inp, rank", SHAPES)
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
def test_grad_kernel_matches_reference_and_is_deterministic(cuda_kernel, out, inp, rank, g_dtype):
    w, s_out, s_in = _params(out, inp, rank, seed=1)
    grad_w = torch.randn(out, inp, device="cuda").to(g_dtype)
    d_out, d_in = kernels.rlrr_grad_scales(grad_w, w, s_out, s_in)
    ref_out, ref_in = rlrr_scale_grads(grad_w.double(), w.double(), s_out.double(), s_in.double())
    assert d_out.dtype == d_in.dtype == torch.float32
    assert d_out.shape == (out, rank) and d_in.shape == (rank, inp)
    # fp32 accumulation of O(n) terms of size O(1): absolute error ~ 1e-6 * sqrt(n) * |terms|
    torch.testing.assert_close(d_out.double(), ref_out, rtol=1e-4, atol=1e-4 * max(1.0, inp ** 0.5))
    torch.testing.assert_close(d_in.double(), ref_in, rtol=1e-4, atol=1e-4 * max(1.0, out ** 0.5))
    d_out2, d_in2 = kernels.rlrr_grad_scales(grad_w, w, s_out, s_in)
    assert torch.equal(d_out, d_out2) and torch.equal(d_in, d_in2)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_function_kernel_vs_torch_path(cuda_kernel, rank, autocast_dtype):
    torch.manual_seed(0)
    x = torch.randn(8, 197, 768, device="cuda", requires_grad=True)
    w, s_out, s_in = _params(3072, 768, rank, seed=2)
    w = w / 768 ** 0.5
    b = torch.randn(3072, device="cuda")
    s_out.requires_grad_()
    s_in.requires_grad_()
    f = torch.zeros(3072, device="cuda", requires_grad=True)
    gy = torch.randn(8, 197, 3072, device="cuda")
    results = {}
    for backend in ("cuda", "torch"):
        kernels.set_backend(backend)
        with torch.autocast("cuda", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            y = RLRRLinearFunction.apply(x, w, b, s_out, s_in, f)
        grads = torch.autograd.grad(y, [x, s_out, s_in, f], gy.to(y.dtype))
        results[backend] = (y.float(), [g.float() for g in grads])
    kernels.set_backend("cuda")
    (y1, g1), (y2, g2) = results["cuda"], results["torch"]
    if autocast_dtype is None:
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        for a, r in zip(g1, g2):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    else:
        # same bf16 GEMMs on both paths; only the W' rounding and the fp32 reduction order differ
        torch.testing.assert_close(y1, y2, rtol=2e-2, atol=2e-2)
        for a, r in zip(g1, g2):
            assert ((a - r).norm() / r.norm()).item() < 1e-2


@needs_gpu
@pytest.mark.gpu
def test_kernel_path_saves_less_memory_than_official(cuda_kernel):
    """Peak memory of forward+backward through a stack of adapted layers: the Function path keeps no W'."""
    import vit

    import peft

    peaks = {}
    for impl in ("function", "official"):
        torch.cuda.empty_cache()
        model = vit.VisionTransformer(vit.get_config("ViT-B/16", num_classes=10)).cuda()
        peft.apply_rlrr(model, impl=impl)
        x = torch.randn(2, 3, 224, 224, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x).sum().backward()
        peaks[impl] = torch.cuda.max_memory_allocated() - base
        del model, x
    # the official graph holds at least one fp32 W' per adapted layer (~85M floats = 340 MB for B/16)
    assert peaks["official"] - peaks["function"] > 200e6, peaks

