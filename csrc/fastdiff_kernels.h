// Plain-C++ interface between the torch binding (binding.cpp) and the CUDA kernels (*.cu).
// Only CUDA's own headers on this side: the kernels compile with nvcc alone (no torch, no cuRAND),
// so CI machines without a CUDA-enabled torch can still compile them.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fastdiff {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Coefficient-row indices: must match fastdiff/coefs.py (a unit test parses this header to check).
enum Coef : int {
  A_X = 0, A_M = 1, E_X = 2, E_M = 3, E_0 = 4, C_0 = 5, C_E = 6, C_X = 7, SIGMA = 8, K_PRE = 9,
  H_1 = 10, H_2 = 11, LV_A = 12, LV_B = 13, X_S = 14, E_S = 15, H_3 = 16, L_L = 17, L_0 = 18, L_1 = 19,
  L_2 = 20, L_3 = 21, NCOEF = 24
};
enum VarMode : int { VAR_FIXED = 0, VAR_LEARNED = 1, VAR_LEARNED_RANGE = 2 };
enum NoiseMode : int { NOISE_NONE = 0, NOISE_TENSOR = 1, NOISE_PHILOX = 2 };

// Order of the fused step's input list (Python: fastdiff.ops.StepParams.INPUTS; a unit test checks it).
enum StepInput : int {
  IN_SAMPLE = 0, IN_MODEL_OUTPUT = 1, IN_COEF = 2, IN_NOISE = 3, IN_SEED = 4, IN_OFFSET = 5, IN_GUIDANCE = 6,
  IN_THRESH = 7, IN_MSCALE = 8, IN_VAR = 9, IN_HIST1 = 10, IN_HIST2 = 11, IN_HIST3 = 12, IN_LAST = 13,
  N_STEP_INPUTS = 14
};

struct StepParams {
  // inputs: x, m, z, v, h1, h2, h3, last share `in_dtype`; prev, x0 and corr share `out_dtype`
  const void* x;
  const void* m;         // B samples, or 2B (unconditional first) when cfg
  const float* coef;     // one row of NCOEF floats
  void* prev;            // may be null (write_prev false)
  void* x0;              // may be null
  const void* z;         // NOISE_TENSOR
  const int64_t* seed;   // NOISE_PHILOX: (B,)
  const int64_t* offset; // NOISE_PHILOX: (1,)
  const float* guidance; // cfg: (1,)
  const float* thresh;   // dynamic thresholding: (B,)
  const float* mscale;   // per-sample model-output scale: (B,)
  const void* v;         // learned variance
  const void* h1;
  const void* h2;
  const void* h3;
  const void* last;      // the previous step's starting sample: turns on the corrector row (L_*)
  void* corr;            // may be null: the corrected sample (or xh without a corrector)
  int64_t batch, numel, half_batch;
  int64_t x_sb, m_sb, z_sb, v_sb, h1_sb, h2_sb, h3_sb, last_sb, prev_sb, x0_sb, corr_sb;  // batch strides
  float clip_range;      // > 0: clamp x0 to [-clip_range, clip_range]
  int var_mode, noise_mode, nhist;
  int in_dtype, out_dtype;
};

struct AddNoiseParams {
  const void* x;
  const void* z;          // null: Philox
  void* out;
  const float* table;     // (n_index, 2)
  const int64_t* index;   // 1 or B entries
  const int64_t* seed;    // (B,)
  const int64_t* offset;  // (1,)
  int64_t batch, numel, n_index, x_sb, z_sb, out_sb, idx_sb;
  int stream_id, dtype;
};

// Both return cudaSuccess or the launch error.
cudaError_t launch_fused_step(const StepParams& p, cudaStream_t stream);
cudaError_t launch_add_noise(const AddNoiseParams& p, cudaStream_t stream);

}  // namespace fastdiff
