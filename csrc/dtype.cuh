#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastdiff {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Four consecutive elements as one aligned access (16 bytes for fp32, 8 for fp16/bf16).
template <typename T> struct alignas(4 * sizeof(T)) Vec4 { T v[4]; };

// Load 4 elements starting at p (vector load when `vec`, else element by element with a bound).
template <typename T>
__device__ __forceinline__ void load4(const T* p, bool vec, int valid, float out[4]) {
  if (vec) {
    const Vec4<T> q = *reinterpret_cast<const Vec4<T>*>(p);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = to_float(q.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = k < valid ? to_float(p[k]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, bool vec, int valid, const float in[4]) {
  if (vec) {
    Vec4<T> q;
#pragma unroll
    for (int k = 0; k < 4; ++k) q.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Vec4<T>*>(p) = q;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (k < valid) p[k] = from_float<T>(in[k]);
  }
}

}  // namespace fastdiff
