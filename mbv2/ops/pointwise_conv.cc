// 1x1 convolutions (NCHW, float32, CPU, no bias) and the network's stem as Paddle custom
// operators, built into the same library as the depthwise conv, on the MKL that Paddle
// ships (libmklml_intel.so; without it this file registers nothing and Python keeps
// Paddle's conv2d and matmul): mbv2_pointwise_conv2d (maps over 2x2, described here),
// mbv2_pointwise_rows (maps up to 2x2) and mbv2_stem_conv2d (further down).
//
// Paddle's conv2d runs a 1x1 convolution per image: y[n] = W x[n], a GEMM with K = C_in.
// MobileNetV2's 1x1 layers on 28x28 to 112x112 maps have thin weights (16-32 channels on
// one side), so their backward is a stream over x, dy and dx with little arithmetic a
// byte; Paddle's makes separate passes for dx and dw. Here the plane is cut into blocks of
// kBlock pixels, and threads take (image, block) items: for each block
//   dx[n][:, blk] = W^T dy[n][:, blk]           (GEMM C_in x len x C_out)
//   dw_k         += dy[n][:, blk] x[n][:, blk]^T (GEMM C_out x C_in x len)
// while the block of dy is in cache for both, the items in chunks (work_chunks.h) with dw
// partial sums per chunk k reduced at the end (deterministic for a fixed thread count;
// fewer chunks where dw is large, its partial sums being a pass over memory). The forward
// is the same per-block GEMM, y[n][:, blk] = W x[n][:, blk]. MKL runs single-threaded
// inside the OpenMP region (one thread a block), its per-thread setting restored after.
//
// The weight gradient of a block is a product whose inner dimension (the pixels) is
// contiguous in both operands, with a small output (C_out x C_in). MKL's kernels for that
// layout ran thin layers far from the machine's peak (144->24 at 56x56, batch 32: 5.7 ms
// for the dw products alone, 0.7 GFLOP). Where the CPU has AVX-512 and the layer is thin
// on a large map (`UseDotKernel`), the dw product is instead a register-tiled dot-product
// kernel: 4 rows of dy x 6 rows of x accumulated as 24 vectors over the block's pixels,
// summed across lanes once per block (that layer's backward 8.5 -> 5.5 ms).

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "batch_norm_act.h"
#include "bf16.h"
#include "repack.h"
#include "stream_store.h"
#include "paddle/extension.h"

#ifdef MBV2_WITH_MKL

#include "mkl_cblas.h"

#ifdef MBV2_WITH_DNNL
extern "C" {
// oneDNN's bfloat16 GEMM (libdnnl.so.3, which Paddle ships): row-major
// C = alpha op(A) op(B) + beta C with bfloat16 A and B, float32 accumulation and C;
// 0 on success. Inside an OpenMP region it runs on the calling thread.
int dnnl_gemm_bf16bf16f32(char transa, char transb, int64_t m, int64_t n, int64_t k,
                          float alpha, const uint16_t* a, int64_t lda, const uint16_t* b,
                          int64_t ldb, float beta, float* c, int64_t ldc);
}
#endif

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Pixels a work item: dy's block (C_out x 1024 floats, 64-576 KB) stays in L2 between the
// two GEMMs. Measured on the shapes below (batch 32, 2 threads): 1024 beat 4096 and whole
// planes by 0-11 %.
constexpr int64_t kBlock = 1024;

struct Shape {
  int64_t n, ci, co, hw;
};

Shape GetShape(const paddle::Tensor& x, const paddle::Tensor& w) {
  const auto xs = x.shape(), ws = w.shape();
  PD_CHECK(xs.size() == 4 && ws.size() == 4 && ws[2] == 1 && ws[3] == 1 && ws[1] == xs[1],
           "pointwise_conv2d: x must be NCHW and weight [C_out, C_in, 1, 1]");
  return {xs[0], xs[1], ws[0], xs[2] * xs[3]};
}

// Calls fn(t, k, n, p0, len) for every (image, block) item, in `chunks` chunks of
// consecutive items (mbv2::WorkChunks: threads that finish early take chunks from the
// other's share; a chunk's items run in order on one thread, so sums kept per chunk k are
// the same whichever thread ran it), MKL single-threaded meanwhile; t is the running
// thread's index (for its scratch).
template <class Fn>
void ForBlocks(const Shape& s, int64_t chunks, Fn fn) {
  const int64_t blocks = (s.hw + kBlock - 1) / kBlock;
  mbv2::WorkChunks work(s.n * blocks, chunks);
#pragma omp parallel
  {
    const int prev = MKL_Set_Num_Threads_Local(1);
    const int t = omp_get_thread_num();
    mbv2::ForEachChunk(work, [&](int64_t k, int64_t first, int64_t end) {
      for (int64_t it = first; it < end; ++it) {
        const int64_t n = it / blocks, p0 = (it % blocks) * kBlock;
        fn(t, k, n, p0, std::min(kBlock, s.hw - p0));
      }
    });
    MKL_Set_Num_Threads_Local(prev);
  }
}

// ForBlocks' chunk count for s when each chunk keeps row_bytes of partial sums.
int64_t BlockChunks(const Shape& s, int64_t row_bytes) {
  return mbv2::ChunkCount(s.n * ((s.hw + kBlock - 1) / kBlock), row_bytes);
}

// acc[r * ldacc + c] += sum_p g[r * ldg + p] * x[c * ldx + p], r < RG, c < RX, p < len:
// RG x RX accumulators of 16 pixels each (masked loads for the tail), one horizontal sum
// each at the end. The accumulators must stay a local array that no call takes the
// address of, or GCC keeps them on the stack.
template <int RG, int RX>
__attribute__((target("avx512f"))) inline void DotTile(const float* g, int64_t ldg,
                                                       const float* x, int64_t ldx, int64_t len,
                                                       float* acc, int64_t ldacc) {
  __m512 a[RG][RX];
  for (int i = 0; i < RG; ++i)
    for (int j = 0; j < RX; ++j) a[i][j] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 16 <= len; p += 16) {
    __m512 gv[RG];
    for (int i = 0; i < RG; ++i) gv[i] = _mm512_loadu_ps(g + i * ldg + p);
    for (int j = 0; j < RX; ++j) {
      const __m512 xv = _mm512_loadu_ps(x + j * ldx + p);
      for (int i = 0; i < RG; ++i) a[i][j] = _mm512_fmadd_ps(gv[i], xv, a[i][j]);
    }
  }
  if (p < len) {
    const __mmask16 m = static_cast<__mmask16>((1u << (len - p)) - 1);
    __m512 gv[RG];
    for (int i = 0; i < RG; ++i) gv[i] = _mm512_maskz_loadu_ps(m, g + i * ldg + p);
    for (int j = 0; j < RX; ++j) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + j * ldx + p);
      for (int i = 0; i < RG; ++i) a[i][j] = _mm512_fmadd_ps(gv[i], xv, a[i][j]);
    }
  }
  for (int i = 0; i < RG; ++i)
    for (int j = 0; j < RX; ++j) acc[i * ldacc + j] += _mm512_reduce_add_ps(a[i][j]);
}

// One band of RG rows of g against all ci rows of x, 6 at a time.
template <int RG>
__attribute__((target("avx512f"))) void DotBand(const float* g, int64_t ldg, const float* x,
                                                int64_t ldx, int64_t ci, int64_t len,
                                                float* acc) {
  int64_t c = 0;
  for (; c + 6 <= ci; c += 6) DotTile<RG, 6>(g, ldg, x + c * ldx, ldx, len, acc + c, ci);
  const float* xr = x + c * ldx;
  float* ar = acc + c;
  switch (ci - c) {
    case 1: DotTile<RG, 1>(g, ldg, xr, ldx, len, ar, ci); break;
    case 2: DotTile<RG, 2>(g, ldg, xr, ldx, len, ar, ci); break;
    case 3: DotTile<RG, 3>(g, ldg, xr, ldx, len, ar, ci); break;
    case 4: DotTile<RG, 4>(g, ldg, xr, ldx, len, ar, ci); break;
    case 5: DotTile<RG, 5>(g, ldg, xr, ldx, len, ar, ci); break;
    default: break;
  }
}

// acc (co x ci, row-major) += g (co x len, row stride ldg) x x^T (x: ci x len, stride ldx).
__attribute__((target("avx512f"))) void DotProducts(const float* g, int64_t ldg, const float* x,
                                                    int64_t ldx, int64_t co, int64_t ci,
                                                    int64_t len, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= co; r += 4) DotBand<4>(g + r * ldg, ldg, x, ldx, ci, len, acc + r * ci);
  const float* gr = g + r * ldg;
  float* ar = acc + r * ci;
  switch (co - r) {
    case 1: DotBand<1>(gr, ldg, x, ldx, ci, len, ar); break;
    case 2: DotBand<2>(gr, ldg, x, ldx, ci, len, ar); break;
    case 3: DotBand<3>(gr, ldg, x, ldx, ci, len, ar); break;
    default: break;
  }
}

// Whether this CPU runs AVX-512F (asked once; __builtin_cpu_init first, as GCC requires
// before the first __builtin_cpu_supports that may run during the library's load).
bool HasAvx512() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"));
  return yes;
}

// The dot-product kernel for dw where it beat MKL (backward in a Paddle process, batch
// 32, 2 threads, the AMD EPYC with AVX-512 of this project's machine, MKL's dx in both):
// maps of 56x56 and up (16->96 at 112x112 20.4 -> 18.2 ms, the stem's 27->32 10.7 -> 8.0,
// 24->144 at 56x56 8.5 -> 7.5, 144->24 at 56x56 8.5 -> 5.5, 32->16 at 112x112 8.4 ->
// 5.6) and projections on 28x28 (144->32 2.0 -> 1.4, 192->32 1.9 -> 1.8). MKL is kept on
// smaller maps and for the 28x28 expansions (32->192 1.45 vs 1.76 ms, 64->384 at 14x14
// 1.3 vs 1.9, measured in C++), where the per-block sums and the load-bound tiles lose
// to its packed kernels. Masked loads on every step instead of a masked tail only made
// the kernel slower than MKL's here.
bool UseDotKernel(const Shape& s) {
  return HasAvx512() && (s.hw >= 56 * 56 || (s.hw >= 28 * 28 && s.co < s.ci));
}

// t, or a contiguous copy of it.
paddle::Tensor Contiguous(const paddle::Tensor& t) {
  return t.is_contiguous() ? t : t.contiguous();
}

void CheckFloat32(const paddle::Tensor& x, const paddle::Tensor& w,
                  const char* op = "pointwise_conv2d") {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32 && w.is_cpu() &&
               w.dtype() == paddle::DataType::FLOAT32,
           op, ": float32 CPU tensors only");
}

// A 1x1 forward's tensors: the inputs checked and made contiguous, y allocated.
struct ForwardIo {
  paddle::Tensor x, w, y;
  ForwardIo(const paddle::Tensor& x_in, const paddle::Tensor& w_in, const Shape& s)
      : x(Contiguous(x_in)), w(Contiguous(w_in)),
        y(paddle::empty({s.n, s.co, x_in.shape()[2], x_in.shape()[3]},
                        paddle::DataType::FLOAT32, paddle::CPUPlace())) {}
};

// A 1x1 backward's tensors: the inputs made contiguous, dx and dw allocated.
struct BackwardIo {
  paddle::Tensor x, w, dy, dx, dw;
  BackwardIo(const paddle::Tensor& x_in, const paddle::Tensor& w_in, const paddle::Tensor& dy_in)
      : x(Contiguous(x_in)), w(Contiguous(w_in)), dy(Contiguous(dy_in)),
        dx(paddle::empty(x_in.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace())),
        dw(paddle::empty(w_in.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace())) {}
};

// dw[i] = sum over chunks k of part[k * size + i], in chunk order: a chunk's row at a time
// into dw, so each sum is a run of vector adds (the same additions in the same order as a
// chunk loop per weight, whose 2-32 dependent adds a weight kept the other thread waiting:
// 6.5 % of its idle samples in a x1.0 224 px step fell here).
void SumPartials(const std::vector<float>& part, int64_t size, float* dw) {
  const size_t rows = part.size() / static_cast<size_t>(std::max<int64_t>(size, 1));
  std::fill(dw, dw + size, 0.f);
  for (size_t k = 0; k < rows; ++k) {
    const float* row = part.data() + k * size;
#pragma omp simd
    for (int64_t i = 0; i < size; ++i) dw[i] += row[i];
  }
}

// ---------------------------------------------------------------------------------------
// bfloat16 products (trainer.amp on CPU): the GEMMs' inputs rounded to bfloat16 (round to
// nearest even, as the AVX512-BF16 conversion does), float32 accumulation and outputs, the
// weights' float32 master copy untouched. One core's product of MobileNetV2's block shapes
// (1024-pixel blocks, this project's AVX512-BF16 EPYC): 1.4-2.1x MKL's SGEMM from 32
// channels up (384x64: 203 -> 105 us), 1.07-1.19x on the 16- and 24-channel inputs.

using mbv2::Bf16Rne;
using mbv2::HasAvx512Bf16;
using mbv2::RowToBf16Avx512;

// dst (rows x cols, contiguous) = src (rows x cols, row stride ld) as bfloat16.
void ToBf16(const float* src, int64_t rows, int64_t cols, int64_t ld, uint16_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    if (HasAvx512Bf16()) {
      RowToBf16Avx512(src + r * ld, cols, dst + r * cols);
    } else {
      for (int64_t i = 0; i < cols; ++i) dst[r * cols + i] = Bf16Rne(src[r * ld + i]);
    }
  }
}

// A bfloat16 copy of the rows x cols contiguous matrix at src (threads splitting the rows
// outside a parallel region), or nullptr when !yes.
std::unique_ptr<uint16_t[]> Bf16Copy(const float* src, int64_t rows, int64_t cols,
                                     bool yes = true) {
  if (!yes) return nullptr;
  std::unique_ptr<uint16_t[]> out(new uint16_t[std::max<int64_t>(rows * cols, 1)]);
  uint16_t* o = out.get();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) ToBf16(src + r * cols, 1, cols, cols, o + r * cols);
  return out;
}

// Only the bfloat16 ops call it, registered where oneDNN is linked (MBV2_WITH_DNNL).
void GemmBf16(char ta, char tb, int64_t m, int64_t n, int64_t k, const uint16_t* a,
              int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#ifdef MBV2_WITH_DNNL
  const int status = dnnl_gemm_bf16bf16f32(ta, tb, m, n, k, 1.f, a, lda, b, ldb, beta, c, ldc);
  PD_CHECK(status == 0, "pointwise_conv2d: oneDNN's bfloat16 GEMM failed (status ", status, ")");
#else
  PD_THROW("pointwise_conv2d: built without oneDNN, no bfloat16 GEMM");
#endif
}

// Per-thread bfloat16 scratch of `each` values.
struct Bf16Scratch {
  std::vector<uint16_t> buf;
  int64_t each;
  Bf16Scratch(int threads, int64_t each_) : buf(static_cast<size_t>(threads) * each_), each(each_) {}
  uint16_t* of(int t) { return buf.data() + t * each; }
};

// The fused op's normalisation of the input (mbv2_bn_relu6_pointwise below): relu6(x *
// a[c] + b[c]), the batch norm's folded scale and shift (`a` null: none), one block of
// x's ci rows (row stride ld) at a time into a contiguous ci x len scratch, with the batch
// norm op's arithmetic (one FMA, max with 0, min with 6), so its output bit for bit.
struct BlockNorm : mbv2::FoldedNorm {
  // the sums taken per block as the products make g (accumulate)
  BlockNorm(const mbv2::FoldedNorm& f = {}) : mbv2::FoldedNorm(f) {}

  // part[c] += sum gm, part[ci + c] += sum gm * (x - mean[c]) over a block, gm = g where
  // the forward's ReLU6 gate passes (mbv2::GatedRowSums, the batch norm op's own sums): x
  // raw and g (the gradient of the normalised block) ci rows of stride ld; float within
  // the block, double across blocks, as the batch norm op sums within and across planes.
  void accumulate(const float* x, const float* g, int64_t ci, int64_t len, int64_t ld,
                  double* part) const {
    for (int64_t c = 0; c < ci; ++c) {
      float ss, qq;
      mbv2::GatedRowSums(x + c * ld, g + c * ld, len, a[c], b[c], mean[c], ss, qq);
      part[c] += ss;
      part[ci + c] += qq;
    }
  }

  // The block to multiply and its row stride: x itself, or its normalised copy in out.
  const float* apply(const float* x, int64_t ci, int64_t len, int64_t ld, float* out,
                     int64_t* ld_out) const {
    *ld_out = a == nullptr ? ld : len;
    if (a == nullptr) return x;
    for (int64_t c = 0; c < ci; ++c) {
      const float* xr = x + c * ld;
      float* o = out + c * len;
      int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
      const __m256 va = _mm256_set1_ps(a[c]), vb = _mm256_set1_ps(b[c]);
      const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
      for (; i + 8 <= len; i += 8) {
        const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), va, vb);
        _mm256_storeu_ps(o + i, _mm256_min_ps(six, _mm256_max_ps(zero, v)));
      }
#endif
      for (; i < len; ++i) {
        float v = xr[i] * a[c] + b[c];
        v = v < 0.f ? 0.f : v;
        o[i] = v > 6.f ? 6.f : v;
      }
    }
    return out;
  }
};

// Per-thread float32 scratch of `each` values (none when !yes).
struct FloatScratch {
  std::vector<float> buf;
  int64_t each;
  FloatScratch(bool yes, int64_t each_)
      : buf(yes ? static_cast<size_t>(omp_get_max_threads()) * each_ : 0), each(each_) {}
  float* of(int t) { return buf.empty() ? nullptr : buf.data() + t * each; }
};

// The expand -> depthwise op's 1x1 backward (below) from gm, the gradient of bn(y) (y = W x
// this conv's output, the batch norm's input; gm = the gradient of relu6(bn(y)) where the
// ReLU6 passes), without y's gradient dy = A gm + B y + C0 (the batch norm's dx, A, B, C0
// per output channel: FusedBatchNormCoefs) ever being formed:
//   dx = (diag(A) W)^T gm + M x + c,         M = W^T diag(B) W (ci x ci), c = W^T C0,
//   dW = diag(A) (gm x^T) + diag(B) W G + C0 s^T,   G = x x^T, s = x's row sums,
// so neither y nor dy is read or written: the products take gm (as they would take dy) and
// x, ci rows where y has co (6x as many in MobileNetV2), for the extra M x and G.
// BackwardBlocks adds M x + c to each block of dx and sums G and s (double across blocks).
struct BnTerms {
  const float* m = nullptr;  // null: none (a plain 1x1 backward)
  const float* c = nullptr;
  double* gram = nullptr;    // out: G (ci x ci) then s (ci)
};

// One block's BnTerms: dx += M x + c, and x's Gram matrix and row sums into part (double).
void AddBnTerms(const Shape& s, const BnTerms& bn, const float* xb, int64_t ldx, int64_t len,
                float* dxb, float* gram, double* part) {
  const int ci = static_cast<int>(s.ci), hw = static_cast<int>(s.hw), n = static_cast<int>(len);
  cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, ci, n, ci, 1.f, bn.m, ci, xb, static_cast<int>(ldx),
              1.f, dxb, hw);
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, ci, ci, n, 1.f, xb, static_cast<int>(ldx), xb,
              static_cast<int>(ldx), 0.f, gram, ci);
  for (int64_t i = 0; i < s.ci * s.ci; ++i) part[i] += gram[i];
  for (int64_t c = 0; c < s.ci; ++c) {
    const float* xr = xb + c * ldx;
    float* d = dxb + c * s.hw;
    const float k = bn.c[c];
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < len; ++p) {
      d[p] += k;
      sum += xr[p];
    }
    part[s.ci * s.ci + c] += sum;
  }
}

}  // namespace

// The forward product of a block where x has 8 or 16 channels (MobileNetV2's expand
// convs on its largest maps): each 16-pixel vector of x's K channels held in registers and
// every output row made from them, one FMA per channel (broadcast weight), no packing;
// rows streamed to memory where the output outgrows the cache (`stream`, 64-byte aligned
// full vectors), and the batch norm sums of each row (`sums`: sum and sum of squares
// about shift[o], 16-lane float accumulators in `vec`, 2 co vectors) taken from the
// registers, since a streamed row is not in cache to be summed after. MKL's packed
// kernels spend more than these products on such thin shapes: batch 32, 2 threads,
// pointwise_conv2d ms, MKL -> this (-> and streamed): 16->96 at 112x112 12.7-13.2 ->
// 11.4-12.0 -> 7.2, 8->48 at 112x112 5.8-6.0 -> 3.1-3.2 -> 2.9-3.0; with its sums
// (pointwise_conv2d_sums) 13.7-14.3 -> 7.5-12.3 and 5.6-6.0 -> 2.9-4.8. With 24 channels
// (24 vectors held) it lost: 24->144 at 56x56 with sums 5.6 -> 6.4-9.1, so MKL keeps it.
// Summed in k order from w[o][0] x[0], as MKL's results are.
template <int K>
__attribute__((target("avx512f"))) void ThinBlock(const float* x, int64_t ldx, int64_t len,
                                                 const float* w, int64_t co, float* y,
                                                 int64_t ldy, bool stream, const float* shift,
                                                 float* vec, float* sums) {
  if (sums != nullptr)
    for (int64_t i = 0; i < 2 * co * 16; ++i) vec[i] = 0.f;
  for (int64_t p = 0; p < len; p += 16) {
    const int64_t left = len - p;
    const __mmask16 m = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    __m512 xv[K];
    for (int k = 0; k < K; ++k) xv[k] = _mm512_maskz_loadu_ps(m, x + k * ldx + p);
    for (int64_t o = 0; o < co; ++o) {
      const float* wr = w + o * K;
      float* yr = y + o * ldy + p;
      __m512 acc = _mm512_mul_ps(_mm512_set1_ps(wr[0]), xv[0]);
      for (int k = 1; k < K; ++k) acc = _mm512_fmadd_ps(_mm512_set1_ps(wr[k]), xv[k], acc);
      if (stream && m == 0xFFFF && reinterpret_cast<uintptr_t>(yr) % 64 == 0)
        _mm512_stream_ps(yr, acc);
      else
        _mm512_mask_storeu_ps(yr, m, acc);
      if (sums != nullptr) {
        const __m512 d = _mm512_maskz_sub_ps(m, acc, _mm512_set1_ps(shift[o]));
        float* vs = vec + o * 32;
        _mm512_storeu_ps(vs, _mm512_add_ps(_mm512_loadu_ps(vs), d));
        _mm512_storeu_ps(vs + 16, _mm512_fmadd_ps(d, d, _mm512_loadu_ps(vs + 16)));
      }
    }
  }
  if (stream) _mm_sfence();
  if (sums != nullptr)
    for (int64_t o = 0; o < co; ++o) {
      sums[o] = _mm512_reduce_add_ps(_mm512_loadu_ps(vec + o * 32));
      sums[co + o] = _mm512_reduce_add_ps(_mm512_loadu_ps(vec + o * 32 + 16));
    }
}

// Whether ThinBlock takes a block of this shape (float32 products, AVX-512).
bool UseThin(const Shape& s) { return (s.ci == 8 || s.ci == 16) && HasAvx512(); }

void Thin(const Shape& s, const float* x, int64_t len, const float* w, float* y, bool stream,
          const float* shift, float* vec, float* sums) {
  if (s.ci == 8)
    ThinBlock<8>(x, s.hw, len, w, s.co, y, s.hw, stream, shift, vec, sums);
  else
    ThinBlock<16>(x, s.hw, len, w, s.co, y, s.hw, stream, shift, vec, sums);
}

// y = W x a block at a time, x normalised first where `norm` says (the fused op). ys: y's
// sums for the batch norm after it (OutputSums), taken a block at a time, K[c] = y's first
// value of channel c (computed up front from the first pixel's input).
template <bool BF16>
void ForwardBlocks(const Shape& s, const float* xp, const float* wp, float* yp,
                   const BlockNorm& norm, mbv2::OutputSums* ys = nullptr) {
  if (ys != nullptr) {
    // K[o]: y's first pixel, from x's (normalised as the blocks are, where `norm` says)
    std::vector<float> x0(s.ci);
    for (int64_t c = 0; c < s.ci; ++c) x0[c] = norm.At(c, xp[c * s.hw]);
    ys->ShiftFromInput(wp, x0.data(), s.ci);
  }
  const int hw = static_cast<int>(s.hw);
  const int64_t blk = std::min(kBlock, s.hw);
  const auto wb = Bf16Copy(wp, s.co, s.ci, BF16);
  Bf16Scratch xs(BF16 ? omp_get_max_threads() : 0, s.ci * blk);
  FloatScratch xn(norm.a != nullptr, s.ci * blk);
  const int64_t chunks = BlockChunks(s, ys != nullptr ? 2 * s.co * sizeof(double) : 0);
  if (ys != nullptr) ys->Chunks(chunks);
  // the plain float32 product of x with 8 or 16 channels: ThinBlock; its sums from its
  // registers where it streams the block out (not in cache after), else from the rows as
  // below (measured: its register sums, kept in memory a row at a time, cost x1.0 224 px
  // training steps 2.5 % more than summing its 154 MB output over again)
  const bool thin = !BF16 && norm.a == nullptr && UseThin(s);
  const bool stream = thin && mbv2::StreamOutput(s.n * s.co * s.hw, yp);
  FloatScratch thin_vec(thin && stream && ys != nullptr, 2 * s.co * 16 + 2 * s.co);
  ForBlocks(s, chunks, [&](int t, int64_t k, int64_t n, int64_t p0, int64_t len) {
    float* yb = yp + n * s.co * s.hw + p0;
    if (thin) {
      float* vec = thin_vec.of(t);
      float* rows = vec == nullptr ? nullptr : vec + 2 * s.co * 16;
      Thin(s, xp + n * s.ci * s.hw + p0, len, wp, yb, stream,
           vec != nullptr ? ys->shift() : nullptr, vec, rows);
      if (vec != nullptr) {
        double* part = ys->part(k);
        for (int64_t o = 0; o < 2 * s.co; ++o) part[o] += rows[o];
      } else if (ys != nullptr) {
        ys->AddRows(k, yb, s.hw, len);
      }
      return;
    }
    int64_t ldx;
    const float* xb = norm.apply(xp + n * s.ci * s.hw + p0, s.ci, len, s.hw, xn.of(t), &ldx);
    if (BF16) {
      ToBf16(xb, s.ci, len, ldx, xs.of(t));
      GemmBf16('N', 'N', s.co, len, s.ci, wb.get(), s.ci, xs.of(t), len, 0.f, yb, s.hw);
    } else {
      cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, s.co, len, s.ci, 1.f, wp, s.ci, xb,
                  static_cast<int>(ldx), 0.f, yb, hw);
    }
    if (ys != nullptr) ys->AddRows(k, yb, s.hw, len);
  });
}

template <bool BF16>
std::vector<paddle::Tensor> PointwiseForward(const paddle::Tensor& x, const paddle::Tensor& w) {
  CheckFloat32(x, w);
  const Shape s = GetShape(x, w);
  ForwardIo io(x, w, s);
  ForwardBlocks<BF16>(s, io.x.data<float>(), io.w.data<float>(), io.y.data<float>(), {});
  return {io.y};
}

// The same, and y's sums for the fused batch norm op after it (Y, Sums: OutputSums).
template <bool BF16>
std::vector<paddle::Tensor> PointwiseSumsForward(const paddle::Tensor& x, const paddle::Tensor& w) {
  CheckFloat32(x, w);
  const Shape s = GetShape(x, w);
  PD_CHECK(s.n > 0 && s.hw > 0, "pointwise_conv2d: empty input");
  ForwardIo io(x, w, s);
  mbv2::OutputSums ys(s.co);
  ForwardBlocks<BF16>(s, io.x.data<float>(), io.w.data<float>(), io.y.data<float>(), {}, &ys);
  return {io.y, ys.Finish()};
}

// Whether the backward copies each block of dy into a contiguous scratch before its
// products: where the block is a slice of wider planes (planes over kBlock pixels) and dy
// has many rows, MKL's dx product reads those rows as that many strided streams at once,
// more than the hardware prefetcher follows; row by row copies stream them. Measured on
// the expand -> depthwise op's gm (96 rows at 112x112, 144 at 56x56): MKL's dx kernel 20 %
// of that unit's samples -> 9 % plus 8 % in the copy; whole training steps alternated in
// one process, x1.0 at 224 px batch 32: rows from 32 1.014, 64 1.015-1.016, 96 1.015; x0.5
// from 32 0.991, 64 1.006. BF16 converts each block row by row already (ToBf16).
constexpr int64_t kCopyMinRows = 64;
bool CopyGradientBlock(const Shape& s) { return s.co >= kCopyMinRows && s.hw > kBlock; }

// dx = W^T dy and dw = dy x^T a block at a time, x normalised first where `norm` says (the
// fused op: dx is then the gradient of the normalised input). BF16: both products from
// bfloat16 copies of the block, except a weight gradient the dot kernel takes (float32:
// memory-bound).
template <bool BF16>
void BackwardBlocks(const Shape& s, const float* xp, const float* wp, const float* gp,
                    float* dxp, float* dwp, const BlockNorm& norm, const BnTerms& bn = {}) {
  const int hw = static_cast<int>(s.hw);
  const int64_t wsize = s.co * s.ci;
  const int threads = omp_get_max_threads();
  const int64_t bn_size = norm.sums ? 2 * s.ci : 0, gram_size = bn.m ? s.ci * (s.ci + 1) : 0;
  const int64_t chunks =
      BlockChunks(s, wsize * sizeof(float) + (bn_size + gram_size) * sizeof(double));
  std::vector<float> part(static_cast<size_t>(chunks) * wsize, 0.f);
  const bool dot = UseDotKernel(s);
  const auto wb = Bf16Copy(wp, s.co, s.ci, BF16);
  const int64_t blk = std::min(kBlock, s.hw);
  Bf16Scratch gs(BF16 ? threads : 0, s.co * blk), xs(BF16 && !dot ? threads : 0, s.ci * blk);
  FloatScratch xn(norm.a != nullptr, s.ci * blk), gram_blk(bn.m != nullptr, s.ci * s.ci);
  mbv2::ChunkSums bn_part(bn_size, chunks), gram_part(gram_size, chunks);
  const bool copy_g = !BF16 && CopyGradientBlock(s);
  FloatScratch gcopy(copy_g, s.co * blk);
  ForBlocks(s, chunks, [&](int t, int64_t k, int64_t n, int64_t p0, int64_t len) {
    const float* g = gp + n * s.co * s.hw + p0;
    int64_t ldg = s.hw;
    if (copy_g) {
      float* rows = gcopy.of(t);
      for (int64_t o = 0; o < s.co; ++o)
        std::memcpy(rows + o * len, g + o * s.hw, len * sizeof(float));
      g = rows;
      ldg = len;
    }
    int64_t ldx;
    const float* xraw = xp + n * s.ci * s.hw + p0;
    const float* xb = norm.apply(xraw, s.ci, len, s.hw, xn.of(t), &ldx);
    float* dxb = dxp + n * s.ci * s.hw + p0;
    float* acc = part.data() + k * wsize;
    if (BF16) {
      ToBf16(g, s.co, len, s.hw, gs.of(t));
      GemmBf16('T', 'N', s.ci, len, s.co, wb.get(), s.ci, gs.of(t), len, 0.f, dxb, s.hw);
    } else {
      cblas_sgemm(kRowMajor, kTrans, kNoTrans, s.ci, len, s.co, 1.f, wp, s.ci, g,
                  static_cast<int>(ldg), 0.f, dxb, hw);
    }
    if (bn.m != nullptr) AddBnTerms(s, bn, xb, ldx, len, dxb, gram_blk.of(t), gram_part.part(k));
    if (norm.sums) norm.accumulate(xraw, dxb, s.ci, len, s.hw, bn_part.part(k));
    if (dot) {
      DotProducts(g, ldg, xb, ldx, s.co, s.ci, len, acc);
    } else if (BF16) {
      ToBf16(xb, s.ci, len, ldx, xs.of(t));
      GemmBf16('N', 'T', s.co, s.ci, len, gs.of(t), len, xs.of(t), len, 1.f, acc, s.ci);
    } else {
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, s.co, s.ci, len, 1.f, g, static_cast<int>(ldg),
                  xb, static_cast<int>(ldx), 1.f, acc, s.ci);
    }
  });
  SumPartials(part, wsize, dwp);
  if (norm.sums) bn_part.ReduceInto(norm.sums);
  if (bn.m != nullptr) gram_part.ReduceInto(bn.gram);
}

template <bool BF16>
std::vector<paddle::Tensor> PointwiseBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                               const paddle::Tensor& dy) {
  const Shape s = GetShape(x, w);
  BackwardIo io(x, w, dy);
  BackwardBlocks<BF16>(s, io.x.data<float>(), io.w.data<float>(), io.dy.data<float>(),
                       io.dx.data<float>(), io.dw.data<float>(), {});
  return {io.dx, io.dw};
}

std::vector<std::vector<int64_t>> PointwiseInferShape(const std::vector<int64_t>& x_shape,
                                                      const std::vector<int64_t>& w_shape) {
  return {{x_shape[0], w_shape[0], x_shape[2], x_shape[3]}};
}

std::vector<paddle::DataType> PointwiseInferDtype(const paddle::DataType& x_dtype,
                                                  const paddle::DataType&) {
  return {x_dtype};
}

// A 1x1 conv op: Y = conv(X, Weight), gradients for both inputs.
#define MBV2_POINTWISE_OP(name, forward, backward)                    \
  PD_BUILD_OP(name)                                                   \
      .Inputs({"X", "Weight"})                                        \
      .Outputs({"Y"})                                                 \
      .SetKernelFn(PD_KERNEL(forward))                                \
      .SetInferShapeFn(PD_INFER_SHAPE(PointwiseInferShape))           \
      .SetInferDtypeFn(PD_INFER_DTYPE(PointwiseInferDtype));          \
  PD_BUILD_GRAD_OP(name)                                              \
      .Inputs({"X", "Weight", paddle::Grad("Y")})                     \
      .Outputs({paddle::Grad("X"), paddle::Grad("Weight")})           \
      .SetKernelFn(PD_KERNEL(backward))

MBV2_POINTWISE_OP(mbv2_pointwise_conv2d, PointwiseForward<false>, PointwiseBackward<false>);
#ifdef MBV2_WITH_DNNL
MBV2_POINTWISE_OP(mbv2_pointwise_conv2d_bf16, PointwiseForward<true>, PointwiseBackward<true>);
#endif

std::vector<std::vector<int64_t>> PointwiseSumsInferShape(const std::vector<int64_t>& x_shape,
                                                          const std::vector<int64_t>& w_shape) {
  return {{x_shape[0], w_shape[0], x_shape[2], x_shape[3]}, mbv2::OutSumsShape(w_shape[0])};
}

std::vector<paddle::DataType> PointwiseSumsInferDtype(const paddle::DataType& x_dtype,
                                                      const paddle::DataType&) {
  return {x_dtype, paddle::DataType::FLOAT64};
}

// A 1x1 conv op that also gives its output's batch norm sums (for the fused batch norm
// op after it): Y, Sums = conv(X, Weight), gradients as the plain op's (none for Sums).
#define MBV2_POINTWISE_SUMS_OP(name, forward, backward)               \
  PD_BUILD_OP(name)                                                   \
      .Inputs({"X", "Weight"})                                        \
      .Outputs({"Y", "Sums"})                                         \
      .SetKernelFn(PD_KERNEL(forward))                                \
      .SetInferShapeFn(PD_INFER_SHAPE(PointwiseSumsInferShape))       \
      .SetInferDtypeFn(PD_INFER_DTYPE(PointwiseSumsInferDtype));      \
  PD_BUILD_GRAD_OP(name)                                              \
      .Inputs({"X", "Weight", paddle::Grad("Y")})                     \
      .Outputs({paddle::Grad("X"), paddle::Grad("Weight")})           \
      .SetKernelFn(PD_KERNEL(backward))

MBV2_POINTWISE_SUMS_OP(mbv2_pointwise_conv2d_sums, PointwiseSumsForward<false>,
                       PointwiseBackward<false>);
#ifdef MBV2_WITH_DNNL
MBV2_POINTWISE_SUMS_OP(mbv2_pointwise_conv2d_bf16_sums, PointwiseSumsForward<true>,
                       PointwiseBackward<true>);
#endif

// ---------------------------------------------------------------------------------------
// relu6(batch_norm(x)) -> 1x1 conv in one op (training), for MobileNetV2's depthwise ->
// projection pair: the batch norm's statistics pass (mbv2::FusedBatchNormStats), then the
// per-block products on each block of x normalised in cache (BlockNorm), so the batch
// norm's output is neither written nor read back nor kept for the backward, which
// normalises the blocks again for the weight gradient, writes the gradient g of the
// normalised input, taking the batch norm backward's sums of g a block at a time
// (BlockNorm::accumulate), and runs the batch norm's dx pass on g in place, the ReLU6 gate
// recomputed from x (mbv2::FusedBatchNormBackward). Maps over 2x2 of 8 pixels and up.
// The same values as the two ops: the running statistics bit for bit, the rest to float
// rounding (the sums' order; the products', where MKL's kernels depend on a block's
// stride or alignment, the block now being a contiguous copy).

namespace {

Shape FusedShape(const paddle::Tensor& x, const paddle::Tensor& w) {
  CheckFloat32(x, w, "bn_relu6_pointwise");
  const Shape s = GetShape(x, w);
  PD_CHECK(s.n > 0 && s.ci > 0 && s.hw >= 8, "bn_relu6_pointwise: maps of 8 pixels and up only");
  return s;
}

}  // namespace

template <bool BF16>
std::vector<paddle::Tensor> BnPointwiseForward(const paddle::Tensor& x, const paddle::Tensor& scale,
                                               const paddle::Tensor& bias,
                                               const paddle::Tensor& running_mean,
                                               const paddle::Tensor& running_var,
                                               const paddle::Tensor& w,
                                               const paddle::optional<paddle::Tensor>& sums,
                                               float epsilon, float momentum) {
  const Shape s = FusedShape(x, w);
  ForwardIo io(x, w, s);
  auto stats = mbv2::FusedBatchNormStats(io.x, scale, bias, running_mean, running_var, epsilon,
                                         momentum, "bn_relu6_pointwise", sums);
  mbv2::OutputSums ys(s.co);
  ForwardBlocks<BF16>(s, io.x.data<float>(), io.w.data<float>(), io.y.data<float>(),
                      mbv2::Folded(stats[2], s.ci), &ys);
  return {io.y, stats[0], stats[1], stats[2], ys.Finish()};
}

// The fused op's backward products: io.dx = g, the gradient of relu6(bn(x)) (of the
// normalised input), io.dw, and in sums the batch norm backward's 2C sums of g, taken
// a block at a time. What is left is the batch norm's dx (A, B, C0 from those sums).
template <bool BF16>
BackwardIo BnPointwiseProducts(const paddle::Tensor& x, const paddle::Tensor& w,
                               const paddle::Tensor& mean, const paddle::Tensor& folded,
                               const paddle::Tensor& dy, std::vector<double>& sums) {
  const Shape s = FusedShape(x, w);
  PD_CHECK(folded.numel() == 2 * s.ci, "bn_relu6_pointwise: folded scale/shift of the wrong size");
  BackwardIo io(x, w, dy);
  sums.assign(2 * s.ci, 0.0);
  const BlockNorm norm(mbv2::Folded(folded, s.ci, mean.data<float>(), sums.data()));
  BackwardBlocks<BF16>(s, io.x.data<float>(), io.w.data<float>(), io.dy.data<float>(),
                       io.dx.data<float>(), io.dw.data<float>(), norm);
  return io;
}

template <bool BF16>
std::vector<paddle::Tensor> BnPointwiseBackward(const paddle::Tensor& x, const paddle::Tensor& scale,
                                                const paddle::Tensor& w,
                                                const paddle::Tensor& mean,
                                                const paddle::Tensor& invstd,
                                                const paddle::Tensor& folded,
                                                const paddle::Tensor& dy, float epsilon,
                                                float momentum) {
  std::vector<double> sums;
  BackwardIo io = BnPointwiseProducts<BF16>(x, w, mean, folded, dy, sums);
  // the batch norm's input gradient in place over g
  auto dbn = mbv2::FusedBatchNormBackward(io.x, scale, mean, invstd, folded, io.dx, sums.data());
  return {io.dx, dbn[0], dbn[1], io.dw};
}

std::vector<std::vector<int64_t>> BnPointwiseInferShape(
    const std::vector<int64_t>& x_shape, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>& w_shape, const paddle::optional<std::vector<int64_t>>&, float,
    float) {
  auto shapes = mbv2::FusedStatsShapes(x_shape[1]);
  shapes.insert(shapes.begin(), {x_shape[0], w_shape[0], x_shape[2], x_shape[3]});
  shapes.push_back(mbv2::OutSumsShape(w_shape[0]));
  return shapes;
}

#define MBV2_BN_POINTWISE_OP(name, forward, backward)                                       \
  PD_BUILD_OP(name)                                                                         \
      .Inputs({"X", "Scale", "Bias", "RunningMean", "RunningVar", "Weight",                 \
               paddle::Optional("Sums")})                                                   \
      .Outputs({"Y", "SavedMean", "SavedInvStd", "Folded", "OutSums"})                      \
      .Attrs({"epsilon: float", "momentum: float"})                                         \
      .SetKernelFn(PD_KERNEL(forward))                                                      \
      .SetInferShapeFn(PD_INFER_SHAPE(BnPointwiseInferShape))                               \
      .SetInferDtypeFn(PD_INFER_DTYPE(mbv2::FusedInferDtype<1>));                           \
  PD_BUILD_GRAD_OP(name)                                                                    \
      .Inputs({"X", "Scale", "Weight", "SavedMean", "SavedInvStd", "Folded", paddle::Grad("Y")}) \
      .Outputs({paddle::Grad("X"), paddle::Grad("Scale"), paddle::Grad("Bias"),             \
                paddle::Grad("Weight")})                                                    \
      .Attrs({"epsilon: float", "momentum: float"})                                         \
      .SetKernelFn(PD_KERNEL(backward))

MBV2_BN_POINTWISE_OP(mbv2_bn_relu6_pointwise, BnPointwiseForward<false>,
                     BnPointwiseBackward<false>);
#ifdef MBV2_WITH_DNNL
MBV2_BN_POINTWISE_OP(mbv2_bn_relu6_pointwise_bf16, BnPointwiseForward<true>,
                     BnPointwiseBackward<true>);
#endif

// Maps of at most 2x2 (P = H*W <= 4 pixels, MobileNetV2's last stages at 32 px): the
// batch folded into the rows of one GEMM, rows[n*P + p][c] = x[n][c][p], MKL threading
// the product. Packing and unpacking inside the op replaces the transposes and reshapes
// (4 Paddle ops each way) that the same product needed as Paddle ops.
namespace {

void PackRows(const float* x, int64_t n, int64_t c, int64_t P, float* rows) {
  mbv2::Repack<true>(x, n, c, P, rows);
}

void UnpackRows(const float* rows, int64_t n, int64_t c, int64_t P, float* y) {
  mbv2::Repack<false>(rows, n, c, P, y);
}

// Uninitialised float32 scratch from Paddle's allocator (a std::vector's zero fill was
// one more pass over each buffer).
float* Scratch(paddle::Tensor& t, int64_t n) {
  t = paddle::empty({std::max<int64_t>(n, 1)}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  return t.data<float>();
}

// t's data as rows [N*P, C]: t itself for P == 1 (NCHW with 1x1 maps is [N, C]), else
// packed into buf.
const float* AsRows(const float* t, const Shape& s, int64_t c, paddle::Tensor& buf) {
  if (s.hw == 1) return t;
  float* rows = Scratch(buf, s.n * s.hw * c);
  PackRows(t, s.n, c, s.hw, rows);
  return rows;
}

}  // namespace

// BF16: the products from bfloat16 copies of the packed rows and the weight (the 1x1 op's
// bfloat16 variant above, for the maps up to 2x2; oneDNN threads the one product).
template <bool BF16>
std::vector<paddle::Tensor> RowsForward(const paddle::Tensor& x, const paddle::Tensor& w) {
  CheckFloat32(x, w);
  const Shape s = GetShape(x, w);
  ForwardIo io(x, w, s);
  const int m = static_cast<int>(s.n * s.hw);
  paddle::Tensor xbuf, ybuf;
  const float* rows = AsRows(io.x.data<float>(), s, s.ci, xbuf);
  float* yrows = s.hw == 1 ? io.y.data<float>() : Scratch(ybuf, m * s.co);
  if (BF16) {
    const auto xb = Bf16Copy(rows, m, s.ci), wb = Bf16Copy(io.w.data<float>(), s.co, s.ci);
    GemmBf16('N', 'T', m, s.co, s.ci, xb.get(), s.ci, wb.get(), s.ci, 0.f, yrows, s.co);
  } else {
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, m, s.co, s.ci, 1.f, rows, s.ci,
                io.w.data<float>(), s.ci, 0.f, yrows, s.co);
  }
  if (s.hw > 1) UnpackRows(yrows, s.n, s.co, s.hw, io.y.data<float>());
  return {io.y};
}

template <bool BF16>
std::vector<paddle::Tensor> RowsBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                          const paddle::Tensor& dy) {
  const Shape s = GetShape(x, w);
  BackwardIo io(x, w, dy);
  const int m = static_cast<int>(s.n * s.hw);
  paddle::Tensor xbuf, gbuf, dxbuf;
  const float* grows = AsRows(io.dy.data<float>(), s, s.co, gbuf);
  const float* xrows = AsRows(io.x.data<float>(), s, s.ci, xbuf);
  float* dxrows = s.hw == 1 ? io.dx.data<float>() : Scratch(dxbuf, m * s.ci);
  if (BF16) {
    const auto gb = Bf16Copy(grows, m, s.co), xb = Bf16Copy(xrows, m, s.ci);
    const auto wb = Bf16Copy(io.w.data<float>(), s.co, s.ci);
    GemmBf16('N', 'N', m, s.ci, s.co, gb.get(), s.co, wb.get(), s.ci, 0.f, dxrows, s.ci);
    GemmBf16('T', 'N', s.co, s.ci, m, gb.get(), s.co, xb.get(), s.ci, 0.f,
             io.dw.data<float>(), s.ci);
  } else {
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, m, s.ci, s.co, 1.f, grows, s.co,
                io.w.data<float>(), s.ci, 0.f, dxrows, s.ci);
    cblas_sgemm(kRowMajor, kTrans, kNoTrans, s.co, s.ci, m, 1.f, grows, s.co, xrows, s.ci,
                0.f, io.dw.data<float>(), s.ci);
  }
  if (s.hw > 1) UnpackRows(dxrows, s.n, s.ci, s.hw, io.dx.data<float>());
  return {io.dx, io.dw};
}


MBV2_POINTWISE_OP(mbv2_pointwise_rows, RowsForward<false>, RowsBackward<false>);
#ifdef MBV2_WITH_DNNL
MBV2_POINTWISE_OP(mbv2_pointwise_rows_bf16, RowsForward<true>, RowsBackward<true>);
#endif

// The stem: a dense k x k convolution (stride s, zero padding p, no bias) of an input
// with few channels that needs no gradient (the network's 3 -> 32 first layer on the
// images). Each (image, block of output pixels) item gathers its im2col block,
// C_in*k*k x len floats, into a per-thread buffer and runs the block's GEMM on it; the
// backward (the weight's gradient only) gathers the block again for dw += dy cols^T.
// Paddle's unfold wrote the whole [N, C_in*k*k, Ho*Wo] tensor (8 ms of a 224 px step,
// batch 32) that the 1x1 op then read, and the op computed an input gradient nobody used.
namespace {

struct StemShape {
  int64_t n, c, h, w, co, k, stride, pad, ho, wo;
  int64_t kk() const { return c * k * k; }
  Shape Blocks() const { return {n, kk(), co, ho * wo}; }
};

// Output size of a k-wide kernel over `in` pixels padded by `pad` on both sides.
int64_t OutSize(int64_t in, int64_t k, int stride, int pad) {
  return (in + 2 * pad - k) / stride + 1;
}

StemShape GetStemShape(const paddle::Tensor& x, const paddle::Tensor& w, int stride, int pad) {
  const auto xs = x.shape(), ws = w.shape();
  PD_CHECK(xs.size() == 4 && ws.size() == 4 && ws[1] == xs[1] && ws[2] == ws[3] && stride > 0 &&
               pad >= 0,
           "stem_conv2d: x must be NCHW, weight [C_out, C_in, k, k], stride > 0, pad >= 0");
  const int64_t ho = OutSize(xs[2], ws[2], stride, pad), wo = OutSize(xs[3], ws[3], stride, pad);
  PD_CHECK(ho > 0 && wo > 0, "stem_conv2d: the kernel is larger than the padded input");
  return {xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], stride, pad, ho, wo};
}

// out[t] = in[2 t] for t from lo, 16 at a time while 17 more fit before hi (two loads and
// one permute; the scalar stride-2 loop was most of the stem's gather). Returns where it
// stopped. The loads reach in[2 t + 31] <= in[2 hi - 3]: inside what the row holds (the
// caller needs in[2 (hi - 1)]).
__attribute__((target("avx512f"))) int64_t EvenElements(const float* in, int64_t lo, int64_t hi,
                                                        float* out) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  int64_t t = lo;
  for (; t + 16 < hi; t += 16) {
    const __m512 a = _mm512_loadu_ps(in + 2 * t), b = _mm512_loadu_ps(in + 2 * t + 16);
    _mm512_storeu_ps(out + t, _mm512_permutex2var_ps(a, even, b));
  }
  return t;
}

// cols[r][q], r = (c * k + i) * k + j, for the output pixels p0 .. p0 + len of one image
// (x: its C_in x H x W planes): x[c][oh * s - p + i][ow * s - p + j], 0 outside.
void GatherColumns(const float* x, const StemShape& s, int64_t p0, int64_t len, float* cols) {
  for (int64_t c = 0; c < s.c; ++c) {
    const float* plane = x + c * s.h * s.w;
    for (int64_t i = 0; i < s.k; ++i) {
      for (int64_t j = 0; j < s.k; ++j) {
        float* row = cols + ((c * s.k + i) * s.k + j) * len;
        for (int64_t q = 0, p = p0; q < len;) {  // one output row's run at a time
          const int64_t oh = p / s.wo, ow0 = p % s.wo, run = std::min(len - q, s.wo - ow0);
          const int64_t ih = oh * s.stride - s.pad + i;
          if (ih < 0 || ih >= s.h) {
            std::fill(row + q, row + q + run, 0.f);
          } else {
            // iw = base + t * stride: zeros left of the input row, a strided copy, zeros
            // right of it (a branch a pixel made this gather slower than unfold)
            const int64_t base = ow0 * s.stride - s.pad + j;
            const int64_t lo = std::min(run, base >= 0 ? 0 : (-base + s.stride - 1) / s.stride);
            const int64_t hi =
                base > s.w - 1 ? lo : std::max(lo, std::min(run, (s.w - 1 - base) / s.stride + 1));
            float* out = row + q;
            std::fill(out, out + lo, 0.f);
            const float* in = plane + ih * s.w + base;
            if (s.stride == 1) {
              std::copy(in + lo, in + hi, out + lo);
            } else {
              int64_t t = lo;
              if (s.stride == 2 && HasAvx512()) t = EvenElements(in, lo, hi, out);
              for (; t < hi; ++t) out[t] = in[t * s.stride];
            }
            std::fill(out + hi, out + run, 0.f);
          }
          q += run;
          p += run;
        }
      }
    }
  }
}

}  // namespace

// The stem's output y, and where ys is set its batch norm sums, taken from each block's
// rows just written (in cache) about y's first pixel, as the 1x1 op's are.
paddle::Tensor StemOutput(const paddle::Tensor& x, const paddle::Tensor& w, int stride, int pad,
                          mbv2::OutputSums* ys) {
  CheckFloat32(x, w, "stem_conv2d");
  const StemShape s = GetStemShape(x, w, stride, pad);
  const paddle::Tensor xc = Contiguous(x);
  const paddle::Tensor wc = Contiguous(w);
  auto y = paddle::empty({s.n, s.co, s.ho, s.wo}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = xc.data<float>(), *wp = wc.data<float>();
  float* yp = y.data<float>();
  const int64_t kk = s.kk(), hwo = s.ho * s.wo;
  std::vector<float> cols(static_cast<size_t>(omp_get_max_threads() * kk * kBlock));
  if (ys != nullptr && s.n > 0) {  // K[o]: y's first pixel, from its im2col column
    GatherColumns(xp, s, 0, 1, cols.data());
    ys->ShiftFromInput(wp, cols.data(), kk);
  }
  const int64_t chunks = BlockChunks(s.Blocks(), ys != nullptr ? 2 * s.co * sizeof(double) : 0);
  if (ys != nullptr) ys->Chunks(chunks);
  ForBlocks(s.Blocks(), chunks, [&](int t, int64_t k, int64_t n, int64_t p0, int64_t len) {
    float* buf = cols.data() + t * kk * kBlock;
    GatherColumns(xp + n * s.c * s.h * s.w, s, p0, len, buf);
    float* yb = yp + n * s.co * hwo + p0;
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, s.co, len, kk, 1.f, wp, kk, buf, len, 0.f, yb,
                hwo);
    if (ys != nullptr) ys->AddRows(k, yb, hwo, len);
  });
  return y;
}

std::vector<paddle::Tensor> StemForward(const paddle::Tensor& x, const paddle::Tensor& w,
                                        int stride, int pad) {
  return {StemOutput(x, w, stride, pad, nullptr)};
}

std::vector<paddle::Tensor> StemSumsForward(const paddle::Tensor& x, const paddle::Tensor& w,
                                            int stride, int pad) {
  mbv2::OutputSums ys(w.shape()[0]);
  auto y = StemOutput(x, w, stride, pad, &ys);
  return {y, ys.Finish()};
}

std::vector<paddle::Tensor> StemBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                         const paddle::Tensor& dy, int stride, int pad) {
  const StemShape s = GetStemShape(x, w, stride, pad);
  const paddle::Tensor xc = Contiguous(x);
  const paddle::Tensor gc = Contiguous(dy);
  auto dw = paddle::empty(w.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = xc.data<float>(), *gp = gc.data<float>();
  const int64_t kk = s.kk(), hwo = s.ho * s.wo, wsize = s.co * kk;
  const int threads = omp_get_max_threads();
  std::vector<float> cols(static_cast<size_t>(threads * kk * kBlock));
  const int64_t chunks = BlockChunks(s.Blocks(), wsize * sizeof(float));
  std::vector<float> part(static_cast<size_t>(chunks) * wsize, 0.f);
  const bool dot = UseDotKernel(s.Blocks());
  ForBlocks(s.Blocks(), chunks, [&](int t, int64_t k, int64_t n, int64_t p0, int64_t len) {
    float* buf = cols.data() + t * kk * kBlock;
    GatherColumns(xp + n * s.c * s.h * s.w, s, p0, len, buf);
    const float* g = gp + n * s.co * hwo + p0;
    if (dot) {
      DotProducts(g, hwo, buf, len, s.co, kk, len, part.data() + k * wsize);
    } else {
      cblas_sgemm(kRowMajor, kNoTrans, kTrans, s.co, kk, len, 1.f, g, hwo, buf, len, 1.f,
                  part.data() + k * wsize, kk);
    }
  });
  float* dwp = dw.data<float>();
  SumPartials(part, wsize, dwp);
  return {dw};
}

std::vector<std::vector<int64_t>> StemInferShape(const std::vector<int64_t>& x_shape,
                                                 const std::vector<int64_t>& w_shape, int stride,
                                                 int pad) {
  return {{x_shape[0], w_shape[0], OutSize(x_shape[2], w_shape[2], stride, pad),
           OutSize(x_shape[3], w_shape[3], stride, pad)}};
}

std::vector<std::vector<int64_t>> StemSumsInferShape(const std::vector<int64_t>& x_shape,
                                                     const std::vector<int64_t>& w_shape,
                                                     int stride, int pad) {
  auto shapes = StemInferShape(x_shape, w_shape, stride, pad);
  shapes.push_back(mbv2::OutSumsShape(w_shape[0]));
  return shapes;
}

// A stem op: its outputs (__VA_ARGS__) from X and Weight; the gradient of Weight only (no
// gradient for X: Python sends only inputs that need none here).
#define MBV2_STEM_OP(name, forward, infer_shape, infer_dtype, ...) \
  PD_BUILD_OP(name)                                                \
      .Inputs({"X", "Weight"})                                     \
      .Outputs({__VA_ARGS__})                                      \
      .Attrs({"stride: int", "pad: int"})                          \
      .SetKernelFn(PD_KERNEL(forward))                             \
      .SetInferShapeFn(PD_INFER_SHAPE(infer_shape))                \
      .SetInferDtypeFn(PD_INFER_DTYPE(infer_dtype));               \
  PD_BUILD_GRAD_OP(name)                                           \
      .Inputs({"X", "Weight", paddle::Grad("Y")})                  \
      .Outputs({paddle::Grad("Weight")})                           \
      .Attrs({"stride: int", "pad: int"})                          \
      .SetKernelFn(PD_KERNEL(StemBackward))

MBV2_STEM_OP(mbv2_stem_conv2d, StemForward, StemInferShape, PointwiseInferDtype, "Y");
// with its output's batch norm sums (training: the batch norm after it then makes no
// statistics pass over the output)
MBV2_STEM_OP(mbv2_stem_conv2d_sums, StemSumsForward, StemSumsInferShape, PointwiseSumsInferDtype,
             "Y", "Sums");

// ---------------------------------------------------------------------------------------
// The expand 1x1 conv -> relu6(batch_norm) -> depthwise conv of an inverted residual unit
// in one op (training, float32): forward, the 1x1 conv taking its output's batch norm sums
// (mbv2_pointwise_conv2d_sums) and the fused batch norm -> depthwise op on that output
// (mbv2::BnDepthwiseForward), the conv's output Y kept for the backward. Backward, the
// depthwise conv's half (mbv2::BnDepthwiseConvBackward), writing gm, the gradient of
// relu6(bn(Y)) where the ReLU6 passes, with the batch norm backward's sums; then the 1x1
// conv's per-block products from gm and X (BnTerms), so the batch norm's dx pass over Y
// and gm (the two ops' third pass over the unit's widest tensor) is not made. The forward
// and the depthwise conv's and batch norm's gradients are the two ops' bit for bit; the 1x1
// conv's dx and dW are the same sums in another form (float rounding).

std::vector<paddle::Tensor> ExpandDepthwiseForward(
    const paddle::Tensor& x, const paddle::Tensor& w, const paddle::Tensor& scale,
    const paddle::Tensor& bias, const paddle::Tensor& running_mean,
    const paddle::Tensor& running_var, const paddle::Tensor& dw_weight,
    const std::vector<int>& strides, const std::vector<int>& paddings, float epsilon,
    float momentum) {
  auto y = PointwiseSumsForward<false>(x, w);
  auto out = mbv2::BnDepthwiseForward(y[0], scale, bias, running_mean, running_var, dw_weight,
                                      paddle::optional<paddle::Tensor>(y[1]), strides, paddings,
                                      epsilon, momentum);
  out.push_back(y[0]);
  return out;
}

// fold: dout is a depthwise -> projection op's folded gradient (mbv2::DyFold).
std::vector<paddle::Tensor> ExpandDepthwiseGrads(
    const paddle::Tensor& x, const paddle::Tensor& w, const paddle::Tensor& y,
    const paddle::Tensor& scale, const paddle::Tensor& dw_weight, const paddle::Tensor& mean,
    const paddle::Tensor& invstd, const paddle::Tensor& folded, const paddle::Tensor& dout,
    const std::vector<int>& strides, const std::vector<int>& paddings,
    const mbv2::DyFold* fold) {
  CheckFloat32(x, w, "expand_bn_relu6_depthwise");
  const Shape s = GetShape(x, w);
  std::vector<double> sums;
  // gm, the depthwise conv's weight gradient and the batch norm backward's sums
  auto conv = mbv2::BnDepthwiseConvBackward(y, dw_weight, mean, folded, dout, strides,
                                            paddings, sums, /*gated=*/true, fold);
  auto bn = mbv2::FusedBatchNormCoefs(scale, mean, invstd, sums.data(), s.n * s.hw);
  const float *ka = bn[2].data<float>(), *kb = ka + s.co, *kc = kb + s.co;
  BackwardIo io(x, w, conv[0]);
  const float* wp = io.w.data<float>();
  const int co = static_cast<int>(s.co), ci = static_cast<int>(s.ci);
  // diag(A) W for dx's product, diag(B) W for M = W^T diag(B) W, c = W^T C0
  std::vector<float> wa(s.co * s.ci), wb(s.co * s.ci), m(s.ci * s.ci), c(s.ci, 0.f);
  for (int64_t o = 0; o < s.co; ++o)
    for (int64_t i = 0; i < s.ci; ++i) {
      wa[o * s.ci + i] = ka[o] * wp[o * s.ci + i];
      wb[o * s.ci + i] = kb[o] * wp[o * s.ci + i];
      c[i] += wp[o * s.ci + i] * kc[o];
    }
  cblas_sgemm(kRowMajor, kTrans, kNoTrans, ci, ci, co, 1.f, wp, ci, wb.data(), ci, 0.f, m.data(),
              ci);
  std::vector<double> gram(s.ci * (s.ci + 1));
  BnTerms terms;
  terms.m = m.data();
  terms.c = c.data();
  terms.gram = gram.data();
  BackwardBlocks<false>(s, io.x.data<float>(), wa.data(), io.dy.data<float>(), io.dx.data<float>(),
                        io.dw.data<float>(), {}, terms);
  // dW = diag(A) (gm x^T) (BackwardBlocks' dw) + diag(B) W G + C0 s^T
  float* dw = io.dw.data<float>();
  const double* sx = gram.data() + s.ci * s.ci;
  std::vector<float> g32(gram.begin(), gram.begin() + s.ci * s.ci), bwg(s.co * s.ci);
  cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, co, ci, ci, 1.f, wb.data(), ci, g32.data(), ci, 0.f,
              bwg.data(), ci);
  for (int64_t o = 0; o < s.co; ++o)
    for (int64_t i = 0; i < s.ci; ++i) {
      const int64_t k = o * s.ci + i;
      dw[k] = static_cast<float>(static_cast<double>(ka[o]) * dw[k] + bwg[k] + kc[o] * sx[i]);
    }
  return {io.dx, io.dw, bn[0], bn[1], conv[1]};
}

std::vector<paddle::Tensor> ExpandDepthwiseBackward(
    const paddle::Tensor& x, const paddle::Tensor& w, const paddle::Tensor& y,
    const paddle::Tensor& scale, const paddle::Tensor& dw_weight, const paddle::Tensor& mean,
    const paddle::Tensor& invstd, const paddle::Tensor& folded, const paddle::Tensor& dout,
    const std::vector<int>& strides, const std::vector<int>& paddings, float, float) {
  return ExpandDepthwiseGrads(x, w, y, scale, dw_weight, mean, invstd, folded, dout, strides,
                              paddings, nullptr);
}

std::vector<std::vector<int64_t>> ExpandDepthwiseInferShape(
    const std::vector<int64_t>& x_shape, const std::vector<int64_t>& w_shape,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>& dw_shape,
    const std::vector<int>& strides, const std::vector<int>& paddings, float, float) {
  // the fused batch norm -> depthwise op's shapes on the 1x1 conv's output y, then y
  const std::vector<int64_t> y = {x_shape[0], w_shape[0], x_shape[2], x_shape[3]};
  auto shapes = mbv2::BnDepthwiseInferShape(y, {}, {}, {}, {}, dw_shape,
                                            paddle::optional<std::vector<int64_t>>(), strides,
                                            paddings, 0.f, 0.f);
  shapes.push_back(y);
  return shapes;
}

std::vector<paddle::DataType> ExpandDepthwiseInferDtype(
    const paddle::DataType& x_dtype, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&) {
  return {x_dtype, x_dtype, x_dtype, x_dtype, paddle::DataType::FLOAT64, x_dtype};
}

PD_BUILD_OP(mbv2_expand_bn_relu6_depthwise)
    .Inputs({"X", "Weight", "Scale", "Bias", "RunningMean", "RunningVar", "DwWeight"})
    .Outputs({"Out", "SavedMean", "SavedInvStd", "Folded", "OutSums", "Y"})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "epsilon: float",
            "momentum: float"})
    .SetKernelFn(PD_KERNEL(ExpandDepthwiseForward))
    .SetInferShapeFn(PD_INFER_SHAPE(ExpandDepthwiseInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ExpandDepthwiseInferDtype));

PD_BUILD_GRAD_OP(mbv2_expand_bn_relu6_depthwise)
    .Inputs({"X", "Weight", "Y", "Scale", "DwWeight", "SavedMean", "SavedInvStd", "Folded",
             paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight"), paddle::Grad("Scale"),
              paddle::Grad("Bias"), paddle::Grad("DwWeight")})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "epsilon: float",
            "momentum: float"})
    .SetKernelFn(PD_KERNEL(ExpandDepthwiseBackward));

// ---------------------------------------------------------------------------------------
// The depthwise conv -> relu6(batch_norm) -> projection 1x1 conv of an inverted residual
// unit in one op (training): the fused batch norm -> depthwise op (or the expand ->
// depthwise op before it) and the fused batch norm -> 1x1 op, whose backwards meet
// without the projection batch norm's dx pass. Apart, the 1x1 op's backward writes g (the
// gradient of relu6(bn(z)), z the depthwise output), takes the batch norm's sums of it,
// then makes dz = A gate(z) g + B z + C0 in place (reading z and g, writing dz), and the
// depthwise backward reads dz; here the depthwise backward reads g and z and makes dz as
// it interleaves them (mbv2::DyFold), two passes over the depthwise output fewer. The
// forward is the two ops' bit for bit; the gradients their values with dz made in
// registers (the same arithmetic as the pass).

namespace {

// The projection's half of the backward: {g, dW, dgamma, dbeta, [A, B, C0]} (the batch
// norm's dx coefficients for the depthwise backward to apply: FusedBatchNormCoefs).
template <bool BF16>
std::vector<paddle::Tensor> ProjectionGrads(const paddle::Tensor& z, const paddle::Tensor& scale,
                                            const paddle::Tensor& w, const paddle::Tensor& mean,
                                            const paddle::Tensor& invstd,
                                            const paddle::Tensor& folded,
                                            const paddle::Tensor& dout) {
  std::vector<double> sums;
  BackwardIo io = BnPointwiseProducts<BF16>(z, w, mean, folded, dout, sums);
  auto bn = mbv2::FusedBatchNormCoefs(scale, mean, invstd, sums.data(), z.numel() / z.shape()[1]);
  return {io.dx, io.dw, bn[0], bn[1], bn[2]};
}

mbv2::DyFold MakeFold(const paddle::Tensor& z, const paddle::Tensor& folded,
                      const paddle::Tensor& coefs) {
  const int64_t c = z.shape()[1];
  const float *k = coefs.data<float>(), *f = folded.data<float>();
  return {z.data<float>(), k, k + c, k + 2 * c, f, f + c};
}

template <bool BF16>
std::vector<paddle::Tensor> DwPwForward(
    const paddle::Tensor& x, const paddle::Tensor& scale, const paddle::Tensor& bias,
    const paddle::Tensor& running_mean, const paddle::Tensor& running_var,
    const paddle::Tensor& dw_weight, const paddle::optional<paddle::Tensor>& sums,
    const paddle::Tensor& scale2, const paddle::Tensor& bias2, const paddle::Tensor& running_mean2,
    const paddle::Tensor& running_var2, const paddle::Tensor& pw_weight,
    const std::vector<int>& strides, const std::vector<int>& paddings, float epsilon,
    float momentum, float epsilon2, float momentum2) {
  auto dw = mbv2::BnDepthwiseForward(x, scale, bias, running_mean, running_var, dw_weight, sums,
                                     strides, paddings, epsilon, momentum);
  auto pw = BnPointwiseForward<BF16>(dw[0], scale2, bias2, running_mean2, running_var2, pw_weight,
                                     paddle::optional<paddle::Tensor>(dw[4]), epsilon2, momentum2);
  return {pw[0], dw[0], dw[1], dw[2], dw[3], pw[1], pw[2], pw[3], pw[4]};
}

template <bool BF16>
std::vector<paddle::Tensor> DwPwBackward(
    const paddle::Tensor& x, const paddle::Tensor& scale, const paddle::Tensor& dw_weight,
    const paddle::Tensor& mean, const paddle::Tensor& invstd, const paddle::Tensor& folded,
    const paddle::Tensor& z, const paddle::Tensor& scale2, const paddle::Tensor& pw_weight,
    const paddle::Tensor& mean2, const paddle::Tensor& invstd2, const paddle::Tensor& folded2,
    const paddle::Tensor& dout, const std::vector<int>& strides, const std::vector<int>& paddings,
    float, float, float, float) {
  const paddle::Tensor zc = Contiguous(z);
  auto pw = ProjectionGrads<BF16>(zc, scale2, pw_weight, mean2, invstd2, folded2, dout);
  const mbv2::DyFold fold = MakeFold(zc, folded2, pw[4]);
  auto dw = mbv2::BnDepthwiseGrads(x, scale, dw_weight, mean, invstd, folded, pw[0], strides,
                                   paddings, &fold);
  return {dw[0], dw[1], dw[2], dw[3], pw[2], pw[3], pw[1]};
}

template <bool BF16>
std::vector<paddle::Tensor> ExpandDwPwForward(
    const paddle::Tensor& x, const paddle::Tensor& w, const paddle::Tensor& scale,
    const paddle::Tensor& bias, const paddle::Tensor& running_mean,
    const paddle::Tensor& running_var, const paddle::Tensor& dw_weight,
    const paddle::Tensor& scale2, const paddle::Tensor& bias2, const paddle::Tensor& running_mean2,
    const paddle::Tensor& running_var2, const paddle::Tensor& pw_weight,
    const std::vector<int>& strides, const std::vector<int>& paddings, float epsilon,
    float momentum, float epsilon2, float momentum2) {
  auto dw = ExpandDepthwiseForward(x, w, scale, bias, running_mean, running_var, dw_weight,
                                   strides, paddings, epsilon, momentum);
  auto pw = BnPointwiseForward<BF16>(dw[0], scale2, bias2, running_mean2, running_var2, pw_weight,
                                     paddle::optional<paddle::Tensor>(dw[4]), epsilon2, momentum2);
  return {pw[0], dw[0], dw[1], dw[2], dw[3], pw[1], pw[2], pw[3], dw[5], pw[4]};
}

template <bool BF16>
std::vector<paddle::Tensor> ExpandDwPwBackward(
    const paddle::Tensor& x, const paddle::Tensor& w, const paddle::Tensor& y,
    const paddle::Tensor& scale, const paddle::Tensor& dw_weight, const paddle::Tensor& mean,
    const paddle::Tensor& invstd, const paddle::Tensor& folded, const paddle::Tensor& z,
    const paddle::Tensor& scale2, const paddle::Tensor& pw_weight, const paddle::Tensor& mean2,
    const paddle::Tensor& invstd2, const paddle::Tensor& folded2, const paddle::Tensor& dout,
    const std::vector<int>& strides, const std::vector<int>& paddings, float, float, float,
    float) {
  const paddle::Tensor zc = Contiguous(z);
  auto pw = ProjectionGrads<BF16>(zc, scale2, pw_weight, mean2, invstd2, folded2, dout);
  const mbv2::DyFold fold = MakeFold(zc, folded2, pw[4]);
  auto ex = ExpandDepthwiseGrads(x, w, y, scale, dw_weight, mean, invstd, folded, pw[0], strides,
                                 paddings, &fold);
  return {ex[0], ex[1], ex[2], ex[3], ex[4], pw[2], pw[3], pw[1]};
}

// shapes: the depthwise op's (Out as Z), then the 1x1's output first and its statistics
std::vector<std::vector<int64_t>> PairShapes(std::vector<std::vector<int64_t>> dw,
                                             const std::vector<int64_t>& pw_shape) {
  const std::vector<int64_t> z = dw[0];
  std::vector<std::vector<int64_t>> out = {{z[0], pw_shape[0], z[2], z[3]}, z, dw[1], dw[2], dw[3]};
  for (const auto& t : mbv2::FusedStatsShapes(z[1])) out.push_back(t);
  return out;
}

std::vector<std::vector<int64_t>> DwPwInferShape(
    const std::vector<int64_t>& x_shape, const std::vector<int64_t>& s1,
    const std::vector<int64_t>& b1, const std::vector<int64_t>& m1, const std::vector<int64_t>& v1,
    const std::vector<int64_t>& dw_shape, const paddle::optional<std::vector<int64_t>>& sums,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>& pw_shape,
    const std::vector<int>& strides, const std::vector<int>& paddings, float, float, float,
    float) {
  auto out = PairShapes(mbv2::BnDepthwiseInferShape(x_shape, s1, b1, m1, v1, dw_shape, sums,
                                                    strides, paddings, 0.f, 0.f),
                        pw_shape);
  out.push_back(mbv2::OutSumsShape(pw_shape[0]));  // OutSums, the 1x1's output's
  return out;
}

std::vector<paddle::DataType> DwPwInferDtype(
    const paddle::DataType& x_dtype, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
    const paddle::optional<paddle::DataType>&, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&) {
  std::vector<paddle::DataType> out(8, x_dtype);
  out.push_back(paddle::DataType::FLOAT64);  // OutSums
  return out;
}

std::vector<std::vector<int64_t>> ExpandDwPwInferShape(
    const std::vector<int64_t>& x_shape, const std::vector<int64_t>& w_shape,
    const std::vector<int64_t>& s1, const std::vector<int64_t>& b1, const std::vector<int64_t>& m1,
    const std::vector<int64_t>& v1, const std::vector<int64_t>& dw_shape,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>& pw_shape,
    const std::vector<int>& strides, const std::vector<int>& paddings, float, float, float,
    float) {
  auto dw = ExpandDepthwiseInferShape(x_shape, w_shape, s1, b1, m1, v1, dw_shape, strides,
                                      paddings, 0.f, 0.f);
  auto out = PairShapes(dw, pw_shape);
  out.push_back(dw[5]);  // Y
  out.push_back(mbv2::OutSumsShape(pw_shape[0]));  // OutSums, the 1x1's output's
  return out;
}

std::vector<paddle::DataType> ExpandDwPwInferDtype(
    const paddle::DataType& x_dtype, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&,
    const paddle::DataType&, const paddle::DataType&, const paddle::DataType&) {
  std::vector<paddle::DataType> out(9, x_dtype);
  out.push_back(paddle::DataType::FLOAT64);  // OutSums
  return out;
}

}  // namespace

#define MBV2_PAIR_ATTRS                                                                     \
  {"strides: std::vector<int>", "paddings: std::vector<int>", "epsilon: float",             \
   "momentum: float", "epsilon2: float", "momentum2: float"}
#define MBV2_PAIR_STATS "SavedMean", "SavedInvStd", "Folded", "SavedMean2", "SavedInvStd2", "Folded2"

#define MBV2_DW_PW_OP(name, BF16)                                                           \
  PD_BUILD_OP(name)                                                                         \
      .Inputs({"X", "Scale", "Bias", "RunningMean", "RunningVar", "DwWeight",               \
               paddle::Optional("Sums"), "Scale2", "Bias2", "RunningMean2", "RunningVar2",  \
               "PwWeight"})                                                                 \
      .Outputs({"Out", "Z", MBV2_PAIR_STATS, "OutSums"})                                    \
      .Attrs(MBV2_PAIR_ATTRS)                                                               \
      .SetKernelFn(PD_KERNEL(DwPwForward<BF16>))                                            \
      .SetInferShapeFn(PD_INFER_SHAPE(DwPwInferShape))                                      \
      .SetInferDtypeFn(PD_INFER_DTYPE(DwPwInferDtype));                                     \
  PD_BUILD_GRAD_OP(name)                                                                    \
      .Inputs({"X", "Scale", "DwWeight", "SavedMean", "SavedInvStd", "Folded", "Z",         \
               "Scale2", "PwWeight", "SavedMean2", "SavedInvStd2", "Folded2",               \
               paddle::Grad("Out")})                                                        \
      .Outputs({paddle::Grad("X"), paddle::Grad("Scale"), paddle::Grad("Bias"),             \
                paddle::Grad("DwWeight"), paddle::Grad("Scale2"), paddle::Grad("Bias2"),    \
                paddle::Grad("PwWeight")})                                                  \
      .Attrs(MBV2_PAIR_ATTRS)                                                               \
      .SetKernelFn(PD_KERNEL(DwPwBackward<BF16>))

#define MBV2_EXPAND_DW_PW_OP(name, BF16)                                                    \
  PD_BUILD_OP(name)                                                                         \
      .Inputs({"X", "Weight", "Scale", "Bias", "RunningMean", "RunningVar", "DwWeight",     \
               "Scale2", "Bias2", "RunningMean2", "RunningVar2", "PwWeight"})               \
      .Outputs({"Out", "Z", MBV2_PAIR_STATS, "Y", "OutSums"})                               \
      .Attrs(MBV2_PAIR_ATTRS)                                                               \
      .SetKernelFn(PD_KERNEL(ExpandDwPwForward<BF16>))                                      \
      .SetInferShapeFn(PD_INFER_SHAPE(ExpandDwPwInferShape))                                \
      .SetInferDtypeFn(PD_INFER_DTYPE(ExpandDwPwInferDtype));                               \
  PD_BUILD_GRAD_OP(name)                                                                    \
      .Inputs({"X", "Weight", "Y", "Scale", "DwWeight", "SavedMean", "SavedInvStd",         \
               "Folded", "Z", "Scale2", "PwWeight", "SavedMean2", "SavedInvStd2",           \
               "Folded2", paddle::Grad("Out")})                                             \
      .Outputs({paddle::Grad("X"), paddle::Grad("Weight"), paddle::Grad("Scale"),           \
                paddle::Grad("Bias"), paddle::Grad("DwWeight"), paddle::Grad("Scale2"),     \
                paddle::Grad("Bias2"), paddle::Grad("PwWeight")})                           \
      .Attrs(MBV2_PAIR_ATTRS)                                                               \
      .SetKernelFn(PD_KERNEL(ExpandDwPwBackward<BF16>))

MBV2_DW_PW_OP(mbv2_bn_relu6_depthwise_pointwise, false);
MBV2_EXPAND_DW_PW_OP(mbv2_expand_bn_relu6_depthwise_pointwise, false);
#ifdef MBV2_WITH_DNNL
MBV2_DW_PW_OP(mbv2_bn_relu6_depthwise_pointwise_bf16, true);
MBV2_EXPAND_DW_PW_OP(mbv2_expand_bn_relu6_depthwise_pointwise_bf16, true);
#endif

#endif  // MBV2_WITH_MKL
