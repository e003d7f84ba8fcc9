// The generic fused scheduler step in CUDA C++: same semantics as fastdiff/kernels/step.py (see
// fastdiff/coefs.py for the formula). One thread owns one Philox group of four consecutive elements
// of one sample; the grid is (groups of a sample / 256, batch).
#include <cstdint>

#include "dtype.cuh"
#include "fastdiff_kernels.h"
#include "philox.cuh"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float clamp_nan(float x, float lo, float hi) {
  // comparisons with NaN are false, so NaN passes through as torch.clamp lets it
  return x < lo ? lo : (x > hi ? hi : x);
}

template <typename TI, typename TO>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(const StepParams p, const bool vec) {
  const int64_t b = blockIdx.y;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t j0 = 4 * g;
  if (j0 >= p.numel) return;
  const int valid = static_cast<int>(p.numel - j0 < 4 ? p.numel - j0 : 4);
  const bool v4 = vec && valid == 4;
  const float* cf = p.coef;

  float x[4], m[4], z[4] = {0.f, 0.f, 0.f, 0.f};
  load4(static_cast<const TI*>(p.x) + b * p.x_sb + j0, v4, valid, x);
  load4(static_cast<const TI*>(p.m) + b * p.m_sb + j0, v4, valid, m);
  if (p.guidance != nullptr) {
    float mc[4];
    load4(static_cast<const TI*>(p.m) + (b + p.half_batch) * p.m_sb + j0, v4, valid, mc);
    const float gs = __ldg(p.guidance);
#pragma unroll
    for (int k = 0; k < 4; ++k) m[k] = m[k] + gs * (mc[k] - m[k]);
  }
  if (p.mscale != nullptr) {
    const float s = __ldg(p.mscale + b);
#pragma unroll
    for (int k = 0; k < 4; ++k) m[k] *= s;
  }
  if (p.noise_mode == NOISE_TENSOR) {
    load4(static_cast<const TI*>(p.z) + b * p.z_sb + j0, v4, valid, z);
  } else if (p.noise_mode == NOISE_PHILOX) {
    philox_normal4(__ldg(p.seed + b), __ldg(p.offset), static_cast<uint32_t>(g), 0u, z);
  }

  const float k_pre = __ldg(cf + K_PRE), x_s = __ldg(cf + X_S), a_x = __ldg(cf + A_X), a_m = __ldg(cf + A_M);
  const float thr = p.thresh != nullptr ? __ldg(p.thresh + b) : 1.0f;
  float xh[4], x0[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    xh[k] = p.noise_mode != NOISE_NONE ? x[k] + k_pre * z[k] : x[k];
    float v = x_s * (a_x * xh[k] + a_m * m[k]);
    if (p.thresh != nullptr) {
      v = clamp_nan(v, -thr, thr) / thr;
    } else if (p.clip_range > 0.f) {
      v = clamp_nan(v, -p.clip_range, p.clip_range);
    }
    x0[k] = v;
  }

  float h1[4] = {0.f, 0.f, 0.f, 0.f}, h2[4] = {0.f, 0.f, 0.f, 0.f}, h3[4] = {0.f, 0.f, 0.f, 0.f};
  const bool need_hist = p.prev != nullptr || p.last != nullptr;
  if (need_hist && p.nhist >= 1) load4(static_cast<const TI*>(p.h1) + b * p.h1_sb + j0, v4, valid, h1);
  if (need_hist && p.nhist >= 2) load4(static_cast<const TI*>(p.h2) + b * p.h2_sb + j0, v4, valid, h2);
  if (need_hist && p.nhist >= 3) load4(static_cast<const TI*>(p.h3) + b * p.h3_sb + j0, v4, valid, h3);
  float xc[4];
  if (p.last != nullptr) {  // the corrected sample, from the previous step's starting sample and the history
    float l[4];
    load4(static_cast<const TI*>(p.last) + b * p.last_sb + j0, v4, valid, l);
    const float l_l = __ldg(cf + L_L), l_0 = __ldg(cf + L_0), l_1 = __ldg(cf + L_1), l_2 = __ldg(cf + L_2),
                l_3 = __ldg(cf + L_3);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float v = l_l * l[k] + l_0 * x0[k];
      if (p.nhist >= 1) v += l_1 * h1[k];
      if (p.nhist >= 2) v += l_2 * h2[k];
      if (p.nhist >= 3) v += l_3 * h3[k];
      xc[k] = v;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) xc[k] = xh[k];
  }
  if (p.corr != nullptr) store4(static_cast<TO*>(p.corr) + b * p.corr_sb + j0, v4, valid, xc);

  if (p.prev != nullptr) {
    const float e_s = __ldg(cf + E_S), e_x = __ldg(cf + E_X), e_m = __ldg(cf + E_M), e_0 = __ldg(cf + E_0);
    const float c_0 = __ldg(cf + C_0), c_e = __ldg(cf + C_E), c_x = __ldg(cf + C_X);
    const float sigma = __ldg(cf + SIGMA);
    float var[4] = {0.f, 0.f, 0.f, 0.f};
    if (p.var_mode != VAR_FIXED && p.noise_mode != NOISE_NONE)
      load4(static_cast<const TI*>(p.v) + b * p.v_sb + j0, v4, valid, var);
    const float w1 = __ldg(cf + H_1), w2 = __ldg(cf + H_2), w3 = __ldg(cf + H_3);
    const float lv_a = __ldg(cf + LV_A), lv_b = __ldg(cf + LV_B);
    float out[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float eps = e_s * (e_x * xh[k] + e_m * m[k] + e_0 * x0[k]);
      float prev = c_0 * x0[k] + c_e * eps + c_x * xc[k];
      if (p.nhist >= 1) prev += w1 * h1[k];
      if (p.nhist >= 2) prev += w2 * h2[k];
      if (p.nhist >= 3) prev += w3 * h3[k];
      if (p.noise_mode != NOISE_NONE) {
        float std = sigma;
        if (p.var_mode == VAR_LEARNED) std = sigma * sqrtf(var[k]);
        else if (p.var_mode == VAR_LEARNED_RANGE) std = sigma * expf(0.5f * (lv_a * var[k] + lv_b));
        prev += std * z[k];
      }
      out[k] = prev;
    }
    store4(static_cast<TO*>(p.prev) + b * p.prev_sb + j0, v4, valid, out);
  }
  if (p.x0 != nullptr) store4(static_cast<TO*>(p.x0) + b * p.x0_sb + j0, v4, valid, x0);
}

bool aligned(const void* ptr, int64_t stride, int64_t bytes_per_vec, int64_t elem) {
  if (ptr == nullptr) return true;
  return reinterpret_cast<uintptr_t>(ptr) % bytes_per_vec == 0 && (stride * elem) % bytes_per_vec == 0;
}

template <typename TI, typename TO>
cudaError_t launch_typed(const StepParams& p, cudaStream_t stream) {
  const int64_t groups = (p.numel + 3) / 4;
  const int64_t vi = 4 * sizeof(TI), vo = 4 * sizeof(TO);
  const bool vec = aligned(p.x, p.x_sb, vi, sizeof(TI)) && aligned(p.m, p.m_sb, vi, sizeof(TI)) &&
                   aligned(p.z, p.z_sb, vi, sizeof(TI)) && aligned(p.v, p.v_sb, vi, sizeof(TI)) &&
                   aligned(p.h1, p.h1_sb, vi, sizeof(TI)) && aligned(p.h2, p.h2_sb, vi, sizeof(TI)) &&
                   aligned(p.h3, p.h3_sb, vi, sizeof(TI)) && aligned(p.last, p.last_sb, vi, sizeof(TI)) &&
                   aligned(p.prev, p.prev_sb, vo, sizeof(TO)) && aligned(p.x0, p.x0_sb, vo, sizeof(TO)) &&
                   aligned(p.corr, p.corr_sb, vo, sizeof(TO)) &&
                   (p.guidance == nullptr || (p.half_batch * p.m_sb * static_cast<int64_t>(sizeof(TI))) % vi == 0);
  const dim3 grid(static_cast<unsigned>((groups + kThreads - 1) / kThreads), static_cast<unsigned>(p.batch));
  fused_step_kernel<TI, TO><<<grid, kThreads, 0, stream>>>(p, vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fused_step(const StepParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.numel == 0) return cudaSuccess;
  if (p.batch > 65535) return cudaErrorInvalidConfiguration;
  switch (p.in_dtype * 3 + p.out_dtype) {
    case kFloat32 * 3 + kFloat32: return launch_typed<float, float>(p, stream);
    case kFloat16 * 3 + kFloat16: return launch_typed<__half, __half>(p, stream);
    case kBFloat16 * 3 + kBFloat16: return launch_typed<__nv_bfloat16, __nv_bfloat16>(p, stream);
    case kFloat16 * 3 + kFloat32: return launch_typed<__half, float>(p, stream);
    case kBFloat16 * 3 + kFloat32: return launch_typed<__nv_bfloat16, float>(p, stream);
    case kFloat32 * 3 + kFloat16: return launch_typed<float, __half>(p, stream);
    case kFloat32 * 3 + kBFloat16: return launch_typed<float, __nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastdiff
