// Just enough of CUDA to run the kernels of models/ops/src/cuda on the CPU, one host thread per
// GPU thread: blocks run one after another, the threads of a block concurrently. Warp intrinsics
// are exchanges through per-warp slots between two barrier phases; a thread that returns drops
// out of its warp's and block's barriers, as an exited GPU thread does. Atomics are std::atomic_ref.
// Slow, and only for checking the kernels' indexing and reductions on machines without a GPU.
#pragma once

#define MSDA_CUDA_EMULATION 1

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emulation {

struct Warp {
  explicit Warp(int threads) : barrier(threads) {}
  std::barrier<> barrier;
  std::array<double, 32> slots{};
};

struct Block {
  Block(unsigned threads, size_t shared_bytes) : barrier(threads), shared(shared_bytes + 16) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>(32));
  }
  std::barrier<> barrier;
  std::vector<unsigned char> shared;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* block = nullptr;
inline thread_local Warp* warp = nullptr;
inline thread_local unsigned lane = 0;

// Runs kernel(args...) for every thread of the grid (1-D grids and blocks, blocks a multiple of 32).
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block_dim, size_t shared_bytes, Kernel kernel, Args... args);

}  // namespace cuda_emulation

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline unsigned char* dynamic_shared_memory() { return cuda_emulation::block->shared.data(); }

inline void __syncthreads() { cuda_emulation::block->barrier.arrive_and_wait(); }

inline unsigned __ballot_sync(unsigned mask, bool predicate) {
  auto* w = cuda_emulation::warp;
  w->slots[cuda_emulation::lane] = predicate ? 1.0 : 0.0;
  w->barrier.arrive_and_wait();
  unsigned ballot = 0;
  for (unsigned l = 0; l < 32; ++l) ballot |= (w->slots[l] != 0.0 ? 1u : 0u) << l;
  w->barrier.arrive_and_wait();
  return ballot & mask;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  auto* w = cuda_emulation::warp;
  const unsigned partner = cuda_emulation::lane ^ static_cast<unsigned>(lane_mask);
  if (!(mask >> cuda_emulation::lane & 1u) || !(mask >> partner & 1u)) std::abort();  // undefined on a GPU
  w->slots[cuda_emulation::lane] = static_cast<double>(value);
  w->barrier.arrive_and_wait();
  const T result = static_cast<T>(w->slots[partner]);
  w->barrier.arrive_and_wait();
  return result;
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

#ifdef MSDA_EMULATE_SM90
// The sm_90 vector atomics (the kernels take that branch when __CUDA_ARCH__ >= 900), with the
// alignment a GPU requires checked.
struct float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline float2 atomicAdd(float2* address, float2 value) {
  if (reinterpret_cast<uintptr_t>(address) % 8 != 0) std::abort();
  float* f = reinterpret_cast<float*>(address);
  return {atomicAdd(f, value.x), atomicAdd(f + 1, value.y)};
}

inline float4 atomicAdd(float4* address, float4 value) {
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0) std::abort();
  float* f = reinterpret_cast<float*>(address);
  return {atomicAdd(f, value.x), atomicAdd(f + 1, value.y), atomicAdd(f + 2, value.z), atomicAdd(f + 3, value.w)};
}
#endif

template <typename Kernel, typename... Args>
void cuda_emulation::launch(dim3 grid, dim3 block_dim, size_t shared_bytes, Kernel kernel, Args... args) {
  if (block_dim.x % 32 != 0) std::abort();
  for (unsigned b = 0; b < grid.x; ++b) {
    Block current(block_dim.x, shared_bytes);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block_dim.x; ++t) {
      threads.emplace_back([&, t] {
        block = &current;
        warp = current.warps[t / 32].get();
        lane = t % 32;
        threadIdx = dim3(t);
        blockIdx = dim3(b);
        blockDim = block_dim;
        gridDim = grid;
        kernel(args...);
        warp->barrier.arrive_and_drop();
        current.barrier.arrive_and_drop();
      });
    }
    for (auto& thread : threads) thread.join();
  }
}
