// The CUDA kernels of models/ops/src/cuda compiled for the CPU (cuda_emulation.h), with the same
// launch sizing as the CUDA launchers (channels_per_lane, make_params, grid_for), for
// run_emulation.py to compare against the pure-PyTorch reference. Built twice: as for sm_80 (scalar
// atomics) and, with MSDA_EMULATE_SM90, as for sm_90 (vector atomics).
#include "cuda_emulation.h"

#include <ATen/Dispatch.h>
#include <torch/extension.h>

#ifdef MSDA_EMULATE_SM90  // only around the kernels: torch's headers above must not see it
#define __CUDA_ARCH__ 900
#define CUDART_VERSION 13000
#endif
#include "../../../models/ops/src/cuda/ms_deform_attn_kernels.cuh"
#ifdef MSDA_EMULATE_SM90
#undef __CUDA_ARCH__
#undef CUDART_VERSION
#endif

namespace {

using namespace detr_msda::cuda_kernels;

detr_msda::Problem problem(const at::Tensor& value, const at::Tensor& loc) {
  return {value.size(0), value.size(1), value.size(2), value.size(3), loc.size(1), loc.size(3), loc.size(4)};
}

// vec_bytes and point_lanes as DETR_MSDA_CUDA_TUNING sets them on a GPU (point_lanes 0: the choice for a
// GPU that holds target_threads at once).
int point_lanes_of(int point_lanes, const detr_msda::Problem& pr, int vec, int64_t target_threads) {
  const int lanes = channel_lanes(pr.channels, vec);
  const int pairs = static_cast<int>(pr.levels * pr.points);
  if (point_lanes == 0) return point_lanes_for(pr.batch * pr.len_q * pr.heads, lanes, pairs, target_threads);
  return fit_point_lanes(point_lanes, lanes, pairs);
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& loc,
                   const at::Tensor& attn, int64_t vec_bytes, int64_t point_lanes, int64_t target_threads) {
  const detr_msda::Problem pr = problem(value, loc);
  at::Tensor output = at::empty({pr.batch, pr.len_q, pr.heads * pr.channels}, value.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "emulated_forward", [&] {
    const int vec = channels_per_lane<scalar_t>(pr.channels, {value.data_ptr(), output.data_ptr()}, vec_bytes);
    const Params<scalar_t> p = make_params<scalar_t>(value, shapes, starts, loc, attn, pr, vec,
                                                     point_lanes_of(point_lanes, pr, vec, target_threads));
    with_vec<scalar_t>(vec, [&](auto v) {
      auto* kernel = p.point_lanes > 1 ? forward_kernel<scalar_t, decltype(v)::value, true>
                                       : forward_kernel<scalar_t, decltype(v)::value, false>;
      cuda_emulation::launch(grid_for(p), dim3(kThreads), pr.levels * sizeof(LevelInfo), kernel, p,
                             output.data_ptr<scalar_t>());
    });
  });
  return output;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& shapes,
                                 const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn,
                                 int64_t vec_bytes, int64_t point_lanes, int64_t target_threads,
                                 bool vector_atomics) {
  const detr_msda::Problem pr = problem(value, loc);
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(detr_msda::accumulate_type(value.scalar_type())));
  at::Tensor grad_loc = at::full_like(loc, NAN);  // every element must be written by the kernel
  at::Tensor grad_attn = at::full_like(attn, NAN);
  if (grad_output.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "emulated_backward", [&] {
      using acc_t = acc_type_t<scalar_t>;
      const int vec = channels_per_lane<scalar_t>(pr.channels, {value.data_ptr(), grad_output.data_ptr()}, vec_bytes);
      const Params<scalar_t> p = make_params<scalar_t>(value, shapes, starts, loc, attn, pr, vec,
                                                       point_lanes_of(point_lanes, pr, vec, target_threads),
                                                       vector_atomics);
      with_vec<scalar_t>(vec, [&](auto v) {
        auto* kernel = p.point_lanes > 1 ? backward_kernel<scalar_t, decltype(v)::value, true>
                                         : backward_kernel<scalar_t, decltype(v)::value, false>;
        cuda_emulation::launch(grid_for(p), dim3(kThreads), pr.levels * sizeof(LevelInfo), kernel, p,
                               grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
                               grad_attn.data_ptr<acc_t>());
      });
    });
  }
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("params", [](const at::Tensor& value, const at::Tensor& loc, int64_t vec_bytes, int64_t point_lanes,
                     int64_t target_threads) {
    // (channels per lane, channel lanes, point lanes) that forward/backward use for these arguments.
    const detr_msda::Problem pr = problem(value, loc);
    int vec = 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "emulated_params", [&] {
      vec = channels_per_lane<scalar_t>(pr.channels, {value.data_ptr()}, vec_bytes);
    });
    return std::vector<int64_t>{vec, channel_lanes(pr.channels, vec), point_lanes_of(point_lanes, pr, vec, target_threads)};
  });
}
