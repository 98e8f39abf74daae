// Multi-scale deformable attention: the CUDA kernels and the host helpers that size their launch.
//
// Included by ms_deform_attn_cuda.cu, and by the CPU emulation in tests/ops/cuda_emulation (which
// defines MSDA_CUDA_EMULATION and runs every GPU thread as a host thread), so that the kernels can
// be checked against the reference on a machine without a GPU.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../ms_deform_attn.h"

#ifndef MSDA_CUDA_EMULATION
#include <cuda_runtime.h>
#endif

namespace detr_msda {
namespace cuda_kernels {

constexpr int kThreads = 256;  // per block; a multiple of 32, so groups never straddle warps
constexpr unsigned kFullMask = 0xffffffffu;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// kVec values read or written with one instruction (the pattern of ATen's aligned_vector).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Vec<T, kVec> load_vec(const T* ptr) {
  return *reinterpret_cast<const Vec<T, kVec>*>(ptr);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, kVec>& value) {
  *reinterpret_cast<Vec<T, kVec>*>(ptr) = value;
}

__device__ __forceinline__ float floor_of(float x) { return floorf(x); }
__device__ __forceinline__ double floor_of(double x) { return floor(x); }

// dst[j] += weight * g[j] for the kVec channels of one lane.
template <int kVec>
__device__ __forceinline__ void atomic_add_scaled(float* dst, float weight, const float* g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && CUDART_VERSION >= 12080
  if constexpr (kVec % 4 == 0) {
#pragma unroll
    for (int j = 0; j < kVec; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + j),
                make_float4(weight * g[j], weight * g[j + 1], weight * g[j + 2], weight * g[j + 3]));
    }
  } else if constexpr (kVec == 2) {
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(weight * g[0], weight * g[1]));
  } else {
    atomicAdd(dst, weight * g[0]);
  }
#else
#pragma unroll
  for (int j = 0; j < kVec; ++j) atomicAdd(dst + j, weight * g[j]);
#endif
}

template <int kVec>
__device__ __forceinline__ void atomic_add_scaled(double* dst, double weight, const double* g) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) atomicAdd(dst + j, weight * g[j]);
}

struct LevelInfo {
  int height, width;
  int64_t start;  // first token of the level
};

template <typename scalar_t>
struct Params {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* value;  // [B, S, M, D]
  const int64_t* shapes;  // [L, 2]
  const int64_t* starts;  // [L]
  const acc_t* loc;       // [B, Lq, M, L, P, 2]
  const acc_t* attn;      // [B, Lq, M, L, P]
  int64_t len_in, len_q, groups;
  int heads, channels, levels, points;
  int lanes;  // threads per (batch, query, head): a power of two <= 32
};

#ifndef MSDA_CUDA_EMULATION
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char shared[];
  return shared;
}
#endif

// Copies the level table to shared memory; every thread of the block must call it.
template <typename scalar_t>
__device__ __forceinline__ const LevelInfo* load_levels(const Params<scalar_t>& p) {
  LevelInfo* levels = reinterpret_cast<LevelInfo*>(dynamic_shared_memory());
  for (int l = threadIdx.x; l < p.levels; l += blockDim.x) {
    levels[l] = LevelInfo{static_cast<int>(p.shapes[2 * l]), static_cast<int>(p.shapes[2 * l + 1]), p.starts[l]};
  }
  __syncthreads();
  return levels;
}

// The bilinear footprint of one point: corner order (y0, x0), (y0, x1), (y1, x0), (y1, x1).
template <typename acc_t>
struct Corners {
  int64_t offset[4];  // element offsets from the level's first token (meaningful where inside)
  acc_t weight[4];
  bool inside[4];
  acc_t lx, ly;
};

// Pixel position x = loc_x * W - 0.5 (align_corners=False). Returns false when the point
// contributes nothing: outside (-1, W) x (-1, H), or NaN.
template <typename acc_t>
__device__ __forceinline__ bool locate(acc_t loc_x, acc_t loc_y, const LevelInfo& level, int64_t token_stride,
                                       Corners<acc_t>& c) {
  const acc_t x = loc_x * static_cast<acc_t>(level.width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(level.height) - acc_t(0.5);
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(level.width) &&
        y < static_cast<acc_t>(level.height))) {
    return false;
  }
  const acc_t fx = floor_of(x), fy = floor_of(y);
  const int x0 = static_cast<int>(fx), y0 = static_cast<int>(fy);
  c.lx = x - fx;
  c.ly = y - fy;
  const acc_t hx = acc_t(1) - c.lx, hy = acc_t(1) - c.ly;
  c.weight[0] = hy * hx;
  c.weight[1] = hy * c.lx;
  c.weight[2] = c.ly * hx;
  c.weight[3] = c.ly * c.lx;
  const bool left = x0 >= 0, right = x0 + 1 < level.width, top = y0 >= 0, bottom = y0 + 1 < level.height;
  c.inside[0] = top && left;
  c.inside[1] = top && right;
  c.inside[2] = bottom && left;
  c.inside[3] = bottom && right;
  c.offset[0] = (static_cast<int64_t>(y0) * level.width + x0) * token_stride;
  c.offset[1] = c.offset[0] + token_stride;
  c.offset[2] = c.offset[0] + static_cast<int64_t>(level.width) * token_stride;
  c.offset[3] = c.offset[2] + token_stride;
  return true;
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const Params<scalar_t> p, scalar_t* __restrict__ out) {
  using acc_t = acc_type_t<scalar_t>;
  const LevelInfo* levels = load_levels(p);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t bqm = thread / p.lanes;  // (batch, query, head), head fastest
  const int lane = static_cast<int>(thread % p.lanes);
  if (bqm >= p.groups) return;
  const int64_t m = bqm % p.heads;
  const int64_t b = bqm / (p.len_q * p.heads);
  const int n_lp = p.levels * p.points;
  const acc_t* __restrict__ loc = p.loc + bqm * n_lp * 2;
  const acc_t* __restrict__ attn = p.attn + bqm * n_lp;
  const int64_t token_stride = static_cast<int64_t>(p.heads) * p.channels;
  const scalar_t* __restrict__ value_bm = p.value + (b * p.len_in * p.heads + m) * p.channels;
  for (int c0 = lane * kVec; c0 < p.channels; c0 += p.lanes * kVec) {
    acc_t acc[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] = acc_t(0);
    for (int l = 0; l < p.levels; ++l) {
      const LevelInfo level = levels[l];
      const scalar_t* __restrict__ value_l = value_bm + level.start * token_stride + c0;
      for (int k = l * p.points; k < (l + 1) * p.points; ++k) {
        Corners<acc_t> c;
        if (!locate(loc[2 * k], loc[2 * k + 1], level, token_stride, c)) continue;
        const acc_t a = attn[k];
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (!c.inside[corner]) continue;
          const Vec<scalar_t, kVec> v = load_vec<scalar_t, kVec>(value_l + c.offset[corner]);
          const acc_t weight = a * c.weight[corner];
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[j] += weight * static_cast<acc_t>(v.v[j]);
        }
      }
    }
    Vec<scalar_t, kVec> result;
#pragma unroll
    for (int j = 0; j < kVec; ++j) result.v[j] = static_cast<scalar_t>(acc[j]);
    store_vec<scalar_t, kVec>(out + bqm * p.channels + c0, result);
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const Params<scalar_t> p, const scalar_t* __restrict__ grad_out,
                    acc_type_t<scalar_t>* __restrict__ grad_value, acc_type_t<scalar_t>* __restrict__ grad_loc,
                    acc_type_t<scalar_t>* __restrict__ grad_attn) {
  using acc_t = acc_type_t<scalar_t>;
  const LevelInfo* levels = load_levels(p);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t bqm = thread / p.lanes;
  const int lane = static_cast<int>(thread % p.lanes);
  // Whole groups are active or not, so every shuffle partner below is in the mask.
  const unsigned mask = __ballot_sync(kFullMask, bqm < p.groups);
  if (bqm >= p.groups) return;
  const int64_t m = bqm % p.heads;
  const int64_t b = bqm / (p.len_q * p.heads);
  const int n_lp = p.levels * p.points;
  const acc_t* __restrict__ loc = p.loc + bqm * n_lp * 2;
  const acc_t* __restrict__ attn = p.attn + bqm * n_lp;
  const int64_t token_stride = static_cast<int64_t>(p.heads) * p.channels;
  const int64_t bm_offset = (b * p.len_in * p.heads + m) * p.channels;
  // The channel loop has the same trip count in every lane of a group (the shuffles need that).
  for (int base = 0; base < p.channels; base += p.lanes * kVec) {
    const int c0 = base + lane * kVec;
    const bool has_channels = c0 < p.channels;
    acc_t g[kVec];
    if (has_channels) {
      const Vec<scalar_t, kVec> go = load_vec<scalar_t, kVec>(grad_out + bqm * p.channels + c0);
#pragma unroll
      for (int j = 0; j < kVec; ++j) g[j] = static_cast<acc_t>(go.v[j]);
    }
    for (int l = 0; l < p.levels; ++l) {
      const LevelInfo level = levels[l];
      const int64_t level_offset = bm_offset + level.start * token_stride + c0;
      for (int k = l * p.points; k < (l + 1) * p.points; ++k) {
        Corners<acc_t> c;
        const bool valid = locate(loc[2 * k], loc[2 * k + 1], level, token_stride, c);
        const acc_t a = valid ? attn[k] : acc_t(0);
        acc_t grad_a = acc_t(0), grad_x = acc_t(0), grad_y = acc_t(0);  // this lane's channels only
        if (valid && has_channels) {
          acc_t dot[4];  // <grad_out, corner value> over this lane's channels
#pragma unroll
          for (int corner = 0; corner < 4; ++corner) {
            dot[corner] = acc_t(0);
            if (!c.inside[corner]) continue;
            const Vec<scalar_t, kVec> v = load_vec<scalar_t, kVec>(p.value + level_offset + c.offset[corner]);
#pragma unroll
            for (int j = 0; j < kVec; ++j) dot[corner] += g[j] * static_cast<acc_t>(v.v[j]);
            atomic_add_scaled<kVec>(grad_value + level_offset + c.offset[corner], a * c.weight[corner], g);
          }
          const acc_t hx = acc_t(1) - c.lx, hy = acc_t(1) - c.ly;
          grad_a = c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] + c.weight[3] * dot[3];
          grad_x = hy * (dot[1] - dot[0]) + c.ly * (dot[3] - dot[2]);
          grad_y = hx * (dot[2] - dot[0]) + c.lx * (dot[3] - dot[1]);
        }
        for (int offset = p.lanes >> 1; offset > 0; offset >>= 1) {
          grad_a += __shfl_xor_sync(mask, grad_a, offset);
          grad_x += __shfl_xor_sync(mask, grad_x, offset);
          grad_y += __shfl_xor_sync(mask, grad_y, offset);
        }
        if (lane == 0) {
          // d(pixel x)/d(loc x) = W and d(pixel y)/d(loc y) = H.
          grad_x *= a * static_cast<acc_t>(level.width);
          grad_y *= a * static_cast<acc_t>(level.height);
          acc_t* gl = grad_loc + (bqm * n_lp + k) * 2;
          acc_t* ga = grad_attn + bqm * n_lp + k;
          if (base == 0) {
            gl[0] = grad_x;
            gl[1] = grad_y;
            *ga = grad_a;
          } else {
            gl[0] += grad_x;
            gl[1] += grad_y;
            *ga += grad_a;
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

// Channels per lane: the widest of (16 bytes, 2, 1) that divides D and keeps every vector access
// aligned.
template <typename scalar_t>
int channels_per_lane(int64_t channels, std::initializer_list<const void*> pointers) {
  constexpr int kWidest = static_cast<int>(16 / sizeof(scalar_t));
  for (int vec : {kWidest, 2, 1}) {
    if (vec > kWidest || channels % vec != 0) continue;
    const uintptr_t bytes = vec * sizeof(scalar_t);
    bool aligned = true;
    for (const void* ptr : pointers) aligned = aligned && reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
    if (aligned) return vec;
  }
  return 1;
}

// Calls fn(std::integral_constant<int, vec>) for the instantiated vector widths.
template <typename scalar_t, typename Fn>
void with_vec(int vec, const Fn& fn) {
  constexpr int kWidest = static_cast<int>(16 / sizeof(scalar_t));
  if (vec == kWidest) {
    fn(std::integral_constant<int, kWidest>());
  } else if (vec == 2) {
    fn(std::integral_constant<int, 2>());
  } else {
    fn(std::integral_constant<int, 1>());
  }
}

template <typename scalar_t>
Params<scalar_t> make_params(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                             const at::Tensor& loc, const at::Tensor& attn, const Problem& pr, int vec) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t per_lane = (pr.channels + vec - 1) / vec;
  int lanes = 1;
  while (lanes < per_lane && lanes < 32) lanes <<= 1;
  TORCH_CHECK(pr.heads * pr.channels < (int64_t(1) << 31) && pr.levels * pr.points < (int64_t(1) << 31),
              "ms_deform_attn: too many heads, channels or points");
  return Params<scalar_t>{value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                          loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), pr.len_in, pr.len_q,
                          pr.batch * pr.len_q * pr.heads, static_cast<int>(pr.heads), static_cast<int>(pr.channels),
                          static_cast<int>(pr.levels), static_cast<int>(pr.points), lanes};
}

template <typename scalar_t>
dim3 grid_for(const Params<scalar_t>& p) {
  const int64_t blocks = (p.groups * p.lanes + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "ms_deform_attn: problem too large for one launch");
  return dim3(static_cast<unsigned>(blocks));
}

}  // namespace cuda_kernels
}  // namespace detr_msda
