// torch.library binding of the CUDA scoring kernels: ops `themis_cuda::score_head` and
// `themis_cuda::add_rmsnorm` (CUDA dispatch key), each checking its tensors and calling the
// extern "C" launcher of themis_cuda.h on the current CUDA stream. Host C++ only: the .cu files
// see no torch header. Fake (meta) implementations are registered from Python (cuda_ext.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "themis_cuda.h"

namespace {

void check_bf16_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, op, ": ", name, " must be bfloat16, got ", t.scalar_type());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

// hidden [T, D] bf16 (unit column stride), score_index [N] int64, norm_weight [D] bf16,
// head [H, D] bf16 -> [N, H] float32
at::Tensor score_head(const at::Tensor& hidden, const at::Tensor& score_index, const at::Tensor& norm_weight,
                      const at::Tensor& head, double eps) {
  constexpr const char* op = "themis_cuda::score_head";
  check_bf16_cuda(hidden, op, "hidden");
  check_bf16_cuda(norm_weight, op, "norm_weight");
  check_bf16_cuda(head, op, "head");
  TORCH_CHECK(score_index.is_cuda() && score_index.device() == hidden.device(), op,
              ": score_index must be on the device of hidden");
  TORCH_CHECK(hidden.dim() == 2 && score_index.dim() == 1 && norm_weight.dim() == 1 && head.dim() == 2, op,
              ": expected hidden [T, D], score_index [N], norm_weight [D], head [H, D]");
  const int64_t T = hidden.size(0), D = hidden.size(1), N = score_index.size(0), H = head.size(0);
  TORCH_CHECK(norm_weight.size(0) == D && head.size(1) == D, op, ": norm_weight / head do not match D = ", D);
  c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor rows = hidden.stride(1) == 1 && (T <= 1 || hidden.stride(0) >= D) ? hidden : hidden.contiguous();
  at::Tensor index = score_index.to(at::kLong).contiguous();
  at::Tensor w = norm_weight.contiguous();
  at::Tensor hw = head.contiguous();
  at::Tensor out = at::empty({N, H}, hidden.options().dtype(at::kFloat));
  if (N == 0 || H == 0) return out;
  const int64_t stride = T > 1 ? rows.stride(0) : D;
  check_launch(themis_score_head_bf16(rows.data_ptr(), stride, T, D, index.data_ptr<int64_t>(), N, w.data_ptr(),
                                      hw.data_ptr(), H, static_cast<float>(eps), out.data_ptr<float>(),
                                      c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

// x, residual [..., D] bf16, weight [D] bf16 -> (y = rms_norm(x + residual), h = x + residual)
std::tuple<at::Tensor, at::Tensor> add_rmsnorm(const at::Tensor& x, const at::Tensor& residual,
                                               const at::Tensor& weight, double eps) {
  constexpr const char* op = "themis_cuda::add_rmsnorm";
  check_bf16_cuda(x, op, "x");
  check_bf16_cuda(residual, op, "residual");
  check_bf16_cuda(weight, op, "weight");
  TORCH_CHECK(x.sizes() == residual.sizes(), op, ": x and residual differ in shape");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), op,
              ": weight must be [D] with D = x.size(-1)");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t D = x.size(-1);
  at::Tensor xc = x.contiguous(), rc = residual.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  at::Tensor h = at::empty_like(xc);
  const int64_t rows = D > 0 ? xc.numel() / D : 0;
  if (rows == 0) return {y, h};
  check_launch(themis_add_rmsnorm_bf16(xc.data_ptr(), rc.data_ptr(), w.data_ptr(), y.data_ptr(), h.data_ptr(), rows,
                                       D, static_cast<float>(eps), c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return {y, h};
}

}  // namespace

TORCH_LIBRARY(themis_cuda, m) {
  m.def("score_head(Tensor hidden, Tensor score_index, Tensor norm_weight, Tensor head, float eps) -> Tensor");
  m.def("add_rmsnorm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(themis_cuda, CUDA, m) {
  m.impl("score_head", &score_head);
  m.impl("add_rmsnorm", &add_rmsnorm);
}
