// themis_engine CUDA scoring kernels: the C API of the launchers.
//
// Raw device pointers and a cudaStream_t only (no torch / ATen headers), so the .cu files compile
// with plain `nvcc -c` and the torch binding (binding.cpp) stays in C++. Every launcher checks its
// arguments, enqueues on `stream` and returns cudaSuccess or the first error (launch errors from
// cudaGetLastError); nothing synchronizes. bf16 tensors are passed as `const void*` so this header
// needs only the CUDA runtime API.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Fused final RMSNorm + gather at the score positions + reward head (inference).
//
//   hidden:       bf16 [T, D], row r at hidden + r * hidden_stride (elements; unit column stride)
//   score_index:  int64 [N], rows of hidden to score (a row outside [0, T) gives NaN scores)
//   norm_weight:  bf16 [D]; head: bf16 [H, D] row-major (the reward head `score.weight`)
//   out:          float32 [N, H], row-major
//
// Numerics (Hugging Face order, as the engine's reference): x = hidden[score_index[n]];
// rstd = 1 / sqrt(mean(float(x)^2) + eps); y = bf16(float(x) * rstd); z = bf16(float(norm_weight) * float(y));
// out[n, h] = sum_d float(z[d]) * float(head[h, d]), accumulated in float32 (not rounded to bf16).
// Limits: 1 <= D <= 32768 on the 8-element vector path (D % 8 == 0, hidden_stride % 8 == 0, 16-byte
// aligned pointers), D <= 4096 otherwise (cudaErrorInvalidValue beyond); H >= 0; N >= 0.
cudaError_t themis_score_head_bf16(const void* hidden, int64_t hidden_stride, int64_t T, int64_t D,
                                   const int64_t* score_index, int64_t N, const void* norm_weight,
                                   const void* head, int64_t H, float eps, float* out, cudaStream_t stream);

// Fused residual add + RMSNorm (inference): the pre-norm decoder's "add the block output to the
// residual stream, then normalise".
//
//   x, residual: bf16 [rows, D] contiguous; weight: bf16 [D]
//   h_out:       bf16 [rows, D], h = bf16(float(x) + float(residual)) (the new residual stream)
//   y_out:       bf16 [rows, D], y = bf16(float(weight) * float(bf16(float(h) * rstd))),
//                rstd = 1 / sqrt(mean(float(h)^2) + eps) over the rounded h, in float32
// h_out may alias x or residual (each element is read before it is written, by the same thread);
// y_out must not alias h_out. Limits: 1 <= D <= 32768 on the vector path (D % 8 == 0, 16-byte aligned
// pointers), D <= 4096 otherwise; rows >= 0.
cudaError_t themis_add_rmsnorm_bf16(const void* x, const void* residual, const void* weight, void* y_out,
                                    void* h_out, int64_t rows, int64_t D, float eps, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
