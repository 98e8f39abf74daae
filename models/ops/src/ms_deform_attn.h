// Multi-scale deformable attention: shared declarations of the compiled extension.
//
// Shapes (B batch, S = sum_l H_l * W_l value tokens, M heads, D channels per head, Lq queries,
// L levels, P points per level and head):
//   value               [B, S, M, D]        fp32, fp16, bf16 (fp64 for gradient checks)
//   spatial_shapes      [L, 2]  int64        (H_l, W_l)
//   level_start_index   [L]     int64        first token of level l in S
//   sampling_locations  [B, Lq, M, L, P, 2]  normalised (x, y); fp32 (fp64 with fp64 values)
//   attention_weights   [B, Lq, M, L, P]     same dtype as the locations
//   output              [B, Lq, M * D]       dtype of value
// A point samples the level bilinearly at pixel (x * W_l - 0.5, y * H_l - 0.5) (align_corners=False)
// with zero padding, and contributes only when -1 < x_px < W_l and -1 < y_px < H_l.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace detr_msda {

// Sizes shared by every implementation, read from (and checked against) the inputs.
struct Problem {
  int64_t batch, len_in, heads, channels, len_q, levels, points;
};

// Checks ranks, sizes, dtypes and devices (no device synchronisation) and returns the sizes.
Problem check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                     const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                     const at::Tensor& attention_weights);

// The dtype that locations, weights and gradient accumulation use for a value dtype.
inline at::ScalarType accumulate_type(at::ScalarType value_type) {
  return value_type == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace detr_msda
