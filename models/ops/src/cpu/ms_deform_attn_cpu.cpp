// Multi-scale deformable attention on CPU: forward and backward kernels.
//
// Forward: chunks of (batch, query, head) rows on torch's threads. Backward: one task per (batch, head)
// owns that head's slice of grad_value, so no atomics are needed; when there are fewer
// (batch, head) pairs than threads the queries are split as well, the extra splits accumulating
// into private copies of grad_value that are summed at the end.
// Per (query, head) the work has two phases: the coordinate math of all L * P points at once
// (vectorised over points: pixel position, cell, weighted bilinear corners), then the loops over
// the D channels of each corner (vectorised over channels, in registers when the head dim is a
// compile-time constant). No intermediate larger than a few rows is allocated.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../ms_deform_attn.h"
#include "cpu_isa.h"

namespace detr_msda {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// ------------------------------------------------------------------------------------------------
// Packs of eight fp32 (four fp64) channels: GCC/Clang vector extensions, lowered to the ISA of
// the function they are inlined into (AVX2: one register; the x86 baseline, SSE2: two).
template <typename acc_t>
struct PackType {
  typedef acc_t type __attribute__((vector_size(32)));
};

template <typename acc_t>
struct Packs {
  using pack = typename PackType<acc_t>::type;
  static constexpr int kLanes = static_cast<int>(sizeof(pack) / sizeof(acc_t));

  template <typename scalar_t>
  static MSDA_ALWAYS_INLINE pack load(const scalar_t* src) {
    pack out;
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      std::memcpy(&out, src, sizeof(out));
    } else {
      for (int i = 0; i < kLanes; ++i) out[i] = static_cast<acc_t>(src[i]);
    }
    return out;
  }

  template <typename scalar_t>
  static MSDA_ALWAYS_INLINE void store(scalar_t* dst, const pack& value) {
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      std::memcpy(dst, &value, sizeof(value));
    } else {
      for (int i = 0; i < kLanes; ++i) dst[i] = static_cast<scalar_t>(value[i]);
    }
  }

  // Pairwise (log-depth) sum of the lanes; a plain loop would be one long dependent chain.
  static MSDA_ALWAYS_INLINE acc_t sum(const pack& v) {
    acc_t lanes[kLanes];
    std::memcpy(lanes, &v, sizeof(v));
#pragma GCC unroll 8
    for (int width = kLanes / 2; width > 0; width /= 2) {
#pragma GCC unroll 8
      for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
    }
    return lanes[0];
  }
};

// How the D channels of one head are held: kPacks registers when D is a compile-time multiple of
// the pack width (kD > 0), else a buffer and plain loops.
template <int kD, typename acc_t>
struct Layout {
  using P = Packs<acc_t>;
  static constexpr bool kPacked = kD > 0 && kD % P::kLanes == 0;
  static constexpr int kPacks = kPacked ? kD / P::kLanes : 1;
  // Independent forward accumulators (corners alternate) so that >= 8 FMA chains are in flight.
  static constexpr int kSets = kPacks >= 8 ? 1 : (kPacks >= 4 ? 2 : 4);
};

// ------------------------------------------------------------------------------------------------
// Inputs, and per-point tables of the level each sampling point k (level k / P) samples from.
template <typename scalar_t>
struct Inputs {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* value;
  const acc_t* loc;
  const acc_t* attn;
  Problem p;
  int64_t token_stride;  // M * D: elements between two tokens of one head
  // Per point k, from its level: size as acc_t and int, element offset of the level's first
  // token, and element offset between two rows of the map.
  const acc_t* width_f;
  const acc_t* height_f;
  const int32_t* width;
  const int32_t* height;
  const int64_t* level_offset;
  const int64_t* row_stride;
};

// x0 of a point that contributes nothing (outside (-1, W) x (-1, H), or NaN).
constexpr int32_t kOutside = INT32_MIN;

// Phase one for the L * P points of one (query, head), as a structure of arrays.
template <typename acc_t>
struct Points {
  explicit Points(int64_t n) : n(n), reals(static_cast<size_t>(n) * 6), ints(static_cast<size_t>(n) * 2) {}
  int64_t n;
  std::vector<acc_t> reals;  // 4 corner weights (attention * bilinear), lx, ly
  std::vector<int32_t> ints;  // x0 (kOutside for points that contribute nothing), y0
  acc_t* weight(int corner) { return reals.data() + corner * n; }
  acc_t* lx() { return reals.data() + 4 * n; }
  acc_t* ly() { return reals.data() + 5 * n; }
  int32_t* x0() { return ints.data(); }
  int32_t* y0() { return ints.data() + n; }
};

// Pixel position x = loc_x * W - 0.5 (align_corners=False), its cell and weighted bilinear corners.
// A point outside (-1, W) x (-1, H) (or NaN) gets x0 = kOutside and zero weights. Restrict
// parameters and no branches, so that GCC vectorises the loop over points (floor() needs
// -fno-trapping-math).
template <typename acc_t>
MSDA_ALWAYS_INLINE void locate(int64_t n, const acc_t* __restrict loc, const acc_t* __restrict attn,
                               const acc_t* __restrict widths, const acc_t* __restrict heights,
                               acc_t* __restrict w0, acc_t* __restrict w1, acc_t* __restrict w2,
                               acc_t* __restrict w3, acc_t* __restrict lxs, acc_t* __restrict lys,
                               int32_t* __restrict x0s, int32_t* __restrict y0s) {
  for (int64_t k = 0; k < n; ++k) {
    const acc_t wf = widths[k], hf = heights[k];
    const acc_t x = loc[2 * k] * wf - acc_t(0.5);
    const acc_t y = loc[2 * k + 1] * hf - acc_t(0.5);
    const bool valid = (x > acc_t(-1)) & (y > acc_t(-1)) & (x < wf) & (y < hf);
    const acc_t xs = valid ? x : acc_t(0), ys = valid ? y : acc_t(0);
    const acc_t fx = std::floor(xs), fy = std::floor(ys);
    const acc_t lx = xs - fx, ly = ys - fy;
    const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
    const acc_t a = valid ? attn[k] : acc_t(0);
    w0[k] = a * hy * hx;
    w1[k] = a * hy * lx;
    w2[k] = a * ly * hx;
    w3[k] = a * ly * lx;
    lxs[k] = lx;
    lys[k] = ly;
    x0s[k] = valid ? static_cast<int32_t>(fx) : kOutside;
    y0s[k] = static_cast<int32_t>(fy);
  }
}

template <typename scalar_t>
MSDA_ALWAYS_INLINE void locate_points(const Inputs<scalar_t>& in, const acc_type_t<scalar_t>* loc,
                                      const acc_type_t<scalar_t>* attn, Points<acc_type_t<scalar_t>>& pts) {
  locate(pts.n, loc, attn, in.width_f, in.height_f, pts.weight(0), pts.weight(1), pts.weight(2), pts.weight(3),
         pts.lx(), pts.ly(), pts.x0(), pts.y0());
}

// Whether all four corners of the cell at (x0, y0) are on the map (the common case).
MSDA_ALWAYS_INLINE bool interior(int32_t x0, int32_t y0, int32_t width, int32_t height) {
  return static_cast<uint32_t>(x0) < static_cast<uint32_t>(width - 1) &&
         static_cast<uint32_t>(y0) < static_cast<uint32_t>(height - 1);
}

// Whether corner c (0: (y0, x0), 1: (y0, x1), 2: (y1, x0), 3: (y1, x1)) is on the map.
MSDA_ALWAYS_INLINE bool corner_inside(int corner, int32_t x0, int32_t y0, int32_t width, int32_t height) {
  const int32_t x = x0 + (corner & 1), y = y0 + (corner >> 1);
  return x >= 0 && y >= 0 && x < width && y < height;
}

// ------------------------------------------------------------------------------------------------
// Forward: output rows [begin, end) of the flattened (batch, query, head) range.
template <int kD, typename scalar_t>
MSDA_ALWAYS_INLINE void forward_rows(const Inputs<scalar_t>& in, scalar_t* out, int64_t begin, int64_t end) {
  using acc_t = acc_type_t<scalar_t>;
  using L = Layout<kD, acc_t>;
  using P = typename L::P;
  const Problem& p = in.p;
  const int64_t D = kD > 0 ? kD : p.channels;
  const int64_t n_lp = p.levels * p.points;
  Points<acc_t> pts(n_lp);
  typename P::pack partial[L::kSets][L::kPacks];
  std::vector<acc_t> buffer(L::kPacked ? 0 : D);
  int64_t m = begin % p.heads, b = begin / (p.len_q * p.heads);
  int64_t next_image = (b + 1) * p.len_q * p.heads;
  for (int64_t bqm = begin; bqm < end; ++bqm, m = m + 1 == p.heads ? 0 : m + 1) {
    if (bqm == next_image) {
      ++b;
      next_image += p.len_q * p.heads;
    }
    locate_points(in, in.loc + bqm * n_lp * 2, in.attn + bqm * n_lp, pts);
    const scalar_t* value_bm = in.value + (b * p.len_in * p.heads + m) * D;
    if constexpr (L::kPacked) {
#pragma GCC unroll 16
      for (int j = 0; j < L::kSets * L::kPacks; ++j) partial[j / L::kPacks][j % L::kPacks] = typename P::pack{};
    } else {
      std::fill(buffer.begin(), buffer.end(), acc_t(0));
    }
    for (int64_t k = 0; k < n_lp; ++k) {
      const int32_t x0 = pts.x0()[k], y0 = pts.y0()[k];
      if (x0 == kOutside) continue;
      const bool all_inside = interior(x0, y0, in.width[k], in.height[k]);
      const scalar_t* v00 = value_bm + in.level_offset[k] + y0 * in.row_stride[k] + x0 * in.token_stride;
      const int64_t corner_offset[4] = {0, in.token_stride, in.row_stride[k], in.row_stride[k] + in.token_stride};
#pragma GCC unroll 4
      for (int corner = 0; corner < 4; ++corner) {
        if (!all_inside && !corner_inside(corner, x0, y0, in.width[k], in.height[k])) continue;
        const acc_t weight = pts.weight(corner)[k];
        const scalar_t* v = v00 + corner_offset[corner];
        if constexpr (L::kPacked) {
#pragma GCC unroll 16
          for (int j = 0; j < L::kPacks; ++j) partial[corner % L::kSets][j] += weight * P::load(v + j * P::kLanes);
        } else {
          for (int64_t c = 0; c < D; ++c) buffer[c] += weight * static_cast<acc_t>(v[c]);
        }
      }
    }
    scalar_t* o = out + bqm * D;
    if constexpr (L::kPacked) {
#pragma GCC unroll 16
      for (int j = 0; j < L::kPacks; ++j) {
        typename P::pack total = partial[0][j];
#pragma GCC unroll 4
        for (int set = 1; set < L::kSets; ++set) total += partial[set][j];
        P::store(o + j * P::kLanes, total);
      }
    } else {
      for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(buffer[c]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward.
template <typename scalar_t>
struct GradOutputs {
  const scalar_t* grad_out;         // [B, Lq, M, D]
  acc_type_t<scalar_t>* grad_loc;   // [B, Lq, M, L, P, 2]
  acc_type_t<scalar_t>* grad_attn;  // [B, Lq, M, L, P]
};

// Prefetches the cache lines of [ptr, ptr + bytes) (a hint; it never faults).
MSDA_ALWAYS_INLINE void prefetch_rows(const void* ptr, int64_t bytes) {
#if defined(__GNUC__)
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(static_cast<const char*>(ptr) + offset);
#endif
}

// Gradients of the locations and weights of one (query, head): sums[3k..3k+2] hold, for point k,
// <grad_out, d sample / d weight>, <grad_out, d sample / d pixel x> and the same for y.
template <typename acc_t>
MSDA_ALWAYS_INLINE void point_gradients(int64_t n, const acc_t* __restrict attn, const int32_t* __restrict x0s,
                                        const acc_t* __restrict widths, const acc_t* __restrict heights,
                                        const acc_t* __restrict sums, acc_t* __restrict grad_loc,
                                        acc_t* __restrict grad_attn) {
  for (int64_t k = 0; k < n; ++k) {
    const acc_t a = x0s[k] == kOutside ? acc_t(0) : attn[k];
    grad_attn[k] = sums[3 * k];
    // d(pixel x)/d(loc x) = W and d(pixel y)/d(loc y) = H.
    grad_loc[2 * k] = a * widths[k] * sums[3 * k + 1];
    grad_loc[2 * k + 1] = a * heights[k] * sums[3 * k + 2];
  }
}

// The three sums of point_gradients from the four <grad_out, corner value> (scalars or packs).
template <typename T, typename acc_t>
MSDA_ALWAYS_INLINE void corner_combinations(const T* dot, acc_t lx, acc_t ly, T& grad_weight, T& grad_x, T& grad_y) {
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  grad_weight = hy * (hx * dot[0] + lx * dot[1]) + ly * (hx * dot[2] + lx * dot[3]);
  grad_x = hy * (dot[1] - dot[0]) + ly * (dot[3] - dot[2]);
  grad_y = hx * (dot[2] - dot[0]) + lx * (dot[3] - dot[1]);
}

// Queries [q_begin, q_end) of head m in image b. grad_value is laid out like value and only its
// (b, :, m, :) slice is written, so tasks with distinct (b, m) never collide.
template <int kD, typename scalar_t>
MSDA_ALWAYS_INLINE void backward_queries(const Inputs<scalar_t>& in, const GradOutputs<scalar_t>& go,
                                         acc_type_t<scalar_t>* grad_value, int64_t b, int64_t m,
                                         int64_t q_begin, int64_t q_end) {
  using acc_t = acc_type_t<scalar_t>;
  using L = Layout<kD, acc_t>;
  using P = typename L::P;
  using pack = typename P::pack;
  const Problem& p = in.p;
  const int64_t D = kD > 0 ? kD : p.channels;
  const int64_t n_lp = p.levels * p.points;
  Points<acc_t> pts(n_lp);
  std::vector<acc_t> sums(static_cast<size_t>(n_lp) * 3);
  pack g[L::kPacks];
  std::vector<acc_t> g_buffer(L::kPacked ? 0 : D);
  const int64_t bm_offset = (b * p.len_in * p.heads + m) * D;
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t bqm = (b * p.len_q + q) * p.heads + m;
    const acc_t* attn = in.attn + bqm * n_lp;
    const scalar_t* grad_out = go.grad_out + bqm * D;
    // One head of consecutive queries is M rows apart: fetch the rows two queries ahead.
    if (q + 2 < q_end) {
      const int64_t ahead = bqm + 2 * p.heads;
      prefetch_rows(in.loc + ahead * n_lp * 2, n_lp * 2 * sizeof(acc_t));
      prefetch_rows(in.attn + ahead * n_lp, n_lp * sizeof(acc_t));
      prefetch_rows(go.grad_out + ahead * D, D * sizeof(scalar_t));
    }
    locate_points(in, in.loc + bqm * n_lp * 2, attn, pts);
    if constexpr (L::kPacked) {
#pragma GCC unroll 16
      for (int j = 0; j < L::kPacks; ++j) g[j] = P::load(grad_out + j * P::kLanes);
    } else {
      for (int64_t c = 0; c < D; ++c) g_buffer[c] = static_cast<acc_t>(grad_out[c]);
    }
    std::fill(sums.begin(), sums.end(), acc_t(0));
    for (int64_t k = 0; k < n_lp; ++k) {
      const int32_t x0 = pts.x0()[k], y0 = pts.y0()[k];
      if (x0 == kOutside) continue;
      const bool all_inside = interior(x0, y0, in.width[k], in.height[k]);
      const int64_t offset00 = bm_offset + in.level_offset[k] + y0 * in.row_stride[k] + x0 * in.token_stride;
      const int64_t corner_offset[4] = {0, in.token_stride, in.row_stride[k], in.row_stride[k] + in.token_stride};
      // <grad_out, corner value>: per lane in packs (reduced once per point, after combining
      // the corners), or scalars.
      std::conditional_t<L::kPacked, pack, acc_t> dot[4] = {};
#pragma GCC unroll 4
      for (int corner = 0; corner < 4; ++corner) {
        if (!all_inside && !corner_inside(corner, x0, y0, in.width[k], in.height[k])) continue;
        const scalar_t* v = in.value + offset00 + corner_offset[corner];
        acc_t* gv = grad_value + offset00 + corner_offset[corner];
        const acc_t weight = pts.weight(corner)[k];
        if constexpr (L::kPacked) {
#pragma GCC unroll 16
          for (int j = 0; j < L::kPacks; ++j) {
            dot[corner] += g[j] * P::load(v + j * P::kLanes);
            P::store(gv + j * P::kLanes, P::load(gv + j * P::kLanes) + weight * g[j]);
          }
        } else {
          for (int64_t c = 0; c < D; ++c) {
            dot[corner] += g_buffer[c] * static_cast<acc_t>(v[c]);
            gv[c] += weight * g_buffer[c];
          }
        }
      }
      std::conditional_t<L::kPacked, pack, acc_t> grad_weight, grad_x, grad_y;
      corner_combinations(dot, pts.lx()[k], pts.ly()[k], grad_weight, grad_x, grad_y);
      if constexpr (L::kPacked) {
        sums[3 * k] = P::sum(grad_weight);
        sums[3 * k + 1] = P::sum(grad_x);
        sums[3 * k + 2] = P::sum(grad_y);
      } else {
        sums[3 * k] = grad_weight;
        sums[3 * k + 1] = grad_x;
        sums[3 * k + 2] = grad_y;
      }
    }
    point_gradients(n_lp, attn, pts.x0(), in.width_f, in.height_f, sums.data(), go.grad_loc + bqm * n_lp * 2,
                    go.grad_attn + bqm * n_lp);
  }
}

// ------------------------------------------------------------------------------------------------
// The kernels instantiated for one ISA level (cpu_isa.h picks the widest the CPU has).
#define MSDA_DEFINE_KERNELS(SUFFIX, TARGET)                                                            \
  template <int kD, typename scalar_t>                                                                 \
  TARGET void forward_rows_##SUFFIX(const Inputs<scalar_t>& in, scalar_t* out, int64_t begin,         \
                                    int64_t end) {                                                     \
    forward_rows<kD>(in, out, begin, end);                                                             \
  }                                                                                                    \
  template <int kD, typename scalar_t>                                                                 \
  TARGET void backward_queries_##SUFFIX(const Inputs<scalar_t>& in, const GradOutputs<scalar_t>& go,  \
                                        acc_type_t<scalar_t>* grad_value, int64_t b, int64_t m,        \
                                        int64_t q_begin, int64_t q_end) {                              \
    backward_queries<kD>(in, go, grad_value, b, m, q_begin, q_end);                                    \
  }

MSDA_DEFINE_KERNELS(generic, )
#ifdef MSDA_X86_DISPATCH
MSDA_DEFINE_KERNELS(avx2, MSDA_TARGET_AVX2)
#endif
#undef MSDA_DEFINE_KERNELS

template <int kD, typename scalar_t>
void forward_rows_best(const Inputs<scalar_t>& in, scalar_t* out, int64_t begin, int64_t end) {
#ifdef MSDA_X86_DISPATCH
  if (cpu_isa() == CpuIsa::kAvx2) return forward_rows_avx2<kD>(in, out, begin, end);
#endif
  forward_rows_generic<kD>(in, out, begin, end);
}

template <int kD, typename scalar_t>
void backward_queries_best(const Inputs<scalar_t>& in, const GradOutputs<scalar_t>& go,
                           acc_type_t<scalar_t>* grad_value, int64_t b, int64_t m, int64_t q_begin,
                           int64_t q_end) {
#ifdef MSDA_X86_DISPATCH
  if (cpu_isa() == CpuIsa::kAvx2) return backward_queries_avx2<kD>(in, go, grad_value, b, m, q_begin, q_end);
#endif
  backward_queries_generic<kD>(in, go, grad_value, b, m, q_begin, q_end);
}

// Calls fn.template operator()<kD>() with kD fixed for the common head dims, 0 otherwise.
template <typename Fn>
void dispatch_head_dim(int64_t channels, const Fn& fn) {
  switch (channels) {
    case 16: return fn(std::integral_constant<int, 16>());
    case 32: return fn(std::integral_constant<int, 32>());
    case 64: return fn(std::integral_constant<int, 64>());
    default: return fn(std::integral_constant<int, 0>());
  }
}

// Items per chunk of work, so that a chunk holds at least kMinSamples sampling points: starting
// threads costs more than a small problem (gradcheck-sized calls stay on one thread).
int64_t grain_size(int64_t samples_per_item) {
  constexpr int64_t kMinSamples = 4096;
  return std::max<int64_t>(1, kMinSamples / std::max<int64_t>(1, samples_per_item));
}

// fn(begin, end) over [0, n) in chunks of `chunk` items, on torch's intra-op threads with a dynamic
// schedule: threads take the next chunk from a shared counter, so a thread that is slowed down
// (uneven work, or a busy machine) does fewer chunks instead of holding the others at the barrier.
template <typename Fn>
void parallel_chunks(int64_t n, int64_t chunk, const Fn& fn) {
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n_chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < n_chunks; c = next++) fn(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// The levels must lie inside the value tensor (cheap here: the shapes are host memory).
void check_levels(const at::Tensor& shapes, const at::Tensor& starts, const Problem& p) {
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  for (int64_t l = 0; l < p.levels; ++l) {
    TORCH_CHECK(hw[2 * l] >= 0 && hw[2 * l + 1] >= 0 && hw[2 * l] < (1 << 30) && hw[2 * l + 1] < (1 << 30) &&
                    start[l] >= 0 &&
                    start[l] + hw[2 * l] * hw[2 * l + 1] <= p.len_in,
                "ms_deform_attn: level ", l, " (H=", hw[2 * l], ", W=", hw[2 * l + 1], ", start=", start[l],
                ") does not fit in the ", p.len_in, " value tokens");
  }
}

Problem check_cpu_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  const Problem p = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn (CPU kernel): tensors must be on the CPU, got ",
              value.device());
  return p;
}

// Per-point level tables (a few hundred bytes) behind the Inputs of one call.
template <typename scalar_t>
struct LevelTables {
  using acc_t = acc_type_t<scalar_t>;
  std::vector<acc_t> width_f, height_f;
  std::vector<int32_t> width, height;
  std::vector<int64_t> level_offset, row_stride;

  LevelTables(const at::Tensor& shapes, const at::Tensor& starts, const Problem& p) {
    const int64_t* hw = shapes.data_ptr<int64_t>();
    const int64_t* start = starts.data_ptr<int64_t>();
    const int64_t token_stride = p.heads * p.channels;
    for (int64_t k = 0; k < p.levels * p.points; ++k) {
      const int64_t l = k / p.points;
      width_f.push_back(static_cast<acc_t>(hw[2 * l + 1]));
      height_f.push_back(static_cast<acc_t>(hw[2 * l]));
      width.push_back(static_cast<int32_t>(hw[2 * l + 1]));
      height.push_back(static_cast<int32_t>(hw[2 * l]));
      level_offset.push_back(start[l] * token_stride);
      row_stride.push_back(hw[2 * l + 1] * token_stride);
    }
  }

  Inputs<scalar_t> inputs(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
                          const Problem& p) const {
    return Inputs<scalar_t>{value.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), p,
                            p.heads * p.channels, width_f.data(), height_f.data(), width.data(), height.data(),
                            level_offset.data(), row_stride.data()};
  }
};

at::Tensor forward_cpu(const at::Tensor& value_in, const at::Tensor& shapes_in, const at::Tensor& starts_in,
                       const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const Problem p = check_cpu_inputs(value_in, shapes_in, starts_in, loc_in, attn_in);
  const at::Tensor value = value_in.contiguous(), shapes = shapes_in.contiguous(), starts = starts_in.contiguous();
  const at::Tensor loc = loc_in.contiguous(), attn = attn_in.contiguous();
  check_levels(shapes, starts, p);
  at::Tensor output = at::empty({p.batch, p.len_q, p.heads * p.channels}, value.options());
  const int64_t rows = p.batch * p.heads * p.len_q;
  if (rows == 0 || p.channels == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const LevelTables<scalar_t> tables(shapes, starts, p);
    const Inputs<scalar_t> in = tables.inputs(value, loc, attn, p);
    scalar_t* out = output.data_ptr<scalar_t>();
    dispatch_head_dim(p.channels, [&](auto head_dim) {
      constexpr int kD = decltype(head_dim)::value;
      parallel_chunks(rows, grain_size(p.levels * p.points), [&](int64_t begin, int64_t end) {
        forward_rows_best<kD>(in, out, begin, end);
      });
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output_in,
                                                            const at::Tensor& value_in, const at::Tensor& shapes_in,
                                                            const at::Tensor& starts_in, const at::Tensor& loc_in,
                                                            const at::Tensor& attn_in) {
  const Problem p = check_cpu_inputs(value_in, shapes_in, starts_in, loc_in, attn_in);
  TORCH_CHECK(grad_output_in.sizes() == at::IntArrayRef({p.batch, p.len_q, p.heads * p.channels}) &&
                  grad_output_in.scalar_type() == value_in.scalar_type() && grad_output_in.device().is_cpu(),
              "ms_deform_attn backward: grad_output must be a [B, Lq, M * D] CPU tensor of the value dtype");
  const at::Tensor value = value_in.contiguous(), shapes = shapes_in.contiguous(), starts = starts_in.contiguous();
  const at::Tensor loc = loc_in.contiguous(), attn = attn_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();
  check_levels(shapes, starts, p);
  const auto acc_dtype = accumulate_type(value.scalar_type());
  // Accumulated in fp32 (fp64 for fp64 values); converted at the end for fp16/bf16 values.
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  at::Tensor grad_loc = at::empty_like(loc);
  at::Tensor grad_attn = at::empty_like(attn);
  const int64_t slices = p.batch * p.heads;
  if (slices * p.len_q > 0 && p.channels > 0) {
    // Enough (batch, head) slices keep every thread busy on its own slice of grad_value; otherwise
    // split the queries too, the extra splits accumulating into private copies of grad_value.
    const int64_t threads = at::get_num_threads();
    const int64_t splits =
        slices >= threads ? 1 : std::max<int64_t>(1, std::min((threads + slices - 1) / slices, p.len_q / 64));
    at::Tensor partial = splits > 1 ? at::zeros({splits - 1, p.batch, p.len_in, p.heads, p.channels},
                                                grad_value.options())
                                    : at::Tensor();
    const int64_t per_split = (p.len_q + splits - 1) / splits;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using acc_t = acc_type_t<scalar_t>;
      const LevelTables<scalar_t> tables(shapes, starts, p);
      const Inputs<scalar_t> in = tables.inputs(value, loc, attn, p);
      const GradOutputs<scalar_t> go{grad_output.data_ptr<scalar_t>(), grad_loc.data_ptr<acc_t>(),
                                     grad_attn.data_ptr<acc_t>()};
      acc_t* main_buffer = grad_value.data_ptr<acc_t>();
      acc_t* extra_buffers = splits > 1 ? partial.data_ptr<acc_t>() : nullptr;
      const int64_t buffer_numel = grad_value.numel();
      const int64_t grain = grain_size(per_split * p.levels * p.points);
      dispatch_head_dim(p.channels, [&](auto head_dim) {
        constexpr int kD = decltype(head_dim)::value;
        parallel_chunks(slices * splits, grain, [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) {
            const int64_t split = task % splits, b = task / splits / p.heads, m = task / splits % p.heads;
            acc_t* buffer = split == 0 ? main_buffer : extra_buffers + (split - 1) * buffer_numel;
            const int64_t q_begin = split * per_split, q_end = std::min(p.len_q, q_begin + per_split);
            backward_queries_best<kD>(in, go, buffer, b, m, q_begin, q_end);
          }
        });
      });
    });
    if (splits > 1) grad_value.add_(partial.sum(0));
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  if (grad_value.scalar_type() != value.scalar_type()) grad_value = grad_value.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(detr_msda, CPU, m) {
  m.impl("ms_deform_attn", &forward_cpu);
  m.impl("ms_deform_attn_backward", &backward_cpu);
}

}  // namespace detr_msda
