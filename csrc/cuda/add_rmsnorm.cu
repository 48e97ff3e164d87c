// Fused residual add + RMSNorm, bf16 in / out, float32 math, Hugging Face rounding order:
//   h = bf16(x + residual);  y = bf16(weight * bf16(h * rstd)),  rstd = rsqrt(mean(h^2) + eps).
// One block per row; each thread keeps its ITEMS vectors of h in registers between the two passes
// (sum of squares, then normalise), so x and residual are read once and h, y written once.
#include "common.cuh"
#include "themis_cuda.h"

namespace themis {
namespace {

template <int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads, 1) add_rmsnorm_kernel(
    const __nv_bfloat16* x, const __nv_bfloat16* residual,
    const __nv_bfloat16* __restrict__ weight, __nv_bfloat16* __restrict__ y_out, __nv_bfloat16* h_out,
    int D, float eps) {
  // x / residual may alias h_out (read before written, same thread): none of the three is __restrict__,
  // so the compiler never reads them through the non-coherent (read-only) cache path
  __shared__ float scratch[kWarp];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * D;
  BVec<VEC> h[ITEMS];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = row_col<VEC>(it);
    if (col < D) {
      const BVec<VEC> a = *reinterpret_cast<const BVec<VEC>*>(x + base + col);
      const BVec<VEC> b = *reinterpret_cast<const BVec<VEC>*>(residual + base + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        h[it].v[k] = __float2bfloat16_rn(__bfloat162float(a.v[k]) + __bfloat162float(b.v[k]));
      }
      *reinterpret_cast<BVec<VEC>*>(h_out + base + col) = h[it];
    }
  }
  rms_normalize_row<VEC, ITEMS>(h, weight, D, eps, scratch);  // h becomes y, in registers
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = row_col<VEC>(it);
    if (col < D) *reinterpret_cast<BVec<VEC>*>(y_out + base + col) = h[it];
  }
}

template <int VEC, int ITEMS>
cudaError_t launch(const RowShape& s, int64_t rows, const void* x, const void* r, const void* w, void* y, void* h,
                   int64_t D, float eps, cudaStream_t stream) {
  add_rmsnorm_kernel<VEC, ITEMS><<<static_cast<unsigned>(rows), s.threads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(r),
      static_cast<const __nv_bfloat16*>(w), static_cast<__nv_bfloat16*>(y), static_cast<__nv_bfloat16*>(h), static_cast<int>(D), eps);
  return cudaGetLastError();
}

template <int VEC>
cudaError_t dispatch_items(const RowShape& s, int64_t rows, const void* x, const void* r, const void* w, void* y,
                           void* h, int64_t D, float eps, cudaStream_t stream) {
  switch (s.items) {
    case 1: return launch<VEC, 1>(s, rows, x, r, w, y, h, D, eps, stream);
    case 2: return launch<VEC, 2>(s, rows, x, r, w, y, h, D, eps, stream);
    case 4: return launch<VEC, 4>(s, rows, x, r, w, y, h, D, eps, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace themis

extern "C" cudaError_t themis_add_rmsnorm_bf16(const void* x, const void* residual, const void* weight, void* y_out,
                                               void* h_out, int64_t rows, int64_t D, float eps,
                                               cudaStream_t stream) {
  using namespace themis;
  if (rows < 0 || D < 1 || D > 32768 || rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (!x || !residual || !weight || !y_out || !h_out) return cudaErrorInvalidValue;
  const bool vector_ok = D % 8 == 0 && aligned16(x) && aligned16(residual) && aligned16(weight) &&
                         aligned16(y_out) && aligned16(h_out);
  RowShape s;
  if (!row_shape(D, vector_ok, &s)) return cudaErrorInvalidValue;
  return s.vec == 8 ? dispatch_items<8>(s, rows, x, residual, weight, y_out, h_out, D, eps, stream)
                    : dispatch_items<1>(s, rows, x, residual, weight, y_out, h_out, D, eps, stream);
}
