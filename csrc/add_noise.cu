// Fused forward noising: out[b] = table[i_b, 0] * x[b] + table[i_b, 1] * z[b], z read or drawn with
// Philox. Same semantics as fastdiff/kernels/add_noise.py, including NaN for an index out of range.
#include <cstdint>

#include "dtype.cuh"
#include "fastdiff_kernels.h"
#include "philox.cuh"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) add_noise_kernel(const AddNoiseParams p, const bool vec) {
  const int64_t b = blockIdx.y;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t j0 = 4 * g;
  if (j0 >= p.numel) return;
  const int valid = static_cast<int>(p.numel - j0 < 4 ? p.numel - j0 : 4);
  const bool v4 = vec && valid == 4;
  const int64_t i = __ldg(p.index + b * p.idx_sb);
  const bool ok = i >= 0 && i < p.n_index;
  const float a = ok ? __ldg(p.table + 2 * i) : __int_as_float(0x7fc00000);  // NaN
  const float s = ok ? __ldg(p.table + 2 * i + 1) : 0.0f;
  float x[4], z[4], out[4];
  load4(static_cast<const T*>(p.x) + b * p.x_sb + j0, v4, valid, x);
  if (p.z != nullptr) {
    load4(static_cast<const T*>(p.z) + b * p.z_sb + j0, v4, valid, z);
  } else {
    philox_normal4(__ldg(p.seed + b), __ldg(p.offset), static_cast<uint32_t>(g), static_cast<uint32_t>(p.stream_id), z);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k] = a * x[k] + s * z[k];
  store4(static_cast<T*>(p.out) + b * p.out_sb + j0, v4, valid, out);
}

template <typename T>
cudaError_t launch_typed(const AddNoiseParams& p, cudaStream_t stream) {
  const int64_t groups = (p.numel + 3) / 4;
  const int64_t v = 4 * sizeof(T);
  auto ok = [&](const void* ptr, int64_t sb) {
    return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % v == 0 && (sb * static_cast<int64_t>(sizeof(T))) % v == 0);
  };
  const bool vec = ok(p.x, p.x_sb) && ok(p.z, p.z_sb) && ok(p.out, p.out_sb);
  const dim3 grid(static_cast<unsigned>((groups + kThreads - 1) / kThreads), static_cast<unsigned>(p.batch));
  add_noise_kernel<T><<<grid, kThreads, 0, stream>>>(p, vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_add_noise(const AddNoiseParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.numel == 0) return cudaSuccess;
  if (p.batch > 65535) return cudaErrorInvalidConfiguration;
  switch (p.dtype) {
    case kFloat32: return launch_typed<float>(p, stream);
    case kFloat16: return launch_typed<__half>(p, stream);
    case kBFloat16: return launch_typed<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastdiff
