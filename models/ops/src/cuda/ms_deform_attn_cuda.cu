// Multi-scale deformable attention on CUDA: forward and backward kernels (fp32, fp16, bf16, fp64).
//
// Layout: a group of `lanes` consecutive threads of a warp (a power of two <= 32) handles one
// (batch, query, head); each lane owns kVec consecutive channels read with one 16-byte load (4
// fp32 or 8 fp16/bf16 channels), so for D = 32 fp32 a head takes 8 lanes instead of 32 threads
// each loading 4 bytes, and the coordinate math of a point is done once per lane instead of once
// per channel. Groups follow the [B, Lq, M] order of the locations, weights and output, so those
// are read and written contiguously. Sampling locations, weights and all accumulation are fp32
// (fp64 for fp64 values).
// Backward: the location and weight gradients of a point are reduced over the lanes of its group
// with xor-shuffles (no shared memory, no barriers); grad_value is accumulated in fp32 with one
// atomic per lane and corner: a float4/float2 vector atomic on sm_90+, kVec scalar ones before.
// Points outside the map and corners outside skip their loads and atomics.
// One launch for any batch size, 64-bit offsets.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../ms_deform_attn.h"
#include "ms_deform_attn_kernels.cuh"

namespace detr_msda {
namespace {

using cuda_kernels::backward_kernel;
using cuda_kernels::channels_per_lane;
using cuda_kernels::forward_kernel;
using cuda_kernels::grid_for;
using cuda_kernels::kThreads;
using cuda_kernels::LevelInfo;
using cuda_kernels::make_params;
using cuda_kernels::Params;
using cuda_kernels::with_vec;
template <typename scalar_t>
using acc_type_t = cuda_kernels::acc_type_t<scalar_t>;

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const int vec = channels_per_lane<scalar_t>(pr.channels, {value.data_ptr(), output.data_ptr()});
    const Params<scalar_t> p = make_params<scalar_t>(value, shapes, starts, loc, attn, pr, vec);
    with_vec<scalar_t>(vec, [&](auto v) {
      forward_kernel<scalar_t, decltype(v)::value>
          <<<grid_for(p), kThreads, shared, stream>>>(p, output.data_ptr<scalar_t>());
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
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = acc_type_t<scalar_t>;
      const int vec = channels_per_lane<scalar_t>(pr.channels, {value.data_ptr(), grad_output.data_ptr()});
      const Params<scalar_t> p = make_params<scalar_t>(value, shapes, starts, loc, attn, pr, vec);
      with_vec<scalar_t>(vec, [&](auto v) {
        backward_kernel<scalar_t, decltype(v)::value><<<grid_for(p), kThreads, shared, stream>>>(
            p, grad_output.data_ptr<scalar_t>(), grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
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
