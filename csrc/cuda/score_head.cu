// Fused final RMSNorm + gather at the score positions + reward head, for scoring:
//   out[n, :] = head @ bf16(norm_weight * bf16(x * rstd)),  x = hidden[score_index[n]] (bf16),
//   rstd = rsqrt(mean(x^2) + eps) in float32, the dot products accumulated in float32.
// One block per score row: the row is read once into registers (ITEMS vectors per thread), its sum
// of squares reduced over the block, the normalised row z (bf16, exact as the reference rounds it)
// kept in the same registers, then each group of up to kHeadsPerPass heads is one pass over the
// head rows and one block reduction. N is small (the sequences of a micro-batch), the work is tiny:
// the gain is three launches (gather, norm, GEMM) and two round trips through memory made one.
#include "common.cuh"
#include "themis_cuda.h"

#include <math.h>

namespace themis {
namespace {

constexpr int kHeadsPerPass = 4;  // accumulators per thread (8 spills at 1024 threads)

template <int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads, 1) score_head_kernel(
    const __nv_bfloat16* __restrict__ hidden, int64_t hidden_stride, int64_t T, int D,
    const int64_t* __restrict__ score_index, const __nv_bfloat16* __restrict__ norm_weight,
    const __nv_bfloat16* __restrict__ head, int H, float eps, float* __restrict__ out) {
  __shared__ float scratch[kHeadsPerPass * kWarp];
  const int64_t n = blockIdx.x;
  const int64_t row = score_index[n];
  if (row < 0 || row >= T) {  // block-uniform: no thread reaches a barrier
    for (int h = threadIdx.x; h < H; h += blockDim.x) out[n * H + h] = NAN;
    return;
  }
  const __nv_bfloat16* x = hidden + row * hidden_stride;

  BVec<VEC> z[ITEMS];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = row_col<VEC>(it);
    if (col < D) z[it] = *reinterpret_cast<const BVec<VEC>*>(x + col);
  }
  rms_normalize_row<VEC, ITEMS>(z, norm_weight, D, eps, scratch);

  for (int h0 = 0; h0 < H; h0 += kHeadsPerPass) {
    float acc[kHeadsPerPass];
#pragma unroll
    for (int j = 0; j < kHeadsPerPass; ++j) acc[j] = 0.0f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = row_col<VEC>(it);
      if (col < D) {
#pragma unroll
        for (int j = 0; j < kHeadsPerPass; ++j) {
          if (h0 + j < H) {
            const BVec<VEC> hw = *reinterpret_cast<const BVec<VEC>*>(head + static_cast<int64_t>(h0 + j) * D + col);
#pragma unroll
            for (int k = 0; k < VEC; ++k) acc[j] += __bfloat162float(z[it].v[k]) * __bfloat162float(hw.v[k]);
          }
        }
      }
    }
    block_sum<kHeadsPerPass>(acc, scratch);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int j = 0; j < kHeadsPerPass; ++j)
        if (h0 + j < H) out[n * H + h0 + j] = acc[j];
    }
  }
}

struct Args {
  const void* hidden;
  int64_t stride, T, D;
  const int64_t* index;
  int64_t N;
  const void* norm_weight;
  const void* head;
  int64_t H;
  float eps;
  float* out;
};

template <int VEC, int ITEMS>
cudaError_t launch(const RowShape& s, const Args& a, cudaStream_t stream) {
  score_head_kernel<VEC, ITEMS><<<static_cast<unsigned>(a.N), s.threads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(a.hidden), a.stride, a.T, static_cast<int>(a.D), a.index,
      static_cast<const __nv_bfloat16*>(a.norm_weight), static_cast<const __nv_bfloat16*>(a.head),
      static_cast<int>(a.H), a.eps, a.out);
  return cudaGetLastError();
}

template <int VEC>
cudaError_t dispatch_items(const RowShape& s, const Args& a, cudaStream_t stream) {
  switch (s.items) {
    case 1: return launch<VEC, 1>(s, a, stream);
    case 2: return launch<VEC, 2>(s, a, stream);
    case 4: return launch<VEC, 4>(s, a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace themis

extern "C" cudaError_t themis_score_head_bf16(const void* hidden, int64_t hidden_stride, int64_t T, int64_t D,
                                              const int64_t* score_index, int64_t N, const void* norm_weight,
                                              const void* head, int64_t H, float eps, float* out,
                                              cudaStream_t stream) {
  using namespace themis;
  if (N < 0 || H < 0 || T < 0 || D < 1 || D > 32768 || N > 0x7fffffffLL || H > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (N == 0 || H == 0) return cudaSuccess;
  if (!hidden || !score_index || !norm_weight || !head || !out || hidden_stride < D) return cudaErrorInvalidValue;
  const bool vector_ok = D % 8 == 0 && hidden_stride % 8 == 0 && aligned16(hidden) && aligned16(norm_weight) &&
                         aligned16(head);
  RowShape s;
  if (!row_shape(D, vector_ok, &s)) return cudaErrorInvalidValue;
  const Args a{hidden, hidden_stride, T, D, score_index, N, norm_weight, head, H, eps, out};
  return s.vec == 8 ? dispatch_items<8>(s, a, stream) : dispatch_items<1>(s, a, stream);
}
