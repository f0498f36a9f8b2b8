"""The optional fused CUDA kernel behind :class:`peft.rlrr_function.RLRRLinearFunction`.

Two kernels (``rlrr_kernel.cu``, plain CUDA; bound to PyTorch in ``rlrr_binding.cpp``):

* ``rlrr_weight``: W' = W ⊙ (1 + S_out S_in), read W once and write W' once, directly in the compute dtype
  (float32, float16 or bfloat16), with no fp32 out×in temporaries in between.
* ``rlrr_grad_scales``: one pass over the weight gradient G = dYᵀX (from cuBLAS) and W giving
  ∂s_out = (G ⊙ W) S_inᵀ (row sums) and ∂s_in = S_outᵀ (G ⊙ W) (column sums) without forming G ⊙ W.
  Two-stage reduction with fp32 accumulation and no atomics, so results are deterministic.

Ranks 1..8 run on the kernel; larger ranks and float64 use the PyTorch path (the specification).

Which path runs is chosen by :func:`set_backend` or the environment variable ``VIT_PEFT_KERNEL``:

* ``auto`` (default): the kernel for CUDA tensors when it builds and passes its self-test; otherwise one
  warning and the PyTorch path. ``describe(device)`` says which path is taken and why (training logs it).
* ``cuda``: the kernel, or a clear error if it cannot be used (no GPU, no compiler, failed self-test, tensors
  on the CPU).
* ``torch``: always the PyTorch reference path.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` and cached in PyTorch's
extensions directory (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).
Right after building, :func:`self_test` runs both kernels on small random problems (fp32 and bf16, ranks 1
and 3, shapes that are not multiples of any block size) and compares them with the PyTorch specification; a
kernel that disagrees is never used. This matters because the kernel was written and compile-checked on a
machine without a GPU (see the README): ``auto`` can be the default only because a wrong kernel falls back to
the specification instead of silently training with wrong gradients.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import torch

from ..functional import rlrr_scale_grads, rlrr_weight as reference_weight
from . import preflight

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = (KERNEL_DIR / "rlrr_binding.cpp", KERNEL_DIR / "rlrr_kernel.cu")
# bump the version when the sources change incompatibly; one name per import name (a checkout's `peft`, an installed
# `vit_peft`), so the two never rebuild over each other or load each other's library
_PACKAGE = __name__.split(".")[0]
EXTENSION_NAME = "vit_peft_rlrr_v2" + ("" if _PACKAGE == "vit_peft" else f"_{_PACKAGE}")
BUILD_LOCK_TIMEOUT = float(os.environ.get("VIT_PEFT_BUILD_LOCK_TIMEOUT", "600"))  # seconds
MAX_RANK = 8  # RLRR_MAX_RANK in rlrr_kernel.cu
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "cuda", "torch")
ENV_VAR = "VIT_PEFT_KERNEL"

_backend_override: str | None = None
_lock = threading.Lock()
_extension = None
_failure: str | None = None  # why the kernel is never used in this process (build error, failed self-test)
_warned: set[str] = set()
_host_build = None  # a host (CPU) build of the kernel source, installed by the tests: CPU tensors then use it


class KernelUnavailableError(RuntimeError):
    """The CUDA kernel was requested (``VIT_PEFT_KERNEL=cuda``) but cannot be used here."""


def set_backend(backend: str | None) -> None:
    """Choose the RLRR path for the whole process: "auto", "cuda", "torch", or None to follow the env var."""
    global _backend_override
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown RLRR backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _backend_override = backend


def get_backend() -> str:
    """The backend in force: :func:`set_backend`'s choice, else ``$VIT_PEFT_KERNEL``, else "auto"."""
    if _backend_override is not None:
        return _backend_override
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def _autocast_disabled():
    """Autocast off on every device type: the self-test compares exact math, whatever the caller runs under."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        try:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        except RuntimeError:  # a device type this build of torch has no autocast for
            pass
    return stack


def _is_transient(exc: BaseException) -> bool:
    """Errors that say nothing about the kernel (out of memory, an interrupted build): tried again next time."""
    return isinstance(exc, (torch.cuda.OutOfMemoryError, KeyboardInterrupt)) or "out of memory" in str(exc).lower()


def load_extension():
    """Build (first call) or load the compiled extension and self-test it; raises KernelUnavailableError.

    A build error or a failed self-test is remembered for the rest of the process (the kernel is then never
    used); a transient error such as running out of memory is not, so the next call tries again.
    """
    global _extension, _failure
    with _lock:
        if _extension is not None:
            return _extension
        if _failure is not None:
            raise KernelUnavailableError(_failure)
        if not torch.cuda.is_available():
            raise KernelUnavailableError("the RLRR CUDA kernel needs a CUDA device and none is available")
        problem = preflight.build_problem()
        if problem is not None:  # say what is missing instead of a compiler log
            _failure = f"the RLRR CUDA kernel cannot be built here: {problem}"
            raise KernelUnavailableError(_failure)
        try:
            from torch.utils.cpp_extension import load  # needs a compiler and ninja: only on first use

            with preflight.build_lock(EXTENSION_NAME, BUILD_LOCK_TIMEOUT):
                log.info("building (or loading the cached build of) the RLRR CUDA kernel %s; a first build takes "
                         "about a minute", EXTENSION_NAME)
                ext = load(name=EXTENSION_NAME, sources=[str(s) for s in SOURCES],
                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], verbose=False)
        except preflight.BuildLockTimeout as exc:  # another build still running: not remembered, tried again
            raise KernelUnavailableError(str(exc)) from exc
        except Exception as exc:  # compiler missing, CUDA/toolkit mismatch, ...
            reason = f"the RLRR CUDA kernel could not be built: {exc}"
            if not _is_transient(exc):
                _failure = reason
            raise KernelUnavailableError(reason) from exc
        try:
            self_test(ext)
        except SelfTestError as exc:
            _failure = f"the RLRR CUDA kernel failed its self-test, so it is not used: {exc}"
            raise KernelUnavailableError(_failure) from exc
        except Exception as exc:
            reason = f"the RLRR CUDA kernel's self-test could not run: {type(exc).__name__}: {exc}"
            if not _is_transient(exc):
                _failure = reason
            raise KernelUnavailableError(reason) from exc
        _extension = ext
        log.info("RLRR CUDA kernel built and self-tested")
        return _extension


# (weight dtype, W' dtype, tolerance relative to the largest value): what training produces. The kernel's W'
# may differ from the reference by one rounding step of its output dtype.
WEIGHT_CASES = ((torch.float32, torch.float32, 1e-5), (torch.float32, torch.bfloat16, 1e-2),
                (torch.float32, torch.float16, 2e-3), (torch.float16, torch.float16, 2e-3),
                (torch.bfloat16, torch.bfloat16, 1e-2))
# (G dtype, W dtype): G comes from cuBLAS in the compute dtype (bf16/fp16 under autocast), W is the fp32 master
# (or fp16 for a half model). Sums are fp32 in both, over the same rounded inputs: tolerance 1e-5.
GRAD_CASES = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
              (torch.float16, torch.float16))


def self_test(ext, device: str = "cuda") -> None:
    """Compare both kernels of a freshly built extension with the PyTorch specification; raise if they differ.

    Small random problems (ranks 1 and 3, shapes that are not multiples of any block size) in every dtype pair of
    :data:`WEIGHT_CASES` and :data:`GRAD_CASES`, with autocast disabled and the references computed in float64
    from the same (rounded) inputs: the reference is the exact math even when the first RLRR layer runs inside
    ``torch.autocast`` (as training on a GPU does) or the caller allowed TF32 / reduced-precision float32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``, ``set_float32_matmul_precision("high")``), which would otherwise
    put the reference ~1e-3 off and reject a correct kernel.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    with _autocast_disabled():
        stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
        for out_f, in_f, rank in ((67, 131, 1), (130, 45, 3)):
            w32, g32 = (torch.randn(out_f, in_f, generator=gen).to(device) for _ in range(2))
            s_out = torch.randn(out_f, rank, generator=gen).to(device)
            s_in = torch.randn(rank, in_f, generator=gen).to(device)
            for w_dtype, dtype, tol in WEIGHT_CASES:
                w = w32.to(w_dtype)
                got = torch.empty(w.shape, dtype=dtype, device=w.device)
                ext.rlrr_weight_out(w, s_out, s_in, got, stream)
                want = reference_weight(w.double(), s_out.double(), s_in.double(), torch.float64).to(dtype)
                _check_close(f"rlrr_weight W {w_dtype} -> {dtype} rank {rank}", got.float(), want.float(), tol)
            for g_dtype, w_dtype in GRAD_CASES:
                g, w = g32.to(g_dtype), w32.to(w_dtype)
                got_so, got_si = ext.rlrr_grad_scales(g, w, s_out, s_in, stream)
                want_so, want_si = rlrr_scale_grads(g.double(), w.double(), s_out.double(), s_in.double())
                what = f"G {g_dtype} W {w_dtype} rank {rank}"
                _check_close(f"grad s_out {what}", got_so, want_so, 1e-5)
                _check_close(f"grad s_in {what}", got_si, want_si, 1e-5)


class SelfTestError(RuntimeError):
    """A kernel result differs from the PyTorch specification."""


def _check_close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-30)
    if not err <= tol:  # also catches NaN
        raise SelfTestError(f"self-test failed: {what} differs from the PyTorch specification "
                            f"(max error {err:.2e} relative to the largest value, tolerance {tol:.0e})")


@contextlib.contextmanager
def use_host_build(ext):
    """Inside the ``with``, CPU tensors take the fused path through ``ext``, a build of ``rlrr_kernel.cu`` for the
    host (``tests/kernel_host``: CUDA emulated on the CPU). This is how the tests execute the kernel's own source
    on machines without a GPU; nothing else installs one."""
    global _host_build
    previous, _host_build = _host_build, ext
    try:
        yield ext
    finally:
        _host_build = previous


def describe(device) -> str:
    """Which RLRR path layers on ``device`` take under the current backend, and why (builds the kernel if needed)."""
    device = torch.device(device)
    backend = get_backend()
    if backend == "torch":
        return f"PyTorch path ({ENV_VAR}=torch)"
    if device.type == "cpu" and _host_build is not None:
        return "fused kernel (a host build of the CUDA source, as the tests install)"
    if device.type != "cuda":
        return f"PyTorch path (tensors on {device.type}; the kernel is CUDA only)"
    try:
        load_extension()
    except KernelUnavailableError as exc:
        if backend == "cuda":
            raise
        return f"PyTorch path ({ENV_VAR}=auto: {exc})"
    return f"fused CUDA kernel ({ENV_VAR}={backend}, self-test passed)"


def kernel_available() -> bool:
    """True if a CUDA device is present and the extension builds (builds it on first call)."""
    try:
        load_extension()
        return True
    except KernelUnavailableError:
        return False


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def use_kernel(x_device: str, weight_device: str, rank: int, dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Decide whether the fused kernel runs (True) or the PyTorch path (False), from plain values only.

    Under ``torch.compile`` this is evaluated once at trace time and its answer baked into the graph
    (``assume_constant_result``), so the decision itself causes no graph break.
    """
    backend = get_backend()
    if backend == "torch":
        return False
    unsupported = None
    if rank > MAX_RANK:
        unsupported = f"rank {rank} > {MAX_RANK}"
    elif dtype not in KERNEL_DTYPES or weight_dtype not in KERNEL_DTYPES:
        unsupported = f"dtype {dtype} / weight dtype {weight_dtype}"
    if unsupported is not None:  # a limit of the kernel, not of the machine: fall back in both modes
        _warn_once(f"unsupported:{unsupported}", f"RLRR kernel does not handle {unsupported}; using PyTorch")
        return False
    if _host_build is not None and x_device == weight_device == "cpu":
        return True
    if not (x_device == weight_device == "cuda"):
        if backend == "cuda":
            raise KernelUnavailableError(
                f"{ENV_VAR}=cuda but the RLRR layer runs on {x_device}/{weight_device}; move the model and "
                f"inputs to CUDA or set {ENV_VAR}=auto or torch")
        return False  # auto on the CPU: the PyTorch path is the only one, nothing to warn about
    try:
        load_extension()
    except KernelUnavailableError as exc:
        if backend == "cuda":
            raise
        _warn_once("build", f"{ENV_VAR}=auto: {exc}; using the PyTorch RLRR path")
        return False
    return True


use_kernel = torch.compiler.assume_constant_result(use_kernel)


# ── the kernels as torch.library custom ops: opaque to torch.compile, with shape-only fake implementations ──
# One namespace per import name, so that a checkout's `peft` and an installed `vit_peft` never register twice.
OPS = "vit_peft" if __name__.split(".")[0] == "vit_peft" else f"vit_peft_{__name__.split('.')[0]}"


def _extension_for(t: torch.Tensor):
    return _host_build if not t.is_cuda and _host_build is not None else load_extension()


def _stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


@torch.library.custom_op(f"{OPS}::rlrr_weight", mutates_args=())
def _rlrr_weight_op(weight: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    _extension_for(weight).rlrr_weight_out(weight, s_out, s_in, out, _stream_of(weight))
    return out


@_rlrr_weight_op.register_fake
def _(weight, s_out, s_in, dtype):
    return weight.new_empty(weight.shape, dtype=dtype)


@torch.library.custom_op(f"{OPS}::rlrr_grad_scales", mutates_args=())
def _rlrr_grad_scales_op(grad_weight: torch.Tensor, weight: torch.Tensor, s_out: torch.Tensor,
                         s_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_s_out, grad_s_in = _extension_for(weight).rlrr_grad_scales(grad_weight, weight, s_out, s_in,
                                                                     _stream_of(weight))
    return grad_s_out, grad_s_in


@_rlrr_grad_scales_op.register_fake
def _(grad_weight, weight, s_out, s_in):
    rows, cols, rank = weight.shape[0], weight.shape[1], s_out.shape[1]
    return weight.new_empty((rows, rank), dtype=torch.float32), weight.new_empty((rank, cols), dtype=torch.float32)


def rlrr_weight(weight: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W ⊙ (1 + s_out @ s_in) as a new (out, in) tensor of ``dtype``, computed by the fused kernel (a custom op)."""
    with torch.cuda.device(weight.device) if weight.is_cuda else contextlib.nullcontext():
        return _rlrr_weight_op(weight, s_out, s_in, dtype)


def rlrr_grad_scales(grad_weight: torch.Tensor, weight: torch.Tensor, s_out: torch.Tensor,
                     s_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂s_out (out, r), ∂s_in (r, in)) in float32 from G = dYᵀX and W, computed by the fused kernel."""
    with torch.cuda.device(weight.device) if weight.is_cuda else contextlib.nullcontext():
        return _rlrr_grad_scales_op(grad_weight, weight, s_out, s_in)


__all__ = ["BACKENDS", "ENV_VAR", "KernelUnavailableError", "MAX_RANK", "SelfTestError", "describe", "get_backend",
           "use_host_build",
           "kernel_available", "load_extension", "rlrr_grad_scales", "rlrr_weight", "self_test", "set_backend",
           "use_kernel"]
