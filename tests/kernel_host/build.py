"""Build the project's CUDA kernel source for the host (tests only), and call its C launchers from Python.

``host_source()`` is ``peft/kernels/rlrr_kernel.cu`` verbatim except for a mechanical rewrite of its launch lines,
``k<<<grid, block, shmem, stream>>>(args)`` → ``::cuda_emu::Launch(grid, block, shmem, stream)(k, args)``; the
stand-in headers in ``include/`` (``cuda_emu.h``) emulate the CUDA built-ins it uses, one fiber per CUDA thread.
``build(source)`` compiles it with g++ into a shared library, cached by the source's hash, and ``HostKernel``
calls ``rlrr_weight`` / ``rlrr_grad`` on CPU tensors through ctypes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / "peft" / "kernels" / "rlrr_kernel.cu"
HEADER = KERNEL.with_name("rlrr_kernel.h")  # the dtype codes and launchers, shared with the binding
INCLUDE = Path(__file__).resolve().parent / "include"
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<(.*?)>>>\(", re.S)
_CODES = dict(re.findall(r"#define RLRR_(F32|F16|BF16) (\d+)", HEADER.read_text()))
DTYPE_CODES = {torch.float32: int(_CODES["F32"]), torch.float16: int(_CODES["F16"]), torch.bfloat16: int(_CODES["BF16"])}
CACHE = Path(os.environ.get("VIT_PEFT_HOST_KERNEL_CACHE", Path(tempfile.gettempdir()) / "vit-peft-host-kernel"))


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def host_source(text: str | None = None) -> str:
    """The kernel source with its launch syntax rewritten (and nothing else)."""
    text = KERNEL.read_text() if text is None else text
    rewritten, n = LAUNCH.subn(r"::cuda_emu::Launch(\2)(\1, ", text)
    if n != 3:
        raise AssertionError(f"expected the kernel's 3 launch lines, rewrote {n}")
    return rewritten


def build(source: str) -> Path:
    """Compile ``source`` (host-rewritten kernel code) into a shared library; cached by content."""
    digest = hashlib.sha256(source.encode() + (INCLUDE / "cuda_emu.h").read_bytes() + HEADER.read_bytes()).hexdigest()[:16]
    lib = CACHE / f"rlrr_host_{digest}.so"
    if lib.is_file():
        return lib
    CACHE.mkdir(parents=True, exist_ok=True)
    src = CACHE / f"rlrr_host_{digest}.cpp"
    src.write_text(source)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    # _FORTIFY_SOURCE's longjmp check rejects the jumps between fiber stacks, so it is switched off.
    cmd = [compiler(), "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-U_FORTIFY_SOURCE",
           "-D_FORTIFY_SOURCE=0", "-I", str(INCLUDE), "-I", str(HEADER.parent),
           "-x", "c++", str(src), "-o", str(tmp)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"host build failed:\n{out.stderr[-4000:]}")
    os.replace(tmp, lib)
    return lib


class HostKernel:
    """The two C launchers of a host build, on contiguous CPU tensors (the binding's job, done in Python)."""

    def __init__(self, lib: Path):
        self.lib = ctypes.CDLL(str(lib))
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.lib.rlrr_weight.argtypes = [p, i32, p, p, p, i32, i64, i64, i32, p]
        self.lib.rlrr_grad.argtypes = [p, i32, p, i32, p, p, p, p, p, p, i64, i64, i32, p]
        self.lib.rlrr_grad_workspace.argtypes = [i64, i64, i32, ctypes.POINTER(i64), ctypes.POINTER(i64)]
        self.lib.rlrr_max_rank.restype = i32

    def weight(self, w: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w = w.contiguous()
        so, si = s_out.float().contiguous(), s_in.float().contiguous()
        out = torch.full(w.shape, float("nan"), dtype=dtype)  # an element the kernel misses stays NaN
        status = self.lib.rlrr_weight(w.data_ptr(), DTYPE_CODES[w.dtype], so.data_ptr(), si.data_ptr(), out.data_ptr(),
                                      DTYPE_CODES[dtype], w.shape[0], w.shape[1], so.shape[1], None)
        if status != 0:
            raise RuntimeError(f"rlrr_weight returned {status}")
        return out

    def grad_scales(self, g: torch.Tensor, w: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor):
        g, w = g.contiguous(), w.contiguous()
        so, si = s_out.float().contiguous(), s_in.float().contiguous()
        rows, cols, rank = w.shape[0], w.shape[1], so.shape[1]
        n_out, n_in = ctypes.c_int64(), ctypes.c_int64()
        self.lib.rlrr_grad_workspace(rows, cols, rank, ctypes.byref(n_out), ctypes.byref(n_in))
        part_out, part_in = torch.empty(max(n_out.value, 1)), torch.empty(max(n_in.value, 1))
        gso, gsi = torch.full((rows, rank), float("nan")), torch.full((rank, cols), float("nan"))
        status = self.lib.rlrr_grad(g.data_ptr(), DTYPE_CODES[g.dtype], w.data_ptr(), DTYPE_CODES[w.dtype],
                                    so.data_ptr(), si.data_ptr(), gso.data_ptr(), gsi.data_ptr(), part_out.data_ptr(),
                                    part_in.data_ptr(), rows, cols, rank, None)
        if status != 0:
            raise RuntimeError(f"rlrr_grad returned {status}")
        return gso, gsi

    # the binding's interface, so that peft.kernels.self_test can run on a host build too
    def rlrr_weight_out(self, w, s_out, s_in, out, stream):
        out.copy_(self.weight(w, s_out, s_in, out.dtype))

    def rlrr_grad_scales(self, g, w, s_out, s_in, stream):
        return self.grad_scales(g, w, s_out, s_in)
