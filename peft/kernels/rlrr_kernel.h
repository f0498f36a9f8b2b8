// The interface of the RLRR kernels, in one place: the dtype codes and the maximum rank (read by the tests'
// host build too, tests/kernel_host/build.py), and the C launchers rlrr_kernel.cu defines and rlrr_binding.cpp
// calls. Plain C declarations: no CUDA or PyTorch header is needed to include it.
#ifndef VIT_PEFT_RLRR_KERNEL_H
#define VIT_PEFT_RLRR_KERNEL_H

#include <stdint.h>

// dtype codes of the buffers handed to the launchers
#define RLRR_F32 0
#define RLRR_F16 1
#define RLRR_BF16 2

// The largest rank the kernels handle; the binding and Python fall back to PyTorch above it.
#define RLRR_MAX_RANK 8

#ifdef __cplusplus
extern "C" {
#endif

// A message for a launcher's return code: -1 unsupported dtype/rank/shape, > 0 a cudaError_t.
const char* rlrr_error_string(int code);
int rlrr_max_rank(void);
// Workspace sizes (in floats) for rlrr_grad: partial row sums and partial column sums.
void rlrr_grad_workspace(int64_t rows, int64_t cols, int rank, int64_t* out_floats, int64_t* in_floats);
// out (rows, cols, out_dtype) = w (rows, cols, w_dtype) ⊙ (1 + s_out s_in); all buffers contiguous.
int rlrr_weight(const void* w, int w_dtype, const float* s_out, const float* s_in, void* out, int out_dtype,
                int64_t rows, int64_t cols, int rank, void* stream);
// grad_s_out (rows, rank) and grad_s_in (rank, cols), fp32, from g (rows, cols) and w (rows, cols);
// part_out / part_in: fp32 workspaces of the sizes given by rlrr_grad_workspace.
int rlrr_grad(const void* g, int g_dtype, const void* w, int w_dtype, const float* s_out, const float* s_in,
              float* grad_s_out, float* grad_s_in, float* part_out, float* part_in,
              int64_t rows, int64_t cols, int rank, void* stream);

#ifdef __cplusplus
}
#endif

#endif  // VIT_PEFT_RLRR_KERNEL_H
