// Multi-scale deformable attention: operator schemas, input checks, autograd and the Python module.
//
// The operators live in the `detr_msda` namespace of torch.library. Device kernels register
// themselves from src/cpu and src/cuda; the autograd formula is registered here, in C++, so the
// eager path has no Python in it; the fake (shape) functions are registered from Python
// (models/ops/functions/ms_deform_attn_func.py) so torch.compile can trace the operators.
#include "ms_deform_attn.h"

#include <torch/autograd.h>
#include <torch/extension.h>
#include <torch/library.h>

namespace detr_msda {

Problem check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                     const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                     const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [B, S, M, D], got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [B, Lq, M, L, P, 2], got ",
              sampling_locations.sizes());
  Problem p{value.size(0), value.size(1), value.size(2), value.size(3),
            sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == p.batch && sampling_locations.size(2) == p.heads,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " do not match value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be [B, Lq, M, L, P] = ",
              sampling_locations.sizes().slice(0, 5), ", got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == p.levels &&
                  spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2] with L = ", p.levels, ", got ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == p.levels,
              "ms_deform_attn: level_start_index must be [L] with L = ", p.levels, ", got ",
              level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  const auto value_type = value.scalar_type();
  TORCH_CHECK(value_type == at::kFloat || value_type == at::kHalf || value_type == at::kBFloat16 ||
                  value_type == at::kDouble,
              "ms_deform_attn: value must be float32, float16, bfloat16 or float64, got ", value_type);
  const auto coord_type = accumulate_type(value_type);
  TORCH_CHECK(sampling_locations.scalar_type() == coord_type &&
                  attention_weights.scalar_type() == coord_type,
              "ms_deform_attn: with ", value_type, " values, sampling_locations and attention_weights must be ",
              coord_type, ", got ", sampling_locations.scalar_type(), " and ",
              attention_weights.scalar_type());
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all inputs must be on ",
                value.device(), ", got one on ", t->device());
  }
  return p;
}

namespace {

// Calls the device kernels through the dispatcher, below the autograd key.
at::Tensor forward_below_autograd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detr_msda::ms_deform_attn", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&)>();
  return op.call(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("detr_msda::ms_deform_attn_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights);
}

class MSDeformAttnFunction : public torch::autograd::Function<MSDeformAttnFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& value,
                            const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                            const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor output = forward_below_autograd(value, spatial_shapes, level_start_index,
                                               sampling_locations, attention_weights);
    // Only the inputs are kept for backward: no sampled intermediates.
    ctx->save_for_backward({value, spatial_shapes, level_start_index, sampling_locations, attention_weights});
    return output;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_value, grad_locations, grad_weights] =
        backward_op(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4]);
    return {grad_value, at::Tensor(), at::Tensor(), grad_locations, grad_weights};
  }
};

at::Tensor forward_autograd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  return MSDeformAttnFunction::apply(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights);
}

bool cuda_built() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(detr_msda, m) {
  m.def("ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def("ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
        "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(detr_msda, Autograd, m) {
  m.impl("ms_deform_attn", &forward_autograd);
}

}  // namespace detr_msda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention kernels (operators under torch.ops.detr_msda)";
  m.def("cuda_built", &detr_msda::cuda_built, "Whether the CUDA kernels were compiled into this build");
}
