// MobileNetV2 inference as one Paddle custom operator, mbv2_infer_net: the whole network
// (stem, inverted residual units, last 1x1 conv, average pool, classifier), batch norms
// folded into the convs, float32 (or, with `bf16`, bfloat16 products in the 1x1 convs on
// CPUs with AVX512-BF16, on AMX tiles where the CPU has them), on the MKL that Paddle
// ships (without it this file registers nothing and mbv2.predict keeps Paddle Inference).
// Built into the same library as the training ops; mbv2/ops/inference.py packs the
// weights, from a network or from the program mbv2.export writes.
//
// Paddle Inference (oneDNN) runs the exported program layer by layer, each activation of
// the batch written to memory and read back by the next layer; on the AVX2 EPYC of round
// 25 its depthwise convs ran at 9-37 GFLOP/s and its 1x1 convs on 28x28-112x112 maps at
// 41-100 (x1.0, 224 px, batch 32: 251 ms a batch, two thirds of it those layers). Here:
// * the batch is cut into groups of images (one image at 224 px, enough images for ~4096
//   stem pixels at 32 px) and a thread runs its group through the whole network,
//   activations channels-last (NHWC): a 1x1 conv is a plain row-major GEMM and the
//   depthwise conv reads whole channel vectors;
// * within a unit, the expand conv, the depthwise conv and the projection run a band of
//   rows at a time where the expanded map is large (the group's whole maps where it is
//   small): the band's expanded rows come from one GEMM, are read by the depthwise conv
//   while in L2, and its output goes straight into the projection's GEMM; the rows two
//   bands share stay in the band buffer;
// * bias + ReLU6 or the shortcut are added to each output block while in cache; products
//   with a thin side (16-32 channels: the large-map layers) run a register-tiled kernel
//   here that adds them as it stores (MKL ran those at under half the CPU's peak), the
//   others MKL's GEMM on weights packed once per weight tensor (cblas_sgemm_pack);
// * groups go to threads in chunks (work_chunks.h); a group's results do not depend on
//   which thread ran it, and the classifier runs once over the batch's pooled features.
// Same machine, same exported model: 1.1-1.7x Paddle Inference's img/s (README, Speed).
//
// Inputs: X (N, 3, H, W) float32, NCHW as the exported model takes it; Weights, the folded
// parameters in the order Spec describes. Attributes: spec (the layer table), key (one per
// weight tensor: the packed copies are kept by it and the precision), bf16. Output: the
// logits (N, classes).

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

#include "bf16.h"
#include "paddle/extension.h"
#include "work_chunks.h"

#ifdef MBV2_WITH_MKL

#include "mkl_cblas.h"

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kPacked = 151, kBMatrix = 162;

int64_t OutSize(int64_t in, int64_t stride) { return (in - 1) / stride + 1; }  // 3x3, pad 1

// c[m][n] = a[m][k] b[k][n], row-major, on the calling thread.
void Gemm(const float* a, const float* b, float* c, int64_t m, int64_t k, int64_t n) {
  cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), 1.f, a, static_cast<int>(k), b, static_cast<int>(n), 0.f, c,
              static_cast<int>(n));
}

// A weight matrix [k][n] in MKL's packed format (packed for rows_hint rows of A; any row
// count computes correctly), 64-byte aligned.
struct Packed {
  std::vector<float> buf;
  float* data = nullptr;
  const float* raw = nullptr;  // the same matrix, row-major
  int64_t k = 0, n = 0;
  void Pack(const float* w, int64_t k_, int64_t n_, int64_t rows_hint) {
    raw = w, k = k_, n = n_;
    const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, static_cast<int>(rows_hint),
                                                   static_cast<int>(n), static_cast<int>(k));
    buf.resize(bytes / sizeof(float) + 32);
    const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
    data = reinterpret_cast<float*>((p + 63) & ~uintptr_t{63});
    cblas_sgemm_pack(kRowMajor, kBMatrix, kNoTrans, static_cast<int>(rows_hint),
                     static_cast<int>(n), static_cast<int>(k), 1.f, w, static_cast<int>(n), data);
  }
};

// c[m][n] = a[m][k] b, b packed
void GemmPacked(const float* a, const Packed& b, float* c, int64_t m) {
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m), static_cast<int>(b.n),
                      static_cast<int>(b.k), a, static_cast<int>(b.k), b.data,
                      static_cast<int>(b.n), 0.f, c, static_cast<int>(b.n));
}

// ---------------------------------------------------------------------------------------
// bfloat16 products (the op's `bf16` attribute; CPUs with AVX512-BF16): every 1x1 conv
// multiplies bfloat16 rounded activations and weights with float32 sums (vdpbf16ps), the
// depthwise convs, biases, ReLU6 and shortcuts stay float32. An output vector of 16
// channels takes two input channels a step: the weights are packed once as pairs along K
// ([K/2][N'][2], N' = N rounded up to 16, zeros in the padding), the activations rounded
// to bfloat16 a block of rows at a time, so one 32-bit broadcast of a row's channel pair
// meets one load of 16 columns' weight pairs.

using mbv2::Bf16Rne;
using mbv2::HasAvx512Bf16;

// Where the CPU has AMX (Intel's tile unit: a tdpbf16ps multiplies a 16 x 32 bfloat16 tile
// by a 32 x 16 one into 16 x 16 float32 sums, 16 times vdpbf16ps's work an instruction) the
// same packed pairs are its B tiles as they lie: 16 pair rows of 16 columns, K rounded up
// to 32 so every tile is whole. Linux hands a process the tile registers only on request
// (arch_prctl ARCH_REQ_XCOMP_PERM); where it refuses, or MBV2_AMX=off, the vdpbf16ps
// kernels run. Either way the sums are float32 of the same bfloat16 products (in another
// order: the two paths agree to float32 rounding, not bit for bit).
bool AmxUsable() {
  static const bool yes = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
        !HasAvx512Bf16())
      return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
  }();
  return yes;
}

// AMX for the bfloat16 products of networks packed from now on: the CPU and the kernel
// allow it and MBV2_AMX is not "off" (read at packing, so a network packed after a change
// of it follows it).
bool UseAmx() {
  const char* env = std::getenv("MBV2_AMX");
  return !(env != nullptr && std::strcmp(env, "off") == 0) && AmxUsable();
}

// A weight matrix [k][n] as bfloat16 channel pairs.
struct PackedBf16 {
  std::vector<uint16_t> w;
  int64_t k = 0, n = 0, kp = 0, np = 0;  // kp: k rounded up to 2 (32 for AMX), np: n to 16
  bool amx = false;                      // multiplied on AMX tiles
  void Pack(const float* src, int64_t k_, int64_t n_, bool amx_) {
    amx = amx_;
    k = k_, n = n_, kp = (k + (amx ? 31 : 1)) / (amx ? 32 : 2) * (amx ? 32 : 2);
    np = (n + 15) / 16 * 16;
    w.assign(static_cast<size_t>(kp * np), 0);
    for (int64_t r = 0; r < k; ++r)
      for (int64_t j = 0; j < n; ++j)
        w[((r / 2) * np + j) * 2 + (r & 1)] = Bf16Rne(src[r * n + j]);
  }
};

// Spec: [version, stem_channels, stem_stride, units, (c_in, hidden, c_out, stride,
// shortcut) x units, last_channels, classes]. Weights, in that order: stem [27][C] + bias,
// per unit expand [c_in][hidden] + bias, depthwise [9][hidden] + bias, projection
// [hidden][c_out] + bias, last [c][last] + bias, classifier [last][classes] + bias.
constexpr int kSpecVersion = 1;

struct Unit {
  int64_t ci, hid, co, stride;
  bool shortcut;
  const float *we, *be, *wd, *bd, *wp, *bp;
  const Packed *pe = nullptr, *pp = nullptr;  // we, wp in MKL's packed format
  const PackedBf16 *pe16 = nullptr, *pp16 = nullptr;  // as bfloat16 pairs (bf16 runs)
};

struct Net {
  int64_t stem_c, stem_stride, last_c, classes;
  const float *ws, *bs, *wl, *bl, *wf, *bf;
  const Packed* pl = nullptr;
  const PackedBf16* pl16 = nullptr;
  std::vector<Unit> units;
};

// The packed 1x1 weights of one weight tensor (2 a unit, then the last conv), kept across
// calls: packing is a pass over all the weights (14 MB at x1.0), which small batches would
// otherwise pay every call. NetworkInference gives each weight tensor its own key.
struct PackedNet {
  int64_t key = 0;
  const float* weights = nullptr;
  bool bf16 = false, amx = false;
  std::vector<Packed> mats;         // FP32 runs
  std::vector<PackedBf16> mats16;   // bf16 runs, the same order
};

std::shared_ptr<const PackedNet> PackedFor(int64_t key, const float* weights, const Net& net,
                                           bool bf16) {
  const bool amx = bf16 && UseAmx();
  static std::mutex mu;
  static std::list<std::shared_ptr<const PackedNet>> cache;  // most recent first
  constexpr size_t kKept = 4;
  std::lock_guard<std::mutex> lock(mu);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if ((*it)->key == key && (*it)->weights == weights && (*it)->bf16 == bf16 &&
        (*it)->amx == amx) {
      auto hit = *it;
      cache.erase(it);
      cache.push_front(hit);
      return hit;
    }
  }
  auto packed = std::make_shared<PackedNet>();
  packed->key = key, packed->weights = weights, packed->bf16 = bf16, packed->amx = amx;
  const size_t count = 2 * net.units.size() + 1;
  (bf16 ? packed->mats16.resize(count) : packed->mats.resize(count));
  // matrix i, [k][n], in the run's format (MKL's packing: for rows_hint rows of A)
  auto pack = [&](size_t i, const float* w, int64_t k, int64_t n, int64_t rows_hint) {
    if (bf16)
      packed->mats16[i].Pack(w, k, n, amx);
    else
      packed->mats[i].Pack(w, k, n, rows_hint);
  };
  for (size_t i = 0; i < net.units.size(); ++i) {
    const Unit& u = net.units[i];
    pack(2 * i, u.we, u.ci, u.hid, 256);
    pack(2 * i + 1, u.wp, u.hid, u.co, 256);
  }
  pack(count - 1, net.wl, net.units.back().co, net.last_c, 64);
  cache.push_front(packed);
  if (cache.size() > kKept) cache.pop_back();
  return packed;
}

int64_t ExpectedWeights(const std::vector<int>& spec) {
  PD_CHECK(spec.size() >= 6 && spec[0] == kSpecVersion,
           "mbv2_infer_net: the weight spec is not of this library's version; rebuild it "
           "(mbv2.ops.inference.pack_network)");
  const int64_t units = spec[3];
  PD_CHECK(units >= 1 && static_cast<int64_t>(spec.size()) == 6 + 5 * units,
           "mbv2_infer_net: the spec's length does not match its unit count");
  int64_t c = spec[1], total = 27 * c + c;
  for (int64_t u = 0; u < units; ++u) {
    const int* p = &spec[4 + 5 * u];
    PD_CHECK(p[0] == c && p[1] >= 1 && p[2] >= 1 && (p[3] == 1 || p[3] == 2),
             "mbv2_infer_net: unit ", u, " does not follow the one before it");
    total += p[0] * p[1] + p[1] + 9 * p[1] + p[1] + p[1] * p[2] + p[2];
    c = p[2];
  }
  const int64_t last = spec[4 + 5 * units], classes = spec[5 + 5 * units];
  return total + c * last + last + last * classes + classes;
}

Net Unpack(const std::vector<int>& spec, const float* w) {
  Net net;
  net.stem_c = spec[1];
  net.stem_stride = spec[2];
  const int64_t units = spec[3];
  auto take = [&w](int64_t n) {
    const float* p = w;
    w += n;
    return p;
  };
  net.ws = take(27 * net.stem_c);
  net.bs = take(net.stem_c);
  for (int64_t u = 0; u < units; ++u) {
    const int* p = &spec[4 + 5 * u];
    Unit t;
    t.ci = p[0], t.hid = p[1], t.co = p[2], t.stride = p[3], t.shortcut = p[4] != 0;
    t.we = take(t.ci * t.hid), t.be = take(t.hid);
    t.wd = take(9 * t.hid), t.bd = take(t.hid);
    t.wp = take(t.hid * t.co), t.bp = take(t.co);
    net.units.push_back(t);
  }
  net.last_c = spec[4 + 5 * units];
  net.classes = spec[5 + 5 * units];
  const int64_t c = net.units.back().co;
  net.wl = take(c * net.last_c), net.bl = take(net.last_c);
  net.wf = take(net.last_c * net.classes), net.bf = take(net.classes);
  return net;
}

// y[r][j] = min(max(y[r][j] + b[j], 0), 6)
void BiasRelu6(float* y, int64_t rows, int64_t n, const float* b) {
  for (int64_t r = 0; r < rows; ++r, y += n) {
    int64_t j = 0;
#ifdef __AVX2__
    const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(y + j), _mm256_loadu_ps(b + j));
      _mm256_storeu_ps(y + j, _mm256_min_ps(_mm256_max_ps(v, zero), six));
    }
#endif
    for (; j < n; ++j) y[j] = std::min(std::max(y[j] + b[j], 0.f), 6.f);
  }
}

// y[r][j] += b[j] (+ res[r][j])
void BiasAdd(float* y, int64_t rows, int64_t n, const float* b, const float* res) {
  for (int64_t r = 0; r < rows; ++r, y += n) {
    int64_t j = 0;
#ifdef __AVX2__
    for (; j + 8 <= n; j += 8) {
      __m256 v = _mm256_add_ps(_mm256_loadu_ps(y + j), _mm256_loadu_ps(b + j));
      if (res != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(res + j));
      _mm256_storeu_ps(y + j, v);
    }
#endif
    for (; j < n; ++j) y[j] += b[j] + (res != nullptr ? res[j] : 0.f);
    if (res != nullptr) res += n;
  }
}

// Products with one side thin (C_in or C_out up to kThin, the large-map layers' 16-32
// channels): MKL's kernels ran them at under half this CPU's peak. Here a register tile of
// R rows x V vectors of C accumulates over K (one broadcast of A and V loads of B a step)
// and leaves with the bias and ReLU6 or the shortcut added, the output written once.
constexpr int64_t kThin = 32;

enum Epilogue { kRelu6, kLinear };

#ifdef __AVX2__
template <int R, int V, int E>
inline __attribute__((always_inline)) void Tile(const float* a, int64_t lda, const float* b,
                                                int64_t ldb, int64_t k, const float* bias,
                                                float* c, int64_t ldc, const float* res) {
  // Fully unrolled, so the accumulators live in registers.
  __m256 acc[R][V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    const __m256 bv = _mm256_loadu_ps(bias + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][v] = bv;
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    __m256 bv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) bv[v] = _mm256_loadu_ps(b + kk * ldb + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + kk);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      __m256 y = acc[r][v];
      if (E == kRelu6) y = _mm256_min_ps(_mm256_max_ps(y, zero), six);
      if (E == kLinear && res != nullptr)
        y = _mm256_add_ps(y, _mm256_loadu_ps(res + r * ldc + 8 * v));
      _mm256_storeu_ps(c + r * ldc + 8 * v, y);
    }
}

// Rows of a through Tile<R, V>, the last few one row at a time; b, c and res have rows of
// ld floats.
template <int R, int V, int E>
void TileRowsStrided(const float* a, int64_t m, int64_t k, const float* b, int64_t ld,
                     const float* bias, float* c, const float* res, int64_t ldc) {
  int64_t i = 0;
  for (; i + R <= m; i += R)
    Tile<R, V, E>(a + i * k, k, b, ld, k, bias, c + i * ldc, ldc, res ? res + i * ldc : nullptr);
  for (; i < m; ++i)
    Tile<1, V, E>(a + i * k, k, b, ld, k, bias, c + i * ldc, ldc, res ? res + i * ldc : nullptr);
}

// The same tile in 16-lane vectors where the CPU has AVX-512: 32 vector registers hold a
// 12-row x 32-column tile (twice the columns of a step and twice the rows AVX2's 16 hold),
// `mask` the columns of the last vector that are inside the matrix. On Intel cores two
// 512-bit FMAs issue a cycle, as two 256-bit ones do: the product's instructions halve.
#define MBV2_AVX512_TARGET __attribute__((target("avx512f")))

template <int R, int V, int E>
MBV2_AVX512_TARGET inline __attribute__((always_inline)) void Tile16(
    const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k, const float* bias,
    float* c, int64_t ldc, const float* res, __mmask16 mask) {
  __m512 acc[R][V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    const __m512 bv = _mm512_maskz_loadu_ps(v == V - 1 ? mask : 0xffff, bias + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][v] = bv;
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      bv[v] = _mm512_maskz_loadu_ps(v == V - 1 ? mask : 0xffff, b + kk * ldb + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + kk]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.f);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __mmask16 m = v == V - 1 ? mask : 0xffff;
      __m512 y = acc[r][v];
      if (E == kRelu6) y = _mm512_min_ps(_mm512_max_ps(y, zero), six);
      if (E == kLinear && res != nullptr)
        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, res + r * ldc + 16 * v));
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, m, y);
    }
}

template <int R, int V, int E>
MBV2_AVX512_TARGET void Tile16Rows(const float* a, int64_t m, int64_t k, const float* b,
                                   int64_t ld, const float* bias, float* c, const float* res,
                                   __mmask16 mask) {
  int64_t i = 0;
  for (; i + R <= m; i += R)
    Tile16<R, V, E>(a + i * k, k, b, ld, k, bias, c + i * ld, ld, res ? res + i * ld : nullptr,
                    mask);
  for (; i + 4 <= m; i += 4)
    Tile16<4, V, E>(a + i * k, k, b, ld, k, bias, c + i * ld, ld, res ? res + i * ld : nullptr,
                    mask);
  for (; i < m; ++i)
    Tile16<1, V, E>(a + i * k, k, b, ld, k, bias, c + i * ld, ld, res ? res + i * ld : nullptr,
                    mask);
}

// ThinGemm in 16-lane vectors: column blocks of 32 (12 rows a tile), then one of 16 or 8.
template <int E>
MBV2_AVX512_TARGET void ThinGemm16(const float* a, int64_t m, int64_t k, const float* b,
                                   int64_t n, const float* bias, float* c, const float* res) {
  for (int64_t j = 0; j < n;) {
    const int64_t left = n - j;
    const float* rj = res ? res + j : nullptr;
    if (left >= 32) {
      Tile16Rows<12, 2, E>(a, m, k, b + j, n, bias + j, c + j, rj, 0xffff);
      j += 32;
    } else {
      const __mmask16 mask = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
      Tile16Rows<12, 1, E>(a, m, k, b + j, n, bias + j, c + j, rj, mask);
      j += std::min<int64_t>(left, 16);
    }
  }
}

bool HasAvx512() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"));
  return yes;
}

// c[m][n] = epilogue(a[m][k] b[k][n] + bias (+ res)), n a multiple of 8; column blocks of
// 16 (6 rows a tile) or 24 (4 rows), 8 for the rest; ThinGemm16 where the CPU has AVX-512
// (MBV2_INFER_AVX512=off: these AVX2 tiles).
// 16-lane kernels (the thin products and the depthwise conv) where the CPU has AVX-512,
// unless MBV2_INFER_AVX512=off (read once a process); else 8-lane AVX2 ones. Both give the
// same bits.
bool Wide16() {
  static const bool wide = [] {
    const char* env = std::getenv("MBV2_INFER_AVX512");
    return HasAvx512() && !(env != nullptr && std::strcmp(env, "off") == 0);
  }();
  return wide;
}

template <int E>
void ThinGemm(const float* a, int64_t m, int64_t k, const float* b, int64_t n,
              const float* bias, float* c, const float* res) {
  if (Wide16()) {
    ThinGemm16<E>(a, m, k, b, n, bias, c, res);
    return;
  }
  for (int64_t j = 0; j < n;) {
    const int64_t left = n - j;
    const float* rj = res ? res + j : nullptr;
    // columns j.. of b, c and res: offsets with the full row strides
    if (left % 16 == 0) {
      TileRowsStrided<6, 2, E>(a, m, k, b + j, n, bias + j, c + j, rj, n);
      j += 16;
    } else if (left >= 24) {
      TileRowsStrided<4, 3, E>(a, m, k, b + j, n, bias + j, c + j, rj, n);
      j += 24;
    } else {
      TileRowsStrided<6, 1, E>(a, m, k, b + j, n, bias + j, c + j, rj, n);
      j += 8;
    }
  }
}
#endif

// out[m][n] = epilogue(a[m][k] w + bias (+ res[m][n])): E = kRelu6 for an expand conv (or
// the last conv), kLinear for a projection, res its shortcut or null.
template <int E>
void PointwiseRows(const float* a, int64_t m, const Packed& w, const float* bias,
                   const float* res, float* out) {
#ifdef __AVX2__
  if ((w.k <= kThin || w.n <= kThin) && w.n % 8 == 0) {
    ThinGemm<E>(a, m, w.k, w.raw, w.n, bias, out, res);
    return;
  }
#endif
  GemmPacked(a, w, out, m);
  if (E == kRelu6)
    BiasRelu6(out, m, w.n, bias);
  else
    BiasAdd(out, m, w.n, bias, res);
}

// The bfloat16 products' kernels (see PackedBf16).
#define MBV2_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// dst[r][0..kp) = bf16(src[r][0..k)), zero past k.
MBV2_BF16_TARGET void RowsToBf16(const float* src, int64_t rows, int64_t k, int64_t kp,
                                 uint16_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    mbv2::RowToBf16Avx512(src + r * k, k, dst + r * kp);
    for (int64_t j = k; j < kp; ++j) dst[r * kp + j] = 0;
  }
}

// R rows x V vectors of 16 columns: c = epilogue(a b + bias (+ res)); `mask`: the columns
// of the last vector inside the matrix.
template <int R, int V, int E>
MBV2_BF16_TARGET inline __attribute__((always_inline)) void TileBf16(
    const uint16_t* a, int64_t lda, const uint16_t* b, int64_t np, int64_t pairs,
    const float* bias, float* c, int64_t ldc, const float* res, __mmask16 mask) {
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    const __m512 bv = _mm512_maskz_loadu_ps(v == V - 1 ? mask : 0xffff, bias + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][v] = bv;
  }
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
      bv[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + (p * np + 16 * v) * 2));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, 4);
      const __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.f);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const __mmask16 m = v == V - 1 ? mask : 0xffff;
      __m512 y = acc[r][v];
      if (E == kRelu6) y = _mm512_min_ps(_mm512_max_ps(y, zero), six);
      if (E == kLinear && res != nullptr)
        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, res + r * ldc + 16 * v));
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, m, y);
    }
}

template <int R, int V, int E>
MBV2_BF16_TARGET void TileRowsBf16(const uint16_t* a, int64_t m, int64_t kp, const uint16_t* b,
                                   int64_t np, const float* bias, float* c, int64_t ldc,
                                   const float* res, __mmask16 mask) {
  const int64_t pairs = kp / 2;
  int64_t i = 0;
  for (; i + R <= m; i += R)
    TileBf16<R, V, E>(a + i * kp, kp, b, np, pairs, bias, c + i * ldc, ldc,
                      res ? res + i * ldc : nullptr, mask);
  for (; i < m; ++i)
    TileBf16<1, V, E>(a + i * kp, kp, b, np, pairs, bias, c + i * ldc, ldc,
                      res ? res + i * ldc : nullptr, mask);
}

// out[m][n] = epilogue(a[m][k] w + bias (+ res)) with bfloat16 products, a block of rows
// at a time (rounded into `scratch`), 64 columns a pass where there are.
template <int E>
MBV2_BF16_TARGET void PointwiseRowsBf16(const float* a, int64_t m, const PackedBf16& w,
                                        const float* bias, const float* res, float* out,
                                        std::vector<uint16_t>& scratch) {
  // rows a block: their bfloat16 copy ~32 KiB, within L1/L2 while every column block reads it
  const int64_t block = std::max<int64_t>(12, (16384 / w.kp) / 12 * 12);
  if (static_cast<int64_t>(scratch.size()) < block * w.kp) scratch.resize(block * w.kp);
  for (int64_t i0 = 0; i0 < m; i0 += block) {
    const int64_t rows = std::min(block, m - i0);
    RowsToBf16(a + i0 * w.k, rows, w.k, w.kp, scratch.data());
    const float* ri = res ? res + i0 * w.n : nullptr;
    float* oi = out + i0 * w.n;
    for (int64_t j = 0; j < w.n;) {
      // up to 4 vectors of 16 columns; the last one's columns inside the matrix
      const int64_t vecs = std::min<int64_t>(4, (w.n - j + 15) / 16);
      const int64_t tail = w.n - j - 16 * (vecs - 1);
      const __mmask16 mask = tail >= 16 ? 0xffff : static_cast<__mmask16>((1u << tail) - 1);
      const uint16_t* a16 = scratch.data();
      const uint16_t* bj = w.w.data() + j * 2;
      const float* rj = ri ? ri + j : nullptr;
      const float* bias_j = bias + j;
      float* oj = oi + j;
      switch (vecs) {
        case 4: TileRowsBf16<6, 4, E>(a16, rows, w.kp, bj, w.np, bias_j, oj, w.n, rj, mask); break;
        case 3: TileRowsBf16<8, 3, E>(a16, rows, w.kp, bj, w.np, bias_j, oj, w.n, rj, mask); break;
        case 2: TileRowsBf16<12, 2, E>(a16, rows, w.kp, bj, w.np, bias_j, oj, w.n, rj, mask); break;
        default: TileRowsBf16<12, 1, E>(a16, rows, w.kp, bj, w.np, bias_j, oj, w.n, rj, mask);
      }
      j += 16 * vecs;
    }
  }
}

// The AMX kernel (see AmxUsable). Eight tiles of 16 rows x 64 bytes: 0-3 the sums of a
// 32 x 32 output block, 4-5 its two 16-row slices of A, 6-7 its two 16-column slices of B.
#define MBV2_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// out[rows][cols] (row stride ldo) = epilogue(c[rows][cols] (row stride 32) + bias (+ res)).
template <int E>
MBV2_BF16_TARGET void AmxEpilogue(const float* c, int64_t rows, int64_t cols, const float* bias,
                                  const float* res, float* out, int64_t ldo) {
  const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.f);
  for (int64_t v = 0; v < cols; v += 16) {
    const __mmask16 m = cols - v >= 16 ? 0xffff : static_cast<__mmask16>((1u << (cols - v)) - 1);
    const __m512 b = _mm512_maskz_loadu_ps(m, bias + v);
    for (int64_t r = 0; r < rows; ++r) {
      __m512 y = _mm512_add_ps(_mm512_load_ps(c + r * 32 + v), b);
      if (E == kRelu6) y = _mm512_min_ps(_mm512_max_ps(y, zero), six);
      if (E == kLinear && res != nullptr)
        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, res + r * ldo + v));
      _mm512_mask_storeu_ps(out + r * ldo + v, m, y);
    }
  }
}

// PointwiseRowsBf16 on AMX tiles: a block of rows rounded to bfloat16 (rows a multiple of
// 32 in the scratch; those past the matrix are left as they are: their sums are dropped),
// then 32 x 32 output blocks, each summed over K in tiles, stored to a block in L1 and
// finished (bias, ReLU6 or the shortcut) into out.
template <int E>
MBV2_AMX_TARGET void PointwiseRowsAmx(const float* a, int64_t m, const PackedBf16& w,
                                      const float* bias, const float* res, float* out,
                                      std::vector<uint16_t>& scratch) {
  // the tile registers' shapes: set on every call (another library on this thread may have
  // configured them otherwise)
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  const int64_t kp = w.kp, lda = kp * 2, ldb = w.np * 4, ksteps = kp / 32;
  const int64_t block = std::max<int64_t>(32, (16384 / kp) / 32 * 32);
  if (static_cast<int64_t>(scratch.size()) < block * kp) scratch.resize(block * kp);
  alignas(64) float c[32 * 32];
  for (int64_t i0 = 0; i0 < m; i0 += block) {
    const int64_t rows = std::min(block, m - i0);
    RowsToBf16(a + i0 * w.k, rows, w.k, kp, scratch.data());
    for (int64_t j = 0; j < w.n; j += 32) {
      const bool two_cols = j + 16 < w.n;
      const int64_t cols = std::min<int64_t>(32, w.n - j);
      const uint16_t* bj = w.w.data() + j * 2;
      for (int64_t r = 0; r < rows; r += 32) {
        const bool two_rows = r + 16 < rows;
        const uint16_t* ar = scratch.data() + r * kp;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t q = 0; q < ksteps; ++q) {
          const uint16_t* aq = ar + q * 32;
          const uint16_t* bq = bj + q * 16 * w.np * 2;
          _tile_loadd(4, aq, lda);
          _tile_loadd(6, bq, ldb);
          _tile_dpbf16ps(0, 4, 6);
          if (two_cols) {
            _tile_loadd(7, bq + 32, ldb);
            _tile_dpbf16ps(1, 4, 7);
          }
          if (two_rows) {
            _tile_loadd(5, aq + 16 * kp, lda);
            _tile_dpbf16ps(2, 5, 6);
            if (two_cols) _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, c, 128);
        if (two_cols) _tile_stored(1, c + 16, 128);
        if (two_rows) _tile_stored(2, c + 16 * 32, 128);
        if (two_rows && two_cols) _tile_stored(3, c + 16 * 32 + 16, 128);
        const int64_t o = (i0 + r) * w.n + j;
        AmxEpilogue<E>(c, std::min<int64_t>(32, rows - r), cols, bias + j,
                       res ? res + o : nullptr, out + o, w.n);
      }
    }
  }
}

// The 1x1 conv of a unit or the last conv: bfloat16 products where the op runs in bf16.
template <int E>
void Conv1x1(const float* a, int64_t m, const Packed* w, const PackedBf16* w16,
             const float* bias, const float* res, float* out, std::vector<uint16_t>& scratch) {
  if (w16 != nullptr && w16->amx)
    PointwiseRowsAmx<E>(a, m, *w16, bias, res, out, scratch);
  else if (w16 != nullptr)
    PointwiseRowsBf16<E>(a, m, *w16, bias, res, out, scratch);
  else
    PointwiseRows<E>(a, m, *w, bias, res, out);
}

// Depthwise 3x3, pad 1, stride s, bias + ReLU6, channels-last, output rows [r0, r1) of one
// image into out ([r1 - r0][wo][c]). e holds input rows [e_first, ...) of that image, each
// [w][c]; rows and columns outside the image are the zero padding. A block of 8 channels
// at a time keeps its 9 weights in registers and sweeps its rows (their lines stay in L1
// from one output row to the next), four output pixels at once inside the image.
// DepthwiseRows's 16-lane blocks where the CPU has AVX-512 (Wide16): one output pixel of
// channels [j, j + 16), any position, the taps inside the image.
MBV2_AVX512_TARGET inline __attribute__((always_inline)) void DepthwiseEdge16(
    const float* e, int64_t e_first, int64_t h, int64_t w, int64_t c, int64_t s,
    const __m512* wv, __m512 bias, int64_t ro, int64_t x, float* o) {
  __m512 acc = bias;
#pragma GCC unroll 3
  for (int ky = 0; ky < 3; ++ky) {
    const int64_t iy = ro * s - 1 + ky;
    if (iy < 0 || iy >= h) continue;
    const float* row = e + (iy - e_first) * w * c;
#pragma GCC unroll 3
    for (int kx = 0; kx < 3; ++kx) {
      const int64_t ix = x * s - 1 + kx;
      if (ix < 0 || ix >= w) continue;
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(row + ix * c), wv[ky * 3 + kx], acc);
    }
  }
  _mm512_storeu_ps(o, _mm512_min_ps(_mm512_max_ps(acc, _mm512_setzero_ps()), _mm512_set1_ps(6.f)));
}

// Channels [0, 16 * (c / 16)) of DepthwiseRows in 16-lane vectors, the same sums in the same
// order (so the same bits as its 8-lane blocks); at stride 1 four neighbouring outputs
// share the six input columns of a row, loaded once. Returns the channels done.
MBV2_AVX512_TARGET int64_t DepthwiseRows16(const float* e, int64_t e_first, int64_t h,
                                           int64_t w, int64_t c, int64_t s, const float* wd,
                                           const float* bd, int64_t r0, int64_t r1,
                                           int64_t wo, float* out) {
  const int64_t x_lo = 1, x_hi = std::max<int64_t>(x_lo, std::min(wo, (w - 2) / s + 1));
  const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.f);
  int64_t j = 0;
  for (; j + 16 <= c; j += 16) {
    __m512 wv[9];
    for (int t = 0; t < 9; ++t) wv[t] = _mm512_loadu_ps(wd + t * c + j);
    const __m512 bias = _mm512_loadu_ps(bd + j);
    const float* ej = e + j;
    for (int64_t ro = r0; ro < r1; ++ro) {
      float* o = out + (ro - r0) * wo * c + j;
      if (ro * s - 1 < 0 || ro * s + 1 >= h) {
        for (int64_t x = 0; x < wo; ++x)
          DepthwiseEdge16(ej, e_first, h, w, c, s, wv, bias, ro, x, o + x * c);
        continue;
      }
      const float* top = ej + (ro * s - 1 - e_first) * w * c;
      const int64_t rs = w * c;
      for (int64_t x = 0; x < std::min(x_lo, wo); ++x)
        DepthwiseEdge16(ej, e_first, h, w, c, s, wv, bias, ro, x, o + x * c);
      int64_t x = x_lo;
      for (; x + 4 <= x_hi; x += 4) {
        __m512 a0 = bias, a1 = bias, a2 = bias, a3 = bias;
        const float* p = top + (x * s - 1) * c;
        if (s == 1) {
#pragma GCC unroll 3
          for (int ky = 0; ky < 3; ++ky) {
            const float* q = p + ky * rs;
            __m512 in[6];
#pragma GCC unroll 6
            for (int i = 0; i < 6; ++i) in[i] = _mm512_loadu_ps(q + i * c);
#pragma GCC unroll 3
            for (int kx = 0; kx < 3; ++kx) {
              const __m512 wt = wv[ky * 3 + kx];
              a0 = _mm512_fmadd_ps(in[kx], wt, a0);
              a1 = _mm512_fmadd_ps(in[kx + 1], wt, a1);
              a2 = _mm512_fmadd_ps(in[kx + 2], wt, a2);
              a3 = _mm512_fmadd_ps(in[kx + 3], wt, a3);
            }
          }
        } else {
          const int64_t step = s * c;
#pragma GCC unroll 3
          for (int ky = 0; ky < 3; ++ky) {
            const float* q = p + ky * rs;
#pragma GCC unroll 3
            for (int kx = 0; kx < 3; ++kx) {
              const __m512 wt = wv[ky * 3 + kx];
              a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + kx * c), wt, a0);
              a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + kx * c + step), wt, a1);
              a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q + kx * c + 2 * step), wt, a2);
              a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q + kx * c + 3 * step), wt, a3);
            }
          }
        }
        _mm512_storeu_ps(o + x * c, _mm512_min_ps(_mm512_max_ps(a0, zero), six));
        _mm512_storeu_ps(o + (x + 1) * c, _mm512_min_ps(_mm512_max_ps(a1, zero), six));
        _mm512_storeu_ps(o + (x + 2) * c, _mm512_min_ps(_mm512_max_ps(a2, zero), six));
        _mm512_storeu_ps(o + (x + 3) * c, _mm512_min_ps(_mm512_max_ps(a3, zero), six));
      }
      for (; x < wo; ++x) DepthwiseEdge16(ej, e_first, h, w, c, s, wv, bias, ro, x, o + x * c);
    }
  }
  return j;
}

void DepthwiseRows(const float* e, int64_t e_first, int64_t h, int64_t w, int64_t c,
                   int64_t s, const float* wd, const float* bd, int64_t r0, int64_t r1,
                   int64_t wo, float* out) {
  // output columns whose three input columns are inside the image
  const int64_t x_lo = 1, x_hi = std::max<int64_t>(x_lo, std::min(wo, (w - 2) / s + 1));
  int64_t j = 0;
#ifdef __AVX2__
  if (Wide16()) j = DepthwiseRows16(e, e_first, h, w, c, s, wd, bd, r0, r1, wo, out);
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
  for (; j + 8 <= c; j += 8) {
    __m256 wv[9];
    for (int t = 0; t < 9; ++t) wv[t] = _mm256_loadu_ps(wd + t * c + j);
    const __m256 bias = _mm256_loadu_ps(bd + j);
    // one output pixel, any position: the taps inside the image
    auto edge = [&](int64_t ro, int64_t x) {
      __m256 acc = bias;
#pragma GCC unroll 3
      for (int ky = 0; ky < 3; ++ky) {
        const int64_t iy = ro * s - 1 + ky;
        if (iy < 0 || iy >= h) continue;
        const float* row = e + (iy - e_first) * w * c + j;
#pragma GCC unroll 3
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t ix = x * s - 1 + kx;
          if (ix < 0 || ix >= w) continue;
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(row + ix * c), wv[ky * 3 + kx], acc);
        }
      }
      _mm256_storeu_ps(out + ((ro - r0) * wo + x) * c + j,
                       _mm256_min_ps(_mm256_max_ps(acc, zero), six));
    };
    for (int64_t ro = r0; ro < r1; ++ro) {
      if (ro * s - 1 < 0 || ro * s + 1 >= h) {
        for (int64_t x = 0; x < wo; ++x) edge(ro, x);
        continue;
      }
      const float* top = e + (ro * s - 1 - e_first) * w * c + j;
      const int64_t rs = w * c;
      float* o = out + (ro - r0) * wo * c + j;
      for (int64_t x = 0; x < std::min(x_lo, wo); ++x) edge(ro, x);
      int64_t x = x_lo;
      for (; x + 4 <= x_hi; x += 4) {
        __m256 a0 = bias, a1 = bias, a2 = bias, a3 = bias;
        const float* p = top + (x * s - 1) * c;
        const int64_t step = s * c;
#pragma GCC unroll 3
        for (int ky = 0; ky < 3; ++ky) {
          const float* q = p + ky * rs;
#pragma GCC unroll 3
          for (int kx = 0; kx < 3; ++kx) {
            const __m256 wt = wv[ky * 3 + kx];
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + kx * c), wt, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + kx * c + step), wt, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + kx * c + 2 * step), wt, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + kx * c + 3 * step), wt, a3);
          }
        }
        _mm256_storeu_ps(o + x * c, _mm256_min_ps(_mm256_max_ps(a0, zero), six));
        _mm256_storeu_ps(o + (x + 1) * c, _mm256_min_ps(_mm256_max_ps(a1, zero), six));
        _mm256_storeu_ps(o + (x + 2) * c, _mm256_min_ps(_mm256_max_ps(a2, zero), six));
        _mm256_storeu_ps(o + (x + 3) * c, _mm256_min_ps(_mm256_max_ps(a3, zero), six));
      }
      for (; x < wo; ++x) edge(ro, x);
    }
  }
#endif
  for (; j < c; ++j) {
    for (int64_t ro = r0; ro < r1; ++ro)
      for (int64_t x = 0; x < wo; ++x) {
        float acc = bd[j];
        for (int ky = 0; ky < 3; ++ky) {
          const int64_t iy = ro * s - 1 + ky;
          if (iy < 0 || iy >= h) continue;
          for (int kx = 0; kx < 3; ++kx) {
            const int64_t ix = x * s - 1 + kx;
            if (ix < 0 || ix >= w) continue;
            acc += e[((iy - e_first) * w + ix) * c + j] * wd[(ky * 3 + kx) * c + j];
          }
        }
        out[((ro - r0) * wo + x) * c + j] = std::min(std::max(acc, 0.f), 6.f);
      }
  }
}

// Bytes a unit's expanded band may take: the band's expand output and its depthwise
// output stay in L2 between the three steps (192 KiB; 96-768 measured level at 224 px).
// MBV2_INFER_BAND_KB sets it (tests make every unit run in bands of one row).
int64_t BandBytes() {
  const char* v = std::getenv("MBV2_INFER_BAND_KB");
  const int64_t kb = v != nullptr ? std::atoll(v) : 0;
  return (kb > 0 ? kb : 192) * 1024;
}

// The per-thread buffers of one group's pass; grown as needed, kept across groups.
struct Scratch {
  std::vector<float> a, b, e, d;
  std::vector<uint16_t> rows16;  // a block of a product's input rows in bfloat16
  static float* Fit(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }
};

// Stem: 3x3, stride s, pad 1, 3 -> C, bias + ReLU6, of image x (3, h, w; NCHW) into y
// (ho, wo, C): an output pixel's 27 inputs (k = (ci, ky, kx)) broadcast against the
// weights' rows ([27][C]), channels in vectors, two pixels at a time sharing the weight
// loads.
void StemPixels(const Net& net, const float* v0, const float* v1, float* o0, float* o1) {
  const int64_t c = net.stem_c;
  const float* ws = net.ws;
  int64_t j = 0;
#ifdef __AVX2__
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
  for (; j + 32 <= c; j += 32) {
    __m256 a[8];
    for (int q = 0; q < 4; ++q) a[q] = a[q + 4] = _mm256_loadu_ps(net.bs + j + 8 * q);
    for (int k = 0; k < 27; ++k) {
      const __m256 b0 = _mm256_broadcast_ss(v0 + k), b1 = _mm256_broadcast_ss(v1 + k);
      const float* q = ws + k * c + j;
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m256 wv = _mm256_loadu_ps(q + 8 * r);
        a[r] = _mm256_fmadd_ps(b0, wv, a[r]);
        a[r + 4] = _mm256_fmadd_ps(b1, wv, a[r + 4]);
      }
    }
    for (int r = 0; r < 4; ++r) {
      _mm256_storeu_ps(o0 + j + 8 * r, _mm256_min_ps(_mm256_max_ps(a[r], zero), six));
      _mm256_storeu_ps(o1 + j + 8 * r, _mm256_min_ps(_mm256_max_ps(a[r + 4], zero), six));
    }
  }
  for (; j + 8 <= c; j += 8) {
    __m256 a0 = _mm256_loadu_ps(net.bs + j), a1 = a0;
    for (int k = 0; k < 27; ++k) {
      const __m256 wv = _mm256_loadu_ps(ws + k * c + j);
      a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(v0 + k), wv, a0);
      a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(v1 + k), wv, a1);
    }
    _mm256_storeu_ps(o0 + j, _mm256_min_ps(_mm256_max_ps(a0, zero), six));
    _mm256_storeu_ps(o1 + j, _mm256_min_ps(_mm256_max_ps(a1, zero), six));
  }
#endif
  for (; j < c; ++j) {
    float a0 = net.bs[j], a1 = net.bs[j];
    for (int k = 0; k < 27; ++k) a0 += v0[k] * ws[k * c + j], a1 += v1[k] * ws[k * c + j];
    o0[j] = std::min(std::max(a0, 0.f), 6.f);
    o1[j] = std::min(std::max(a1, 0.f), 6.f);
  }
}

void Stem(const Net& net, const float* x, int64_t h, int64_t w, float* y) {
  const int64_t s = net.stem_stride, c = net.stem_c;
  const int64_t ho = OutSize(h, s), wo = OutSize(w, s);
  const int64_t plane = h * w;
  alignas(32) float v[2][27];
  for (int64_t ro = 0; ro < ho; ++ro) {
    const bool rows_inside = ro * s - 1 >= 0 && ro * s + 1 < h;
    for (int64_t xo = 0; xo < wo; xo += 2) {
      const int64_t pixels = std::min<int64_t>(2, wo - xo);
      for (int64_t p = 0; p < pixels; ++p) {
        const int64_t x0 = (xo + p) * s - 1;
        float* vp = v[p];
        if (rows_inside && x0 >= 0 && x0 + 2 < w) {
          const float* base = x + (ro * s - 1) * w + x0;
#pragma GCC unroll 3
          for (int ci = 0; ci < 3; ++ci)
#pragma GCC unroll 3
            for (int ky = 0; ky < 3; ++ky) {
              const float* r = base + ci * plane + ky * w;
              vp[(ci * 3 + ky) * 3] = r[0], vp[(ci * 3 + ky) * 3 + 1] = r[1],
                                   vp[(ci * 3 + ky) * 3 + 2] = r[2];
            }
        } else {
          for (int ci = 0; ci < 3; ++ci)
            for (int ky = 0; ky < 3; ++ky) {
              const int64_t iy = ro * s - 1 + ky;
              for (int kx = 0; kx < 3; ++kx) {
                const int64_t ix = x0 + kx;
                vp[(ci * 3 + ky) * 3 + kx] =
                    (iy >= 0 && iy < h && ix >= 0 && ix < w) ? x[ci * plane + iy * w + ix] : 0.f;
              }
            }
        }
      }
      float* o0 = y + (ro * wo + xo) * c;
      if (pixels == 2) {
        StemPixels(net, v[0], v[1], o0, o0 + c);
      } else {
        alignas(32) float spare[256];
        if (c <= 256) {
          StemPixels(net, v[0], v[0], o0, spare);
        } else {
          std::vector<float> tmp(c);
          StemPixels(net, v[0], v[0], o0, tmp.data());
        }
      }
    }
  }
}

// One unit over g images: x (g, h, w, ci) -> y (g, ho, wo, co).
void RunUnit(const Unit& u, const float* x, int64_t g, int64_t h, int64_t w, float* y,
             int64_t band_bytes, Scratch& sc) {
  const int64_t s = u.stride, ho = OutSize(h, s), wo = OutSize(w, s);
  const int64_t row_bytes = w * u.hid * 4;
  if (g * h * row_bytes <= 2 * band_bytes) {
    // Small maps: the group's whole maps in one GEMM each.
    float* e = Scratch::Fit(sc.e, g * h * w * u.hid);
    float* d = Scratch::Fit(sc.d, g * ho * wo * u.hid);
    Conv1x1<kRelu6>(x, g * h * w, u.pe, u.pe16, u.be, nullptr, e, sc.rows16);
    for (int64_t i = 0; i < g; ++i)
      DepthwiseRows(e + i * h * w * u.hid, 0, h, w, u.hid, s, u.wd, u.bd, 0, ho, wo,
                    d + i * ho * wo * u.hid);
    Conv1x1<kLinear>(d, g * ho * wo, u.pp, u.pp16, u.bp, u.shortcut ? x : nullptr, y,
                     sc.rows16);
    return;
  }
  // Bands of output rows: rows_in input rows a band of `band` output rows needs.
  const int64_t fit = std::max<int64_t>(3, band_bytes / row_bytes);
  const int64_t band = std::max<int64_t>(1, (fit - 3) / s + 1);
  const int64_t rows_in = (band - 1) * s + 3;
  float* e = Scratch::Fit(sc.e, rows_in * w * u.hid);
  float* d = Scratch::Fit(sc.d, band * wo * u.hid);
  for (int64_t i = 0; i < g; ++i) {
    const float* xi = x + i * h * w * u.ci;
    float* yi = y + i * ho * wo * u.co;
    int64_t e_first = 0, e_end = 0;  // input rows [e_first, e_end) are in e
    for (int64_t r0 = 0; r0 < ho; r0 += band) {
      const int64_t r1 = std::min(ho, r0 + band);
      const int64_t lo = std::max<int64_t>(0, r0 * s - 1);
      const int64_t hi = std::min(h, (r1 - 1) * s + 2);
      int64_t have = 0;
      if (e_end > lo && lo >= e_first) {
        have = e_end - lo;
        std::memmove(e, e + (lo - e_first) * w * u.hid, have * w * u.hid * sizeof(float));
      }
      e_first = lo;
      if (hi > lo + have) {
        float* fresh = e + have * w * u.hid;
        Conv1x1<kRelu6>(xi + (lo + have) * w * u.ci, (hi - lo - have) * w, u.pe, u.pe16, u.be,
                        nullptr, fresh, sc.rows16);
      }
      e_end = hi;
      DepthwiseRows(e, e_first, h, w, u.hid, s, u.wd, u.bd, r0, r1, wo, d);
      float* out = yi + r0 * wo * u.co;
      const float* res = u.shortcut ? xi + r0 * wo * u.co : nullptr;
      Conv1x1<kLinear>(d, (r1 - r0) * wo, u.pp, u.pp16, u.bp, res, out, sc.rows16);
    }
  }
}

// Images [n0, n0 + g) of x through the network up to the pooled features (rows n0.. of
// features).
void RunGroup(const Net& net, const float* x, int64_t n0, int64_t g, int64_t h, int64_t w,
              float* features, Scratch& sc, int64_t max_floats, int64_t band_bytes) {
  float* a = Scratch::Fit(sc.a, g * max_floats);
  float* b = Scratch::Fit(sc.b, g * max_floats);
  int64_t hh = OutSize(h, net.stem_stride), ww = OutSize(w, net.stem_stride);
  for (int64_t i = 0; i < g; ++i)
    Stem(net, x + (n0 + i) * 3 * h * w, h, w, a + i * hh * ww * net.stem_c);
  for (const Unit& u : net.units) {
    RunUnit(u, a, g, hh, ww, b, band_bytes, sc);
    hh = OutSize(hh, u.stride), ww = OutSize(ww, u.stride);
    std::swap(a, b);
  }
  // last 1x1 conv + ReLU6, the average over the plane, the classifier
  const int64_t hw = hh * ww;
  Conv1x1<kRelu6>(a, g * hw, net.pl, net.pl16, net.bl, nullptr, b, sc.rows16);
  float* pooled = features + n0 * net.last_c;
  for (int64_t i = 0; i < g; ++i) {
    float* p = pooled + i * net.last_c;
    std::fill(p, p + net.last_c, 0.f);
    for (int64_t q = 0; q < hw; ++q) {
      const float* f = b + (i * hw + q) * net.last_c;
      for (int64_t j = 0; j < net.last_c; ++j) p[j] += f[j];
    }
    for (int64_t j = 0; j < net.last_c; ++j) p[j] *= 1.f / static_cast<float>(hw);
  }
}

// Images a group: enough that the stem's output has ~4096 pixels (small images share their
// GEMMs and weight reads), no more than a thread's share of the batch.
int64_t GroupSize(int64_t n, int64_t pixels, int threads) {
  const int64_t share = (n + threads - 1) / threads;
  return std::clamp<int64_t>(4096 / std::max<int64_t>(pixels, 1), 1, std::max<int64_t>(share, 1));
}

std::vector<paddle::Tensor> InferNetForward(const paddle::Tensor& x,
                                            const paddle::Tensor& weights,
                                            const std::vector<int>& spec, int64_t key,
                                            bool bf16) {
  PD_CHECK(x.is_cpu() && weights.is_cpu(), "mbv2_infer_net: CPU tensors only");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && weights.dtype() == paddle::DataType::FLOAT32,
           "mbv2_infer_net: float32 only");
  const auto xs = x.shape();
  PD_CHECK(xs.size() == 4 && xs[1] == 3, "mbv2_infer_net: X must be (N, 3, H, W)");
  PD_CHECK(weights.numel() == ExpectedWeights(spec),
           "mbv2_infer_net: the packed weights do not match the spec");
  PD_CHECK(!bf16 || HasAvx512Bf16(),
           "mbv2_infer_net: bf16 needs a CPU with AVX512-BF16; run it in FP32 (precision=fp32)");
  Net net = Unpack(spec, weights.data<float>());
  const auto packed = PackedFor(key, weights.data<float>(), net, bf16);
  // matrix i of the run's format; the other format's pointers stay null
  auto f32 = [&](size_t i) { return bf16 ? nullptr : &packed->mats[i]; };
  auto b16 = [&](size_t i) { return bf16 ? &packed->mats16[i] : nullptr; };
  const size_t last = 2 * net.units.size();
  for (size_t i = 0; i < net.units.size(); ++i) {
    Unit& u = net.units[i];
    u.pe = f32(2 * i), u.pp = f32(2 * i + 1), u.pe16 = b16(2 * i), u.pp16 = b16(2 * i + 1);
  }
  net.pl = f32(last), net.pl16 = b16(last);
  const int64_t n = xs[0], h = xs[2], w = xs[3];
  auto logits = paddle::empty({n, net.classes}, paddle::DataType::FLOAT32, x.place());
  if (n == 0) return {logits};
  // the largest activation of one image, between units
  int64_t hh = OutSize(h, net.stem_stride), ww = OutSize(w, net.stem_stride);
  int64_t max_floats = std::max(hh * ww * net.stem_c, int64_t{1});
  for (const Unit& u : net.units) {
    max_floats = std::max(max_floats, hh * ww * u.ci);
    hh = OutSize(hh, u.stride), ww = OutSize(ww, u.stride);
    max_floats = std::max(max_floats, hh * ww * u.co);
  }
  max_floats = std::max(max_floats, hh * ww * net.last_c);
  const int threads = omp_get_max_threads();
  const int64_t stem_pixels = OutSize(h, net.stem_stride) * OutSize(w, net.stem_stride);
  const int64_t g = GroupSize(n, stem_pixels, threads);
  const int64_t groups = (n + g - 1) / g;
  const float* xp = x.data<float>();
  float* lp = logits.data<float>();
  std::vector<float> features(n * net.last_c);
  const int64_t band_bytes = BandBytes();
  mbv2::WorkChunks work(groups, groups, threads);
#pragma omp parallel num_threads(threads)
  {
    const int prev = MKL_Set_Num_Threads_Local(1);
    static thread_local Scratch sc;
    mbv2::ForEachChunk(work, [&](int64_t, int64_t first, int64_t end) {
      for (int64_t k = first; k < end; ++k) {
        const int64_t n0 = k * g;
        RunGroup(net, xp, n0, std::min(g, n - n0), h, w, features.data(), sc, max_floats,
                 band_bytes);
      }
    });
    MKL_Set_Num_Threads_Local(prev);
  }
  // the classifier, all images in one product (its weights read once)
  Gemm(features.data(), net.wf, lp, n, net.last_c, net.classes);
  BiasAdd(lp, n, net.classes, net.bf, nullptr);
  return {logits};
}

std::vector<std::vector<int64_t>> InferNetShape(const std::vector<int64_t>& x,
                                                const std::vector<int64_t>&,
                                                const std::vector<int>& spec, int64_t, bool) {
  return {{x[0], spec.empty() ? -1 : static_cast<int64_t>(spec.back())}};
}

std::vector<paddle::DataType> InferNetDtype(const paddle::DataType& x, const paddle::DataType&) {
  return {x};
}

}  // namespace

// Whether bf16 runs of the op multiply on AMX tiles in this process (for the log).
extern "C" int mbv2_infer_net_amx() { return UseAmx() ? 1 : 0; }
// The vector width of the thin products and the depthwise conv in this process: 16
// (AVX-512), 8 (AVX2) or 0.
extern "C" int mbv2_infer_net_lanes() {
#ifdef __AVX2__
  return Wide16() ? 16 : 8;
#else
  return 0;
#endif
}

PD_BUILD_OP(mbv2_infer_net)
    .Inputs({"X", "Weights"})
    .Outputs({"Logits"})
    .Attrs({"spec: std::vector<int>", "key: int64_t", "bf16: bool"})
    .SetKernelFn(PD_KERNEL(InferNetForward))
    .SetInferShapeFn(PD_INFER_SHAPE(InferNetShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(InferNetDtype));

#endif  // MBV2_WITH_MKL
