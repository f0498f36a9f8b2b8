// Fused CUDA kernels for RLRR (Dong et al., CVPR 2024): the residual low-rank rescaled weight
//
//     W' = W ⊙ (1 + S_out S_in)        W: (out, in), S_out: (out, r), S_in: (r, in)
//
// and the gradients of the two scale matrices, given the full weight gradient G = dYᵀX (out, in):
//
//     ∂s_out[i,k] = Σ_j G[i,j] W[i,j] s_in[k,j]      (a reduction along each row)
//     ∂s_in[k,j]  = Σ_i G[i,j] W[i,j] s_out[i,k]     (a reduction along each column)
//
// The PyTorch code in peft/functional.py is the specification; these kernels only avoid out×in
// temporaries: the forward kernel writes W' once, straight in the compute dtype, and the backward kernel
// reads G and W once and never forms G ⊙ W.
//
// This file deliberately includes no PyTorch header: it is plain CUDA with C-style launchers, so that
// `nvcc -c` compiles it in seconds and the tests can compile-check it without a GPU. The binding in
// rlrr_binding.cpp checks shapes, dtypes and devices and calls the launchers on the current stream.
//
// Determinism: no floating-point atomics. The gradient reduction runs in two stages: each block writes
// partial sums for its tile into a workspace, then a second kernel adds the partials in a fixed order.
// All sums are accumulated in fp32, whatever the dtype of G and W.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "rlrr_kernel.h"  // dtype codes, RLRR_MAX_RANK and the launchers' declarations, shared with the binding

// Gradient tile: 32 columns (one per lane) × 128 rows, 8 warps per block, each warp taking every 8th row.
#define RLRR_TILE_COLS 32
#define RLRR_WARPS 8
#define RLRR_TILE_ROWS 128

namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------------------------
// Forward: W' = W ⊙ (1 + S_out S_in) written in the output dtype. One block per row (grid-stride over rows),
// threads along the columns, so loads and stores are coalesced and no index division is needed.
// s_out and s_in are fp32 (the binding converts them; they are tiny).
template <typename TW, typename TO>
__global__ void rlrr_weight_kernel(const TW* __restrict__ w, const float* __restrict__ s_out,
                                   const float* __restrict__ s_in, TO* __restrict__ out,
                                   int64_t rows, int64_t cols, int rank) {
    for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
        float so[RLRR_MAX_RANK];
#pragma unroll
        for (int k = 0; k < RLRR_MAX_RANK; ++k) so[k] = k < rank ? s_out[i * rank + k] : 0.0f;
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
            float scale = 1.0f;
#pragma unroll
            for (int k = 0; k < RLRR_MAX_RANK; ++k) {
                if (k < rank) scale += so[k] * s_in[(int64_t)k * cols + j];
            }
            out[i * cols + j] = from_float<TO>(to_float(w[i * cols + j]) * scale);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Backward, stage 1. Block (bx, by) covers columns [32 bx, 32 bx + 32) and rows [128 by, 128 by + 128).
// Lane l of warp w owns column j = 32 bx + l and rows i = 128 by + w + 8 t (t = 0..15).
//   row partials:    part_out[bx, i, k] = Σ_{j in tile} G[i,j] W[i,j] s_in[k,j]   (warp shuffle sum)
//   column partials: part_in[by, k, j]  = Σ_{i in tile} G[i,j] W[i,j] s_out[i,k]  (per lane, then over warps)
template <typename TG, typename TW>
__global__ void rlrr_grad_partial_kernel(const TG* __restrict__ g, const TW* __restrict__ w,
                                         const float* __restrict__ s_out, const float* __restrict__ s_in,
                                         float* __restrict__ part_out, float* __restrict__ part_in,
                                         int64_t rows, int64_t cols, int rank) {
    __shared__ float col_shared[RLRR_WARPS][RLRR_MAX_RANK][RLRR_TILE_COLS];

    const int lane = threadIdx.x;  // blockDim = (32, RLRR_WARPS)
    const int warp = threadIdx.y;
    const int64_t j = (int64_t)blockIdx.x * RLRR_TILE_COLS + lane;
    const bool col_ok = j < cols;
    const int64_t row0 = (int64_t)blockIdx.y * RLRR_TILE_ROWS;

    float sin_reg[RLRR_MAX_RANK];
    float col_acc[RLRR_MAX_RANK];
#pragma unroll
    for (int k = 0; k < RLRR_MAX_RANK; ++k) {
        sin_reg[k] = (k < rank && col_ok) ? s_in[(int64_t)k * cols + j] : 0.0f;
        col_acc[k] = 0.0f;
    }

    // The row index depends only on the warp, so every lane of a warp runs the same iterations and the
    // full-mask shuffles below are safe; lanes past the last column contribute zeros. Unrolled by 4 so that
    // several rows' loads are in flight per warp (the loop is latency-bound: 16 rows per warp, one load each).
#pragma unroll 4
    for (int t = warp; t < RLRR_TILE_ROWS; t += RLRR_WARPS) {
        const int64_t i = row0 + t;
        if (i >= rows) break;
        const float gw = col_ok ? to_float(g[i * cols + j]) * to_float(w[i * cols + j]) : 0.0f;
#pragma unroll
        for (int k = 0; k < RLRR_MAX_RANK; ++k) {
            if (k < rank) {
                col_acc[k] += gw * s_out[i * rank + k];
                float v = gw * sin_reg[k];
#pragma unroll
                for (int offset = 16; offset > 0; offset >>= 1) {
                    v += __shfl_xor_sync(0xffffffffu, v, offset);
                }
                if (lane == 0) part_out[((int64_t)blockIdx.x * rows + i) * rank + k] = v;
            }
        }
    }

#pragma unroll
    for (int k = 0; k < RLRR_MAX_RANK; ++k) {
        col_shared[warp][k][lane] = col_acc[k];
    }
    __syncthreads();
    if (warp == 0 && col_ok) {
        for (int k = 0; k < rank; ++k) {
            float s = 0.0f;
            for (int w2 = 0; w2 < RLRR_WARPS; ++w2) s += col_shared[w2][k][lane];  // fixed order
            part_in[((int64_t)blockIdx.y * rank + k) * cols + j] = s;
        }
    }
}

// Backward, stage 2: add the partials in a fixed order.
//   grad_s_out[i,k] = Σ_bx part_out[bx, i, k]     (n_col_tiles partials)
//   grad_s_in[k,j]  = Σ_by part_in[by, k, j]      (n_row_tiles partials)
__global__ void rlrr_grad_finish_kernel(const float* __restrict__ part_out, const float* __restrict__ part_in,
                                        float* __restrict__ grad_s_out, float* __restrict__ grad_s_in,
                                        int64_t rows, int64_t cols, int rank,
                                        int64_t n_col_tiles, int64_t n_row_tiles) {
    const int64_t n_out = rows * rank;
    const int64_t n_in = (int64_t)rank * cols;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n_out + n_in; idx += stride) {
        float s = 0.0f;
        if (idx < n_out) {
            for (int64_t b = 0; b < n_col_tiles; ++b) s += part_out[b * n_out + idx];
            grad_s_out[idx] = s;
        } else {
            const int64_t e = idx - n_out;
            for (int64_t b = 0; b < n_row_tiles; ++b) s += part_in[b * n_in + e];
            grad_s_in[e] = s;
        }
    }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_for(int64_t n, int threads) {
    int64_t blocks = ceil_div(n, threads);
    if (blocks > 65535LL * 16) blocks = 65535LL * 16;  // grid-stride loops cover the rest
    if (blocks < 1) blocks = 1;
    return (unsigned)blocks;
}

template <typename TW, typename TO>
void launch_weight(const void* w, const float* s_out, const float* s_in, void* out, int64_t rows,
                   int64_t cols, int rank, cudaStream_t stream) {
    const int threads = 256;
    const unsigned blocks = rows < 65535LL * 16 ? (unsigned)rows : 65535u * 16u;
    rlrr_weight_kernel<TW, TO><<<blocks, threads, 0, stream>>>(
        static_cast<const TW*>(w), s_out, s_in, static_cast<TO*>(out), rows, cols, rank);
}

template <typename TW>
int dispatch_weight_out(int out_dtype, const void* w, const float* s_out, const float* s_in, void* out,
                        int64_t rows, int64_t cols, int rank, cudaStream_t stream) {
    switch (out_dtype) {
        case RLRR_F32: launch_weight<TW, float>(w, s_out, s_in, out, rows, cols, rank, stream); return 0;
        case RLRR_F16: launch_weight<TW, __half>(w, s_out, s_in, out, rows, cols, rank, stream); return 0;
        case RLRR_BF16: launch_weight<TW, __nv_bfloat16>(w, s_out, s_in, out, rows, cols, rank, stream); return 0;
        default: return -1;
    }
}

template <typename TG, typename TW>
void launch_grad(const void* g, const void* w, const float* s_out, const float* s_in, float* part_out,
                 float* part_in, int64_t rows, int64_t cols, int rank, cudaStream_t stream) {
    dim3 block(RLRR_TILE_COLS, RLRR_WARPS);
    dim3 grid((unsigned)ceil_div(cols, RLRR_TILE_COLS), (unsigned)ceil_div(rows, RLRR_TILE_ROWS));
    rlrr_grad_partial_kernel<TG, TW><<<grid, block, 0, stream>>>(
        static_cast<const TG*>(g), static_cast<const TW*>(w), s_out, s_in, part_out, part_in, rows, cols, rank);
}

template <typename TG>
int dispatch_grad_w(int w_dtype, const void* g, const void* w, const float* s_out, const float* s_in,
                    float* part_out, float* part_in, int64_t rows, int64_t cols, int rank, cudaStream_t stream) {
    switch (w_dtype) {
        case RLRR_F32: launch_grad<TG, float>(g, w, s_out, s_in, part_out, part_in, rows, cols, rank, stream); return 0;
        case RLRR_F16: launch_grad<TG, __half>(g, w, s_out, s_in, part_out, part_in, rows, cols, rank, stream); return 0;
        case RLRR_BF16: launch_grad<TG, __nv_bfloat16>(g, w, s_out, s_in, part_out, part_in, rows, cols, rank, stream); return 0;
        default: return -1;
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// C-style launchers (extern "C", declared in rlrr_kernel.h). Return 0 on success, -1 for an
// unsupported dtype/rank/shape, or a positive cudaError_t from the launch (see rlrr_error_string).

extern "C" {

const char* rlrr_error_string(int code) {
    if (code == -1) return "unsupported dtype, rank or shape for the RLRR kernel";
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int rlrr_max_rank(void) { return RLRR_MAX_RANK; }

// Workspace sizes (in floats) for rlrr_grad: partial row sums and partial column sums.
void rlrr_grad_workspace(int64_t rows, int64_t cols, int rank, int64_t* out_floats, int64_t* in_floats) {
    *out_floats = ceil_div(cols, RLRR_TILE_COLS) * rows * rank;
    *in_floats = ceil_div(rows, RLRR_TILE_ROWS) * rank * cols;
}

// out (rows, cols, out_dtype) = w (rows, cols, w_dtype) ⊙ (1 + s_out s_in); all buffers contiguous.
int rlrr_weight(const void* w, int w_dtype, const float* s_out, const float* s_in, void* out, int out_dtype,
                int64_t rows, int64_t cols, int rank, void* stream_ptr) {
    if (rank < 1 || rank > RLRR_MAX_RANK || rows < 0 || cols < 0) return -1;
    if (rows == 0 || cols == 0) return 0;
    cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    int status;
    switch (w_dtype) {
        case RLRR_F32: status = dispatch_weight_out<float>(out_dtype, w, s_out, s_in, out, rows, cols, rank, stream); break;
        case RLRR_F16: status = dispatch_weight_out<__half>(out_dtype, w, s_out, s_in, out, rows, cols, rank, stream); break;
        case RLRR_BF16: status = dispatch_weight_out<__nv_bfloat16>(out_dtype, w, s_out, s_in, out, rows, cols, rank, stream); break;
        default: return -1;
    }
    if (status != 0) return status;
    return static_cast<int>(cudaGetLastError());
}

// grad_s_out (rows, rank) and grad_s_in (rank, cols), fp32, from g (rows, cols) and w (rows, cols).
// part_out / part_in: fp32 workspaces of the sizes given by rlrr_grad_workspace.
int rlrr_grad(const void* g, int g_dtype, const void* w, int w_dtype, const float* s_out, const float* s_in,
              float* grad_s_out, float* grad_s_in, float* part_out, float* part_in,
              int64_t rows, int64_t cols, int rank, void* stream_ptr) {
    if (rank < 1 || rank > RLRR_MAX_RANK || rows < 0 || cols < 0) return -1;
    if (ceil_div(rows, RLRR_TILE_ROWS) > 65535) return -1;  // grid.y limit: 8.3M rows
    if (rows == 0 || cols == 0) {
        cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
        cudaMemsetAsync(grad_s_out, 0, sizeof(float) * rows * rank, stream);
        cudaMemsetAsync(grad_s_in, 0, sizeof(float) * rank * cols, stream);
        return static_cast<int>(cudaGetLastError());
    }
    cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    int status;
    switch (g_dtype) {
        case RLRR_F32: status = dispatch_grad_w<float>(w_dtype, g, w, s_out, s_in, part_out, part_in, rows, cols, rank, stream); break;
        case RLRR_F16: status = dispatch_grad_w<__half>(w_dtype, g, w, s_out, s_in, part_out, part_in, rows, cols, rank, stream); break;
        case RLRR_BF16: status = dispatch_grad_w<__nv_bfloat16>(w_dtype, g, w, s_out, s_in, part_out, part_in, rows, cols, rank, stream); break;
        default: return -1;
    }
    if (status != 0) return status;
    int err = static_cast<int>(cudaGetLastError());
    if (err != 0) return err;
    const int threads = 256;
    const int64_t n_col_tiles = ceil_div(cols, RLRR_TILE_COLS);
    const int64_t n_row_tiles = ceil_div(rows, RLRR_TILE_ROWS);
    rlrr_grad_finish_kernel<<<grid_for(rows * rank + rank * cols, threads), threads, 0, stream>>>(
        part_out, part_in, grad_s_out, grad_s_in, rows, cols, rank, n_col_tiles, n_row_tiles);
    return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
