// Philox4x32-10 normals with the convention of fastdiff/noise.py: key = (seed lo, seed hi),
// counter = (group, offset lo, stream, offset hi), Box-Muller on (o0, o1) and (o2, o3) with
// u1 = ((o >> 8) + 1) * 2^-24, u2 = (o >> 8) * 2^-24, theta = 2 pi u2 - pi.
#pragma once
#include <cstdint>

namespace fastdiff {

__device__ __forceinline__ void philox_normal4(int64_t seed, int64_t offset, uint32_t group, uint32_t stream,
                                               float out[4]) {
  uint32_t k0 = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  uint32_t k1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  uint32_t c0 = group;
  uint32_t c1 = static_cast<uint32_t>(static_cast<uint64_t>(offset));
  uint32_t c2 = stream;
  uint32_t c3 = static_cast<uint32_t>(static_cast<uint64_t>(offset) >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(c0, 0xD2511F53u), lo0 = c0 * 0xD2511F53u;
    const uint32_t hi1 = __umulhi(c2, 0xCD9E8D57u), lo1 = c2 * 0xCD9E8D57u;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const uint32_t o[4] = {c0, c1, c2, c3};
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const float u1 = static_cast<float>((o[2 * p] >> 8) + 1u) * 5.9604644775390625e-08f;
    const float u2 = static_cast<float>(o[2 * p + 1] >> 8) * 5.9604644775390625e-08f;
    const float r = sqrtf(-2.0f * logf(u1));
    // separate roundings (no fma contraction), as torch computes it on the CPU
    const float theta = __fsub_rn(__fmul_rn(u2, 6.283185307179586f), 3.141592653589793f);
    float s, c;
    sincosf(theta, &s, &c);
    out[2 * p] = r * c;
    out[2 * p + 1] = r * s;
  }
}

}  // namespace fastdiff
