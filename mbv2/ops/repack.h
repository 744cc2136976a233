// Between NCHW and the batch-folded rows layout of the ops that run a 1x1 conv as one GEMM
// (mbv2_pointwise_rows in pointwise_conv.cc, mbv2_small_unit in small_unit.cc):
// rows[n*P + p][c] = x[n][c][p], P = H*W.
#pragma once

#include <cstdint>

namespace mbv2 {

// PF, when not 0, is P as a template argument, and the channel loop is innermost:
// unit-stride on the rows side and a constant stride on the other, which GCC vectorises
// (the P-inner loop cost 1.5x the GEMM of the rows op's layers). Threads split the images.
template <int64_t PF, bool kPack>
void RepackLoop(const float* src, int64_t n, int64_t c, int64_t P_any, float* dst) {
  const int64_t P = PF != 0 ? PF : P_any;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* si = src + i * c * P;
    float* di = dst + i * c * P;
    for (int64_t p = 0; p < P; ++p)
      for (int64_t ch = 0; ch < c; ++ch) {
        if (kPack)
          di[p * c + ch] = si[ch * P + p];
        else
          di[ch * P + p] = si[p * c + ch];
      }
  }
}

// x (N x C x P) to rows (kPack), or rows back to x.
template <bool kPack>
void Repack(const float* src, int64_t n, int64_t c, int64_t P, float* dst) {
  switch (P) {
    case 2: RepackLoop<2, kPack>(src, n, c, P, dst); break;
    case 3: RepackLoop<3, kPack>(src, n, c, P, dst); break;
    case 4: RepackLoop<4, kPack>(src, n, c, P, dst); break;
    default: RepackLoop<0, kPack>(src, n, c, P, dst);
  }
}

}  // namespace mbv2
