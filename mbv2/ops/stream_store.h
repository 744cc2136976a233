// Non-temporal ("streaming") stores for op outputs larger than the cache, shared by the
// ops' sources.
//
// An op that reads an activation and writes one of the same size finds neither in cache
// when the two exceed the last-level cache, and neither does the next op; a normal store
// then first reads each output line from memory (read-for-ownership), a third stream of
// traffic beside the input and the output. Streamed stores skip that read. Measured on
// the 2-core AVX-512 machine of this project (32 MiB L3): an FMA pass over 58 MB
// 2.12 -> 1.77 ms; the batch norm forward at 32x144x56x56 4.3 -> 3.6 ms. Below the
// threshold they lose (the output would still have been in cache: 8 MB pass 0.085 ->
// 0.18 ms).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mbv2 {

// Outputs of at least this many bytes are streamed: half the last-level cache (input and
// output together then overflow it), read from sysfs once; 32 MiB if that is unreadable.
// MBV2_STREAM_BYTES overrides it per call (the tests run both paths on small tensors).
inline int64_t StreamThresholdBytes() {
  if (const char* e = std::getenv("MBV2_STREAM_BYTES")) return std::atoll(e);
  static const int64_t half_llc = [] {
    long kb = 0;
    if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      if (std::fscanf(f, "%ldK", &kb) != 1) kb = 0;
      std::fclose(f);
    }
    return (kb > 0 ? static_cast<int64_t>(kb) * 1024 : int64_t{32} << 20) / 2;
  }();
  return half_llc;
}

// Whether an output of `floats` float32 values at `p` takes streamed 32-byte stores.
inline bool StreamOutput(int64_t floats, const float* p) {
#if defined(__AVX2__)
  return floats * static_cast<int64_t>(sizeof(float)) >= StreamThresholdBytes() &&
         reinterpret_cast<uintptr_t>(p) % 32 == 0;
#else
  (void)floats;
  (void)p;
  return false;
#endif
}

#if defined(__AVX2__)
// A vector store, streamed when STREAM (p 32-byte aligned). A loop of streamed stores
// ends with _mm_sfence() before other threads may read what it wrote (they are weakly
// ordered).
template <bool STREAM>
inline void Store(float* p, __m256 v) {
  if (STREAM)
    _mm256_stream_ps(p, v);
  else
    _mm256_storeu_ps(p, v);
}
#endif

}  // namespace mbv2
