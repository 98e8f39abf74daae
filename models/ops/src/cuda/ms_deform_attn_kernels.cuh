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

// dst[j] += weight * g[j] for the kVec channels of one lane: float4/float2 vector atomics on sm_90+ (CUDA 12.8+)
// when `vector` (the default; DETR_MSDA_CUDA_TUNING=vector_atomics=0 times scalar ones), kVec scalar ones otherwise.
template <int kVec>
__device__ __forceinline__ void atomic_add_scaled(float* dst, float weight, const float* g, bool vector) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && CUDART_VERSION >= 12080
  if (vector) {
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
    return;
  }
#endif
#pragma unroll
  for (int j = 0; j < kVec; ++j) atomicAdd(dst + j, weight * g[j]);
}

template <int kVec>
__device__ __forceinline__ void atomic_add_scaled(double* dst, double weight, const double* g, bool) {
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
  int lanes;        // channel lanes: threads that split a point's channels, a power of two
  int point_lanes;  // point slices: lane groups that split the (level, point) pairs, a power of two
  bool vector_atomics;  // backward: float4/float2 atomics where the GPU has them
  // A (batch, query, head) takes lanes * point_lanes <= 32 consecutive threads of one warp.
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

// Thread layout of a launch: which (batch, query, head), channel lane and point slice a thread has.
struct Slot {
  int64_t bqm;  // (batch, query, head), head fastest; >= groups for the padding threads of the last block
  int lane;     // channel lane
  int slice;    // point slice: it takes the pairs k = slice, slice + point_lanes, ... (k = level * P + point)
};

template <bool kSliced = true, typename scalar_t>
__device__ __forceinline__ Slot slot_of_thread(const Params<scalar_t>& p) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if constexpr (!kSliced) return Slot{thread / p.lanes, static_cast<int>(thread % p.lanes), 0};
  const int group_size = p.lanes * p.point_lanes;
  const int within = static_cast<int>(thread % group_size);
  return Slot{thread / group_size, within % p.lanes, within / p.lanes};
}

// kSliced: point_lanes may be > 1. The unsliced instantiation (the encoder's) is the plain loop over the
// channels and the (level, point) pairs, without the ballot and the reductions, so that it keeps its
// registers (and occupancy).
template <typename scalar_t, int kVec, bool kSliced>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const Params<scalar_t> p, scalar_t* __restrict__ out) {
  using acc_t = acc_type_t<scalar_t>;
  const LevelInfo* levels = load_levels(p);
  const Slot s = slot_of_thread<kSliced>(p);
  unsigned mask = kFullMask;
  if constexpr (kSliced) {
    // Whole groups are active or not, so every shuffle partner below is in the mask.
    mask = __ballot_sync(kFullMask, s.bqm < p.groups);
  }
  if (s.bqm >= p.groups) return;
  const int64_t m = s.bqm % p.heads;
  const int64_t b = s.bqm / (p.len_q * p.heads);
  const int n_lp = p.levels * p.points;
  const acc_t* __restrict__ loc = p.loc + s.bqm * n_lp * 2;
  const acc_t* __restrict__ attn = p.attn + s.bqm * n_lp;
  const int64_t token_stride = static_cast<int64_t>(p.heads) * p.channels;
  const scalar_t* __restrict__ value_bm = p.value + (b * p.len_in * p.heads + m) * p.channels;
  // Adds the samples of pair k to acc: this lane's channels of the level's values at value_l.
  auto sample = [&](int k, const LevelInfo& level, const scalar_t* __restrict__ value_l, acc_t* acc) {
    Corners<acc_t> c;
    if (!locate(loc[2 * k], loc[2 * k + 1], level, token_stride, c)) return;
    const acc_t a = attn[k];
#pragma unroll
    for (int corner = 0; corner < 4; ++corner) {
      if (!c.inside[corner]) continue;
      const Vec<scalar_t, kVec> v = load_vec<scalar_t, kVec>(value_l + c.offset[corner]);
      const acc_t weight = a * c.weight[corner];
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] += weight * static_cast<acc_t>(v.v[j]);
    }
  };
  if constexpr (!kSliced) {
    for (int c0 = s.lane * kVec; c0 < p.channels; c0 += p.lanes * kVec) {
      acc_t acc[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = acc_t(0);
      for (int l = 0; l < p.levels; ++l) {
        const LevelInfo level = levels[l];
        const scalar_t* __restrict__ value_l = value_bm + level.start * token_stride + c0;
        for (int k = l * p.points; k < (l + 1) * p.points; ++k) sample(k, level, value_l, acc);
      }
      Vec<scalar_t, kVec> result;
#pragma unroll
      for (int j = 0; j < kVec; ++j) result.v[j] = static_cast<scalar_t>(acc[j]);
      store_vec<scalar_t, kVec>(out + s.bqm * p.channels + c0, result);
    }
  } else {
    const int group_size = p.lanes * p.point_lanes;
    // The channel loop has the same trip count in every lane of a group (the shuffles need that).
    for (int base = 0; base < p.channels; base += p.lanes * kVec) {
      const int c0 = base + s.lane * kVec;
      const bool has_channels = c0 < p.channels;
      acc_t acc[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = acc_t(0);
      if (has_channels) {
        for (int k = s.slice; k < n_lp; k += p.point_lanes) {
          const LevelInfo level = levels[k / p.points];
          sample(k, level, value_bm + level.start * token_stride + c0, acc);
        }
      }
      // Sum the point slices' partial sums.
      for (int offset = p.lanes; offset < group_size; offset <<= 1) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] += __shfl_xor_sync(mask, acc[j], offset);
      }
      if (has_channels && s.slice == 0) {
        Vec<scalar_t, kVec> result;
#pragma unroll
        for (int j = 0; j < kVec; ++j) result.v[j] = static_cast<scalar_t>(acc[j]);
        store_vec<scalar_t, kVec>(out + s.bqm * p.channels + c0, result);
      }
    }
  }
}

// kSliced as for the forward: the unsliced instantiation loops over the levels and their points.
template <typename scalar_t, int kVec, bool kSliced>
__global__ void __launch_bounds__(kThreads, 4)
    backward_kernel(const Params<scalar_t> p, const scalar_t* __restrict__ grad_out,
                    acc_type_t<scalar_t>* __restrict__ grad_value, acc_type_t<scalar_t>* __restrict__ grad_loc,
                    acc_type_t<scalar_t>* __restrict__ grad_attn) {
  using acc_t = acc_type_t<scalar_t>;
  const LevelInfo* levels = load_levels(p);
  const Slot s = slot_of_thread<kSliced>(p);
  // Whole groups are active or not, so every shuffle partner below is in the mask.
  const unsigned mask = __ballot_sync(kFullMask, s.bqm < p.groups);
  if (s.bqm >= p.groups) return;
  const int64_t m = s.bqm % p.heads;
  const int64_t b = s.bqm / (p.len_q * p.heads);
  const int n_lp = p.levels * p.points;
  const acc_t* __restrict__ loc = p.loc + s.bqm * n_lp * 2;
  const acc_t* __restrict__ attn = p.attn + s.bqm * n_lp;
  const int64_t token_stride = static_cast<int64_t>(p.heads) * p.channels;
  const int64_t bm_offset = (b * p.len_in * p.heads + m) * p.channels;
  // Every loop below has the same trip count in every lane of a group (the shuffles need that): a
  // slice whose last round has no pair left runs it with in_range false.
  for (int base = 0; base < p.channels; base += p.lanes * kVec) {
    const int c0 = base + s.lane * kVec;
    const bool has_channels = c0 < p.channels;
    acc_t g[kVec];
    if (has_channels) {
      const Vec<scalar_t, kVec> go = load_vec<scalar_t, kVec>(grad_out + s.bqm * p.channels + c0);
#pragma unroll
      for (int j = 0; j < kVec; ++j) g[j] = static_cast<acc_t>(go.v[j]);
    }
    // Pair k of level `level`: grad_value by atomics, grad_loc and grad_attn reduced over this slice's lanes.
    auto backward_pair = [&](int k, bool in_range, const LevelInfo& level) {
      const int64_t level_offset = bm_offset + level.start * token_stride + c0;
      Corners<acc_t> c;
      const bool valid = in_range && locate(loc[2 * k], loc[2 * k + 1], level, token_stride, c);
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
          atomic_add_scaled<kVec>(grad_value + level_offset + c.offset[corner], a * c.weight[corner], g,
                                  p.vector_atomics);
        }
        const acc_t hx = acc_t(1) - c.lx, hy = acc_t(1) - c.ly;
        grad_a = c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] + c.weight[3] * dot[3];
        grad_x = hy * (dot[1] - dot[0]) + c.ly * (dot[3] - dot[2]);
        grad_y = hx * (dot[2] - dot[0]) + c.lx * (dot[3] - dot[1]);
      }
      // xor below `lanes`: the channel lanes of this slice only.
      for (int offset = p.lanes >> 1; offset > 0; offset >>= 1) {
        grad_a += __shfl_xor_sync(mask, grad_a, offset);
        grad_x += __shfl_xor_sync(mask, grad_x, offset);
        grad_y += __shfl_xor_sync(mask, grad_y, offset);
      }
      if (s.lane == 0 && in_range) {
        // d(pixel x)/d(loc x) = W and d(pixel y)/d(loc y) = H.
        grad_x *= a * static_cast<acc_t>(level.width);
        grad_y *= a * static_cast<acc_t>(level.height);
        acc_t* gl = grad_loc + (s.bqm * n_lp + k) * 2;
        acc_t* ga = grad_attn + s.bqm * n_lp + k;
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
    };
    if constexpr (!kSliced) {
      for (int l = 0; l < p.levels; ++l) {
        const LevelInfo level = levels[l];
        for (int k = l * p.points; k < (l + 1) * p.points; ++k) backward_pair(k, true, level);
      }
    } else {
      for (int k0 = 0; k0 < n_lp; k0 += p.point_lanes) {
        const int k = k0 + s.slice;
        const bool in_range = k < n_lp;
        backward_pair(k, in_range, levels[in_range ? k / p.points : 0]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

// Channels per lane: the widest vector of at most max_bytes (and 16) bytes that divides D and keeps
// every vector access aligned.
template <typename scalar_t>
int channels_per_lane(int64_t channels, std::initializer_list<const void*> pointers, int max_bytes = 16) {
  for (int vec : {8, 4, 2, 1}) {
    const int bytes = vec * static_cast<int>(sizeof(scalar_t));
    if (vec > 1 && (bytes > 16 || bytes > max_bytes || channels % vec != 0)) continue;
    bool aligned = true;
    for (const void* ptr : pointers) aligned = aligned && reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
    if (aligned) return vec;
  }
  return 1;
}

// Calls fn(std::integral_constant<int, vec>) for the instantiated vector widths (1, 2, 4, 8 channels,
// at most 16 bytes).
template <typename scalar_t, typename Fn>
void with_vec(int vec, const Fn& fn) {
  constexpr int kWidest = static_cast<int>(16 / sizeof(scalar_t));
  if constexpr (kWidest >= 8) {
    if (vec == 8) return fn(std::integral_constant<int, 8>());
  }
  if constexpr (kWidest >= 4) {
    if (vec == 4) return fn(std::integral_constant<int, 4>());
  }
  if (vec == 2) return fn(std::integral_constant<int, 2>());
  return fn(std::integral_constant<int, 1>());
}

// Channel lanes for D channels read vec at a time: the smallest power of two that covers them, at most 32.
inline int channel_lanes(int64_t channels, int vec) {
  const int64_t per_lane = (channels + vec - 1) / vec;
  int lanes = 1;
  while (lanes < per_lane && lanes < 32) lanes <<= 1;
  return lanes;
}

// Point slices: doubled while the launch has fewer threads than target_threads (what the GPU holds at
// once), the group still fits a warp and every slice keeps at least one (level, point) pair. The
// encoder (Lq = S, ~10^5 groups) keeps one slice; a decoder (300 queries) gets its threads from the points.
inline int point_lanes_for(int64_t groups, int lanes, int pairs, int64_t target_threads) {
  int point_lanes = 1;
  while (point_lanes * 2 <= pairs && lanes * point_lanes * 2 <= 32 && groups * lanes * point_lanes < target_threads) {
    point_lanes <<= 1;
  }
  return point_lanes;
}

// A requested number of point slices, halved until the group fits a warp and every slice has a pair.
inline int fit_point_lanes(int point_lanes, int lanes, int pairs) {
  while (point_lanes > 1 && (lanes * point_lanes > 32 || point_lanes > pairs)) point_lanes >>= 1;
  return point_lanes;
}

template <typename scalar_t>
Params<scalar_t> make_params(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                             const at::Tensor& loc, const at::Tensor& attn, const Problem& pr, int vec,
                             int point_lanes, bool vector_atomics = true) {
  using acc_t = acc_type_t<scalar_t>;
  const int lanes = channel_lanes(pr.channels, vec);
  TORCH_CHECK(pr.heads * pr.channels < (int64_t(1) << 31) && pr.levels * pr.points < (int64_t(1) << 31),
              "ms_deform_attn: too many heads, channels or points");
  TORCH_CHECK(point_lanes >= 1 && (point_lanes & (point_lanes - 1)) == 0 && lanes * point_lanes <= 32,
              "ms_deform_attn: point lanes must be a power of two with lanes * point lanes <= 32, got ",
              point_lanes, " with ", lanes, " channel lanes");
  return Params<scalar_t>{value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                          loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), pr.len_in, pr.len_q,
                          pr.batch * pr.len_q * pr.heads, static_cast<int>(pr.heads), static_cast<int>(pr.channels),
                          static_cast<int>(pr.levels), static_cast<int>(pr.points), lanes, point_lanes,
                          vector_atomics};
}

template <typename scalar_t>
dim3 grid_for(const Params<scalar_t>& p) {
  const int64_t blocks = (p.groups * p.lanes * p.point_lanes + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "ms_deform_attn: problem too large for one launch");
  return dim3(static_cast<unsigned>(blocks));
}

}  // namespace cuda_kernels
}  // namespace detr_msda
