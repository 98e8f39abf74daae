// Multi-scale deformable attention on CUDA: forward and backward kernels (fp32, fp16, bf16, fp64).
//
// Layout: a group of consecutive threads of a warp (a power of two <= 32) handles one (batch, query,
// head). Its `lanes` channel lanes each own kVec consecutive channels read with one vector load (16
// bytes: 4 fp32 or 8 fp16/bf16 channels), so for D = 32 fp32 a head takes 8 lanes instead of 32
// threads each loading 4 bytes, and the coordinate math of a point is done once per lane instead of
// once per channel. When that gives fewer threads than the GPU holds at once (a decoder: 300 queries
// x 8 heads x batch 2 = 4800 groups, 38400 threads on a GPU that holds 270k), the group is widened by
// `point_lanes` slices that split the (level, point) pairs, and the forward sums the slices' partial
// outputs with xor-shuffles. Groups follow the [B, Lq, M] order of the locations, weights and output,
// so those are read and written contiguously. Sampling locations, weights and all accumulation are
// fp32 (fp64 for fp64 values).
// Backward: the location and weight gradients of a point are reduced over the channel lanes of its
// slice with xor-shuffles (no shared memory, no barriers); grad_value is accumulated in fp32 with one
// atomic per lane and corner: a float4/float2 vector atomic on sm_90+, kVec scalar ones before. For
// fp16/bf16 values the backward reads 8 bytes (4 channels) per lane, so that a lane's atomic is one
// float4 and the lanes of a group cover whole 32-byte sectors of grad_value in one instruction (with
// 8 channels a lane needs two float4 atomics, each instruction touching every sector half).
// Points outside the map and corners outside skip their loads and atomics.
// One launch for any batch size, 64-bit offsets.
//
// DETR_MSDA_CUDA_TUNING (for benchmarks; tools/benchmark_msda.py --tunings) overrides the launch
// choices: "point_lanes=1|2|4|...,fwd_vec_bytes=16|8|4|2,bwd_vec_bytes=16|8|4|2,vector_atomics=0|1", any subset.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>

#include "../ms_deform_attn.h"
#include "ms_deform_attn_kernels.cuh"

namespace detr_msda {
namespace {

using cuda_kernels::backward_kernel;
using cuda_kernels::channel_lanes;
using cuda_kernels::channels_per_lane;
using cuda_kernels::fit_point_lanes;
using cuda_kernels::forward_kernel;
using cuda_kernels::grid_for;
using cuda_kernels::kThreads;
using cuda_kernels::LevelInfo;
using cuda_kernels::make_params;
using cuda_kernels::Params;
using cuda_kernels::point_lanes_for;
using cuda_kernels::with_vec;
template <typename scalar_t>
using acc_type_t = cuda_kernels::acc_type_t<scalar_t>;

constexpr const char* kTuningVariable = "DETR_MSDA_CUDA_TUNING";

struct Tuning {
  int point_lanes = 0;    // 0: point_lanes_for (fill the GPU)
  int fwd_vec_bytes = 16;
  int bwd_vec_bytes = 0;  // 0: 16, or 8 for 2-byte values (see the layout notes above)
  int vector_atomics = 1;  // backward: float4/float2 atomics on sm_90+ (0: scalar ones)
};

int parse_tuning_value(const std::string& key, const std::string& text, std::initializer_list<int> allowed) {
  char* end = nullptr;
  const long value = std::strtol(text.c_str(), &end, 10);
  bool listed = false;
  for (int a : allowed) listed = listed || value == a;
  TORCH_CHECK(!text.empty() && *end == '\0' && listed, kTuningVariable, ": bad value '", text, "' for ", key);
  return static_cast<int>(value);
}

// The launch choices of this call: defaults, overridden by DETR_MSDA_CUDA_TUNING (read at every call,
// so that a benchmark can compare settings in one process).
Tuning tuning_from_env() {
  Tuning t;
  const char* env = std::getenv(kTuningVariable);
  if (env == nullptr) return t;
  const std::string text(env);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t comma = text.find(',', pos);
    if (comma == std::string::npos) comma = text.size();
    const std::string item = text.substr(pos, comma - pos);
    pos = comma + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    TORCH_CHECK(eq != std::string::npos, kTuningVariable, ": expected key=value, got '", item, "'");
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    if (key == "point_lanes") {
      t.point_lanes = parse_tuning_value(key, value, {1, 2, 4, 8, 16, 32});
    } else if (key == "fwd_vec_bytes") {
      t.fwd_vec_bytes = parse_tuning_value(key, value, {2, 4, 8, 16});
    } else if (key == "bwd_vec_bytes") {
      t.bwd_vec_bytes = parse_tuning_value(key, value, {2, 4, 8, 16});
    } else if (key == "vector_atomics") {
      t.vector_atomics = parse_tuning_value(key, value, {0, 1});
    } else {
      TORCH_CHECK(false, kTuningVariable, ": unknown key '", key,
                  "' (point_lanes, fwd_vec_bytes, bwd_vec_bytes, vector_atomics)");
    }
  }
  return t;
}

// Threads the current GPU holds at once (SMs x threads per SM), asked once per device.
int64_t resident_threads() {
  static std::mutex lock;
  static std::unordered_map<int, int64_t> cache;
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> guard(lock);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int sms = 0, threads = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return cache[device] = static_cast<int64_t>(sms) * threads;
}

// Point slices for a launch: the override, capped to what fits a warp and the pairs, or enough to fill the GPU.
int choose_point_lanes(const Tuning& t, const Problem& pr, int vec) {
  const int lanes = channel_lanes(pr.channels, vec);
  const int pairs = static_cast<int>(pr.levels * pr.points);
  if (t.point_lanes > 0) return fit_point_lanes(t.point_lanes, lanes, pairs);
  return point_lanes_for(pr.batch * pr.len_q * pr.heads, lanes, pairs, resident_threads());
}

Problem check_cuda_inputs(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                          const at::Tensor& loc, const at::Tensor& attn) {
  const Problem pr = check_inputs(value, shapes, starts, loc, attn);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA kernel): tensors must be on a CUDA device, got ",
              value.device());
  return pr;
}

at::Tensor forward_cuda(const at::Tensor& value_in, const at::Tensor& shapes_in, const at::Tensor& starts_in,
                        const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const Problem pr = check_cuda_inputs(value_in, shapes_in, starts_in, loc_in, attn_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous(), shapes = shapes_in.contiguous(), starts = starts_in.contiguous();
  const at::Tensor loc = loc_in.contiguous(), attn = attn_in.contiguous();
  at::Tensor output = at::empty({pr.batch, pr.len_q, pr.heads * pr.channels}, value.options());
  if (output.numel() == 0) return output;
  const size_t shared = static_cast<size_t>(pr.levels) * sizeof(LevelInfo);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tuning tuning = tuning_from_env();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const int vec = channels_per_lane<scalar_t>(pr.channels, {value.data_ptr(), output.data_ptr()},
                                                tuning.fwd_vec_bytes);
    const Params<scalar_t> p =
        make_params<scalar_t>(value, shapes, starts, loc, attn, pr, vec, choose_point_lanes(tuning, pr, vec));
    with_vec<scalar_t>(vec, [&](auto v) {
      auto* kernel = p.point_lanes > 1 ? forward_kernel<scalar_t, decltype(v)::value, true>
                                       : forward_kernel<scalar_t, decltype(v)::value, false>;
      kernel<<<grid_for(p), kThreads, shared, stream>>>(p, output.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output_in,
                                                             const at::Tensor& value_in, const at::Tensor& shapes_in,
                                                             const at::Tensor& starts_in, const at::Tensor& loc_in,
                                                             const at::Tensor& attn_in) {
  const Problem pr = check_cuda_inputs(value_in, shapes_in, starts_in, loc_in, attn_in);
  TORCH_CHECK(grad_output_in.sizes() == at::IntArrayRef({pr.batch, pr.len_q, pr.heads * pr.channels}) &&
                  grad_output_in.scalar_type() == value_in.scalar_type() &&
                  grad_output_in.device() == value_in.device(),
              "ms_deform_attn backward: grad_output must be [B, Lq, M * D], of the value dtype and device");
  // grad_value is summed with atomics: the order of the additions, hence the last bits, vary.
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward (CUDA)");
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous(), shapes = shapes_in.contiguous(), starts = starts_in.contiguous();
  const at::Tensor loc = loc_in.contiguous(), attn = attn_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();
  // fp32 accumulation (fp64 for fp64 values); converted at the end for fp16/bf16 values.
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(accumulate_type(value.scalar_type())));
  at::Tensor grad_loc = at::empty_like(loc);
  at::Tensor grad_attn = at::empty_like(attn);
  if (grad_output.numel() > 0) {
    const size_t shared = static_cast<size_t>(pr.levels) * sizeof(LevelInfo);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const Tuning tuning = tuning_from_env();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = acc_type_t<scalar_t>;
      const int max_bytes = tuning.bwd_vec_bytes > 0 ? tuning.bwd_vec_bytes : (sizeof(scalar_t) == 2 ? 8 : 16);
      const int vec = channels_per_lane<scalar_t>(pr.channels, {value.data_ptr(), grad_output.data_ptr()}, max_bytes);
      const int point_lanes = choose_point_lanes(tuning, pr, vec);
      const Params<scalar_t> p =
          make_params<scalar_t>(value, shapes, starts, loc, attn, pr, vec, point_lanes, tuning.vector_atomics != 0);
      with_vec<scalar_t>(vec, [&](auto v) {
        auto* kernel = p.point_lanes > 1 ? backward_kernel<scalar_t, decltype(v)::value, true>
                                         : backward_kernel<scalar_t, decltype(v)::value, false>;
        kernel<<<grid_for(p), kThreads, shared, stream>>>(p, grad_output.data_ptr<scalar_t>(),
                                                          grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
                                                          grad_attn.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  if (grad_value.scalar_type() != value.scalar_type()) grad_value = grad_value.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(detr_msda, CUDA, m) {
  m.impl("ms_deform_attn", &forward_cuda);
  m.impl("ms_deform_attn_backward", &backward_cuda);
}

}  // namespace detr_msda
