// PyTorch binding for the RLRR kernels in rlrr_kernel.cu (which includes no PyTorch header).
// Checks devices, shapes and dtypes, makes inputs contiguous, allocates outputs and the reduction workspace
// with PyTorch's caching allocator, and launches on the stream handed in by the caller.
//
// Only <torch/extension.h> is included (no c10/cuda headers): the Python side (peft/kernels/__init__.py)
// selects the device and passes torch.cuda.current_stream().cuda_stream, so this file also compiles
// (g++ -fsyntax-only) against a CPU-only PyTorch, which is how the tests check it without a GPU.

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "rlrr_kernel.h"  // the launchers and dtype codes of rlrr_kernel.cu

namespace {

int dtype_code(const torch::Tensor& t, const char* name) {
    switch (t.scalar_type()) {
        case at::ScalarType::Float: return RLRR_F32;
        case at::ScalarType::Half: return RLRR_F16;
        case at::ScalarType::BFloat16: return RLRR_BF16;
        default:
            TORCH_CHECK(false, "RLRR kernel: ", name, " has dtype ", t.scalar_type(),
                        "; supported: float32, float16, bfloat16");
    }
    return -1;
}

// Checks shared by both entry points; returns the rank.
int check_inputs(const torch::Tensor& w, const torch::Tensor& s_out, const torch::Tensor& s_in) {
    TORCH_CHECK(w.is_cuda() && s_out.is_cuda() && s_in.is_cuda(), "RLRR kernel: all tensors must be on CUDA");
    TORCH_CHECK(s_out.device() == w.device() && s_in.device() == w.device(),
                "RLRR kernel: weight, s_out and s_in must be on the same device");
    TORCH_CHECK(w.dim() == 2, "RLRR kernel: weight must be 2-D (out, in), got ", w.sizes());
    TORCH_CHECK(s_out.dim() == 2 && s_in.dim() == 2, "RLRR kernel: s_out must be (out, r) and s_in (r, in), got ",
                s_out.sizes(), " and ", s_in.sizes());
    const int64_t rank = s_out.size(1);
    TORCH_CHECK(s_out.size(0) == w.size(0) && s_in.size(0) == rank && s_in.size(1) == w.size(1),
                "RLRR kernel: shapes do not match: weight ", w.sizes(), ", s_out ", s_out.sizes(), ", s_in ",
                s_in.sizes());
    TORCH_CHECK(rank >= 1 && rank <= rlrr_max_rank(), "RLRR kernel: rank ", rank, " outside 1..", rlrr_max_rank());
    return static_cast<int>(rank);
}

void check_status(int status, const char* what) {
    TORCH_CHECK(status == 0, "RLRR kernel (", what, ") failed: ", rlrr_error_string(status));
}

}  // namespace

// `stream` is a cudaStream_t as an integer: the current stream of the weight's device, read by the custom op
// (peft/kernels/__init__.py) when it runs, not when a graph is traced. The device guard makes that device current.

// W' = W ⊙ (1 + s_out s_in), written into `out` (same shape as W; float32, float16 or bfloat16).
void rlrr_weight_out(const torch::Tensor& weight, const torch::Tensor& s_out, const torch::Tensor& s_in,
                     torch::Tensor out, int64_t stream) {
    const int rank = check_inputs(weight, s_out, s_in);
    const c10::DeviceGuard guard(weight.device());  // the launch goes to the weight's device, whatever is current
    TORCH_CHECK(out.is_cuda() && out.device() == weight.device() && out.sizes() == weight.sizes() &&
                    out.is_contiguous(),
                "RLRR kernel: out must be a contiguous CUDA tensor shaped like the weight");
    const auto w = weight.contiguous();
    const auto so = s_out.to(torch::kFloat).contiguous();
    const auto si = s_in.to(torch::kFloat).contiguous();
    const int status = rlrr_weight(w.data_ptr(), dtype_code(w, "weight"), so.data_ptr<float>(), si.data_ptr<float>(),
                                   out.data_ptr(), dtype_code(out, "out"), w.size(0), w.size(1), rank,
                                   reinterpret_cast<void*>(stream));
    check_status(status, "weight");
}

// (grad_s_out (out, r), grad_s_in (r, in)) in float32, from the weight gradient G = dYᵀX and W.
std::vector<torch::Tensor> rlrr_grad_scales(const torch::Tensor& grad_weight, const torch::Tensor& weight,
                                            const torch::Tensor& s_out, const torch::Tensor& s_in,
                                            int64_t stream) {
    const int rank = check_inputs(weight, s_out, s_in);
    const c10::DeviceGuard guard(weight.device());
    TORCH_CHECK(grad_weight.is_cuda() && grad_weight.device() == weight.device() &&
                    grad_weight.sizes() == weight.sizes(),
                "RLRR kernel: the weight gradient must be a CUDA tensor shaped like the weight, got ",
                grad_weight.sizes(), " vs ", weight.sizes());
    const auto g = grad_weight.contiguous();
    const auto w = weight.contiguous();
    const auto so = s_out.to(torch::kFloat).contiguous();
    const auto si = s_in.to(torch::kFloat).contiguous();
    const int64_t rows = w.size(0), cols = w.size(1);
    const auto opts = w.options().dtype(torch::kFloat);
    auto grad_s_out = torch::empty({rows, rank}, opts);
    auto grad_s_in = torch::empty({rank, cols}, opts);
    int64_t out_floats = 0, in_floats = 0;
    rlrr_grad_workspace(rows, cols, rank, &out_floats, &in_floats);
    auto part_out = torch::empty({out_floats > 0 ? out_floats : 1}, opts);
    auto part_in = torch::empty({in_floats > 0 ? in_floats : 1}, opts);
    const int status = rlrr_grad(g.data_ptr(), dtype_code(g, "grad_weight"), w.data_ptr(), dtype_code(w, "weight"),
                                 so.data_ptr<float>(), si.data_ptr<float>(), grad_s_out.data_ptr<float>(),
                                 grad_s_in.data_ptr<float>(), part_out.data_ptr<float>(), part_in.data_ptr<float>(),
                                 rows, cols, rank, reinterpret_cast<void*>(stream));
    check_status(status, "grad");
    return {grad_s_out, grad_s_in};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "Fused RLRR weight rescaling and scale-gradient reduction (see peft/kernels/rlrr_kernel.cu)";
    m.def("rlrr_weight_out", &rlrr_weight_out, "W' = W * (1 + s_out @ s_in) into out",
          py::arg("weight"), py::arg("s_out"), py::arg("s_in"), py::arg("out"), py::arg("stream"));
    m.def("rlrr_grad_scales", &rlrr_grad_scales, "(grad_s_out, grad_s_in) from G = dY^T X and W",
          py::arg("grad_weight"), py::arg("weight"), py::arg("s_out"), py::arg("s_in"), py::arg("stream"));
    m.def("max_rank", &rlrr_max_rank, "largest rank the kernels support");
}
