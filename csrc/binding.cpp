// Torch binding for the CUDA kernels: registers fastdiff::fused_step_cuda and fastdiff::add_noise_cuda
// (CUDA dispatch key) with the signatures of the Python ops in fastdiff/ops.py. The Python layer
// has already made each sample's elements contiguous; here we read pointers, batch strides and dtypes.
#include <initializer_list>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "fastdiff_kernels.h"

namespace {

using at::Tensor;
using c10::optional;

int dtype_code(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return fastdiff::kFloat32;
    case at::kHalf: return fastdiff::kFloat16;
    case at::kBFloat16: return fastdiff::kBFloat16;
    default: TORCH_CHECK(false, "fastdiff CUDA ops: `", name, "` must be float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return -1;
}

// Inputs that share the sample's dtype; a different dtype is converted once here.
Tensor like_input(const Tensor& t, const Tensor& x) {
  return t.scalar_type() == x.scalar_type() ? t : t.to(x.scalar_type());
}

const void* ptr_or_null(const optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

int64_t stride0(const optional<Tensor>& t) { return t.has_value() && t->dim() > 0 ? t->stride(0) : 0; }

void check_cuda(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.is_cuda(), "fastdiff CUDA ops: `", name, "` must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), "fastdiff CUDA ops: `", name, "` is on ", t.device(), ", `sample` on ",
              x.device());
}

// `inputs` in StepInput order (fastdiff_kernels.h), the first three required.
void fused_step_cuda(const c10::List<optional<Tensor>>& inputs, const optional<Tensor>& prev,
                     const optional<Tensor>& x0, const optional<Tensor>& corr, double clip_range,
                     int64_t var_mode) {
  TORCH_CHECK(inputs.size() == fastdiff::N_STEP_INPUTS, "fastdiff::fused_step_cuda: expected ",
              static_cast<int>(fastdiff::N_STEP_INPUTS), " inputs, got ", inputs.size());
  auto in = [&](fastdiff::StepInput k) -> optional<Tensor> { return inputs.get(k); };
  for (auto k : {fastdiff::IN_SAMPLE, fastdiff::IN_MODEL_OUTPUT, fastdiff::IN_COEF}) {
    TORCH_CHECK(in(k).has_value(), "fastdiff::fused_step_cuda: input ", static_cast<int>(k), " is required");
  }
  const Tensor x = *in(fastdiff::IN_SAMPLE);
  const Tensor m_in = *in(fastdiff::IN_MODEL_OUTPUT);
  const Tensor coef = *in(fastdiff::IN_COEF);
  const optional<Tensor> z_in = in(fastdiff::IN_NOISE), seed = in(fastdiff::IN_SEED), offset = in(fastdiff::IN_OFFSET);
  const optional<Tensor> guidance = in(fastdiff::IN_GUIDANCE), thresh = in(fastdiff::IN_THRESH);
  const optional<Tensor> mscale = in(fastdiff::IN_MSCALE), v_in = in(fastdiff::IN_VAR);
  const optional<Tensor> h1_in = in(fastdiff::IN_HIST1), h2_in = in(fastdiff::IN_HIST2);
  const optional<Tensor> h3_in = in(fastdiff::IN_HIST3), last_in = in(fastdiff::IN_LAST);
  check_cuda(x, "sample", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor m = like_input(m_in, x);
  optional<Tensor> z, v, h1, h2, h3, last;
  if (z_in) z = like_input(*z_in, x);
  if (v_in) v = like_input(*v_in, x);
  if (h1_in) h1 = like_input(*h1_in, x);
  if (h2_in) h2 = like_input(*h2_in, x);
  if (h3_in) h3 = like_input(*h3_in, x);
  if (last_in) last = like_input(*last_in, x);
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.numel() >= fastdiff::NCOEF && coef.is_contiguous(),
              "fastdiff CUDA ops: `coef` must be a contiguous float32 row of ", fastdiff::NCOEF, " coefficients");
  TORCH_CHECK(prev.has_value() || x0.has_value() || corr.has_value(), "fastdiff CUDA ops: nothing to write");
  const Tensor& out = prev.has_value() ? *prev : (x0.has_value() ? *x0 : *corr);
  for (const auto* t : {&coef, &m}) check_cuda(*t, "input", x);
  // a CPU tensor here would be read as a device pointer
  for (const optional<Tensor>* t : std::initializer_list<const optional<Tensor>*>{
           &z, &seed, &offset, &guidance, &thresh, &mscale, &v, &h1, &h2, &h3, &last, &prev, &x0, &corr}) {
    if (t->has_value()) check_cuda(**t, "input", x);
  }
  for (const optional<Tensor>* t : std::initializer_list<const optional<Tensor>*>{&prev, &x0, &corr}) {
    if (t->has_value()) TORCH_CHECK((*t)->scalar_type() == out.scalar_type(), "fastdiff CUDA ops: outputs differ in dtype");
  }
  if (seed) TORCH_CHECK(seed->scalar_type() == at::kLong && offset.has_value(), "`seed` must be int64 with `offset`");
  fastdiff::StepParams p{};
  p.x = x.data_ptr();
  p.m = m.data_ptr();
  p.coef = coef.data_ptr<float>();
  p.prev = prev ? prev->data_ptr() : nullptr;
  p.x0 = x0 ? x0->data_ptr() : nullptr;
  p.z = ptr_or_null(z);
  p.seed = seed ? seed->data_ptr<int64_t>() : nullptr;
  p.offset = offset ? offset->data_ptr<int64_t>() : nullptr;
  p.guidance = guidance ? guidance->data_ptr<float>() : nullptr;
  p.thresh = thresh ? thresh->data_ptr<float>() : nullptr;
  p.mscale = mscale ? mscale->data_ptr<float>() : nullptr;
  p.v = ptr_or_null(v);
  p.h1 = ptr_or_null(h1);
  p.h2 = ptr_or_null(h2);
  p.h3 = ptr_or_null(h3);
  p.last = ptr_or_null(last);
  p.corr = corr ? corr->data_ptr() : nullptr;
  p.batch = x.size(0);
  p.numel = p.batch ? x.numel() / p.batch : 0;
  p.half_batch = p.batch;
  p.x_sb = x.stride(0);
  p.m_sb = m.stride(0);
  p.z_sb = stride0(z);
  p.v_sb = stride0(v);
  p.h1_sb = stride0(h1);
  p.h2_sb = stride0(h2);
  p.h3_sb = stride0(h3);
  p.last_sb = stride0(last);
  p.corr_sb = stride0(corr);
  p.prev_sb = stride0(prev);
  p.x0_sb = stride0(x0);
  p.clip_range = static_cast<float>(clip_range);
  p.var_mode = static_cast<int>(var_mode);
  p.noise_mode = z ? fastdiff::NOISE_TENSOR : (seed ? fastdiff::NOISE_PHILOX : fastdiff::NOISE_NONE);
  p.nhist = h1 ? (h2 ? (h3 ? 3 : 2) : 1) : 0;
  p.in_dtype = dtype_code(x, "sample");
  p.out_dtype = dtype_code(out, "prev_out");
  const cudaError_t err = fastdiff::launch_fused_step(p, c10::cuda::getCurrentCUDAStream(x.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fastdiff::fused_step_cuda launch failed: ", cudaGetErrorString(err));
}

void add_noise_cuda(const Tensor& x, const optional<Tensor>& z_in, const Tensor& table, const Tensor& index,
                    const optional<Tensor>& seed, const optional<Tensor>& offset, const Tensor& out,
                    int64_t stream_id) {
  check_cuda(x, "sample", x);
  const c10::cuda::CUDAGuard guard(x.device());
  optional<Tensor> z;
  if (z_in) z = like_input(*z_in, x);
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous(), "`table` must be contiguous float32");
  TORCH_CHECK(index.scalar_type() == at::kLong, "`index` must be int64");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "`out` must have the dtype of `sample`");
  TORCH_CHECK(z.has_value() || (seed.has_value() && offset.has_value()), "`noise` or `seed` and `offset` needed");
  fastdiff::AddNoiseParams p{};
  p.x = x.data_ptr();
  p.z = ptr_or_null(z);
  p.out = out.data_ptr();
  p.table = table.data_ptr<float>();
  p.index = index.data_ptr<int64_t>();
  p.seed = seed ? seed->data_ptr<int64_t>() : nullptr;
  p.offset = offset ? offset->data_ptr<int64_t>() : nullptr;
  p.batch = x.size(0);
  p.numel = p.batch ? x.numel() / p.batch : 0;
  p.n_index = table.size(0);
  p.x_sb = x.stride(0);
  p.z_sb = stride0(z);
  p.out_sb = out.stride(0);
  p.idx_sb = index.numel() > 1 ? 1 : 0;
  p.stream_id = static_cast<int>(stream_id);
  p.dtype = dtype_code(x, "sample");
  const cudaError_t err = fastdiff::launch_add_noise(p, c10::cuda::getCurrentCUDAStream(x.device().index()));
  TORCH_CHECK(err == cudaSuccess, "fastdiff::add_noise_cuda launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  m.def(
      "fused_step_cuda(Tensor?[] inputs, Tensor(a!)? prev, Tensor(b!)? x0, Tensor(c!)? corr, float clip_range, "
      "int var_mode) -> ()");
  m.def(
      "add_noise_cuda(Tensor x, Tensor? z, Tensor table, Tensor index, Tensor? seed, Tensor? offset, "
      "Tensor(a!) out, int stream_id) -> ()");
}

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("fused_step_cuda", &fused_step_cuda);
  m.impl("add_noise_cuda", &add_noise_cuda);
}

// An importable module (fastdiff._C); importing it runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) { module.attr("NCOEF") = static_cast<int>(fastdiff::NCOEF); }
