// Device helpers shared by the scoring kernels: bf16 vectors, warp / block sums, launch shapes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace themis {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxItems = 4;  // vectors per thread kept in registers (8 spills at 1024 threads)

// VEC consecutive bf16 values, aligned so that one load / store moves them all (16 bytes for 8).
template <int VEC>
struct alignas(sizeof(__nv_bfloat16) * VEC) BVec {
  __nv_bfloat16 v[VEC];
};

__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum K values over the block; every thread gets the K totals. `scratch`: K * 32 floats of shared
// memory. Ends with a barrier, so scratch can be reused right after.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = warp_sum(v[k]);
    if (lane == 0) scratch[k * kWarp + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = lane < warps ? scratch[k * kWarp + lane] : 0.0f;
    v[k] = warp_sum(s);
  }
  __syncthreads();
}

// The column of vector `it` of this thread in a row held in registers (ITEMS vectors of VEC per thread).
template <int VEC>
__device__ __forceinline__ int row_col(int it) {
  return (it * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * VEC;
}

// RMSNorm of a row of D elements held in registers, in place, Hugging Face rounding order:
//   row = bf16(weight * bf16(row * rstd)),  rstd = rsqrt(mean(row^2) + eps)  (float32 math).
// The sum of squares is reduced over the block; `scratch`: 32 floats of shared memory.
template <int VEC, int ITEMS>
__device__ __forceinline__ void rms_normalize_row(BVec<VEC> (&row)[ITEMS], const __nv_bfloat16* weight, int D,
                                                  float eps, float* scratch) {
  float sq[1] = {0.0f};
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    if (row_col<VEC>(it) < D) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float v = __bfloat162float(row[it].v[k]);
        sq[0] += v * v;
      }
    }
  }
  block_sum<1>(sq, scratch);
  const float rstd = rsqrtf(sq[0] / static_cast<float>(D) + eps);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = row_col<VEC>(it);
    if (col < D) {
      const BVec<VEC> w = *reinterpret_cast<const BVec<VEC>*>(weight + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float normed = round_bf16(__bfloat162float(row[it].v[k]) * rstd);  // cast before the weight
        row[it].v[k] = __float2bfloat16_rn(__bfloat162float(w.v[k]) * normed);
      }
    }
  }
}

// Launch shape for rows of D elements held in registers: VEC elements per vector, ITEMS vectors per
// thread, `threads` per block (a multiple of 32). Returns false when D does not fit in one block.
struct RowShape {
  int vec, items, threads;
};

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline bool row_shape(int64_t D, bool vector_ok, RowShape* shape) {
  if (D < 1) return false;
  const int vec = vector_ok ? 8 : 1;
  const int64_t chunks = (D + vec - 1) / vec;
  for (int limit : {512, kMaxThreads}) {
    for (int items = 1; items <= kMaxItems; items *= 2) {
      const int64_t threads = (chunks + items - 1) / items;
      if (threads <= limit) {
        shape->vec = vec;
        shape->items = items;
        shape->threads = static_cast<int>((threads + kWarp - 1) / kWarp * kWarp);
        return true;
      }
    }
  }
  return false;
}

}  // namespace themis
