// bfloat16 helpers shared by the ops: the CPU check and float32 -> bfloat16 rounding (to
// nearest even, NaN kept a NaN: what AVX512-BF16's vcvtneps2bf16 does).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace mbv2 {

// Whether this CPU has AVX512-BF16 (asked once; __builtin_cpu_init first, as GCC requires
// before the first __builtin_cpu_supports that may run during the library's load).
inline bool HasAvx512Bf16() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16"));
  return yes;
}

inline uint16_t Bf16Rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// dst[0..n) = bf16(src[0..n)), 16 at a time by the CPU's conversion (AVX512-BF16 only).
__attribute__((target("avx512f,avx512bf16"))) inline void RowToBf16Avx512(const float* src,
                                                                          int64_t n,
                                                                          uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<const __m256i&>(v));
  }
  for (; i < n; ++i) dst[i] = Bf16Rne(src[i]);
}

}  // namespace mbv2
