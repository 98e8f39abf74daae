// Runtime choice of the vector instruction set for the CPU kernels.
//
// The extension is built for the baseline of the machine's compiler (x86-64: SSE2), so that one
// binary runs everywhere. On x86-64 with GCC or Clang the hot loops are compiled once more with a
// function target attribute (AVX2 + FMA) and called when the CPU has it. Only whole functions get
// the attribute; the shared code is always inlined into them, so no out-of-line copy built for a
// wider ISA can be picked up by another caller. (AVX-512 was measured no faster on an AMD EPYC,
// whose units are 256 bits wide, and slower in the backward, so it is not built.)
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define MSDA_X86_DISPATCH 1
#define MSDA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

#if defined(__GNUC__)
#define MSDA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MSDA_ALWAYS_INLINE inline
#endif

namespace detr_msda {

enum class CpuIsa { kGeneric, kAvx2 };

inline CpuIsa detect_cpu_isa() {
#ifdef MSDA_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kGeneric;
}

// The widest instruction set of this CPU (detected once).
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

}  // namespace detr_msda
