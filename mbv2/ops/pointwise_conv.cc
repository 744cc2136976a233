// 1x1 convolution (NCHW, float32, CPU, no bias) on large maps as a Paddle custom operator,
// built into the same library as the depthwise conv, on the MKL that Paddle ships
// (libmklml_intel.so; without it this file registers nothing and Python keeps Paddle's
// conv2d).
//
// Paddle's conv2d runs a 1x1 convolution per image: y[n] = W x[n], a GEMM with K = C_in.
// MobileNetV2's 1x1 layers on 28x28 to 112x112 maps have thin weights (16-32 channels on
// one side), so their backward is a stream over x, dy and dx with little arithmetic a
// byte; Paddle's makes separate passes for dx and dw. Here the plane is cut into blocks of
// kBlock pixels, and threads take (image, block) items: for each block
//   dx[n][:, blk] = W^T dy[n][:, blk]           (GEMM C_in x len x C_out)
//   dw_t         += dy[n][:, blk] x[n][:, blk]^T (GEMM C_out x C_in x len)
// while the block of dy is in cache for both, with per-thread dw partial sums reduced at
// the end (deterministic for a fixed thread count). The forward is the same per-block
// GEMM, y[n][:, blk] = W x[n][:, blk]. MKL runs single-threaded inside the OpenMP
// region (one thread a block), its per-thread setting restored afterwards.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "paddle/extension.h"

#ifdef MBV2_WITH_MKL

extern "C" {
// MKL's CBLAS (libmklml_intel.so), declared here: Paddle ships the library, not its header.
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c,
                 int ldc);
int MKL_Set_Num_Threads_Local(int nt);
}

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

// Calls fn(n, p0, len) for every (image, block) item, threads splitting them statically,
// MKL single-threaded meanwhile; fn also gets the thread's index.
template <class Fn>
void ForBlocks(const Shape& s, Fn fn) {
  const int64_t blocks = (s.hw + kBlock - 1) / kBlock, items = s.n * blocks;
#pragma omp parallel
  {
    const int prev = MKL_Set_Num_Threads_Local(1);
    const int t = omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n = it / blocks, p0 = (it % blocks) * kBlock;
      fn(t, n, p0, std::min(kBlock, s.hw - p0));
    }
    MKL_Set_Num_Threads_Local(prev);
  }
}

}  // namespace

std::vector<paddle::Tensor> PointwiseForward(const paddle::Tensor& x, const paddle::Tensor& w) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32 && w.is_cpu() &&
               w.dtype() == paddle::DataType::FLOAT32,
           "pointwise_conv2d: float32 CPU tensors only");
  const Shape s = GetShape(x, w);
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const paddle::Tensor wc = w.is_contiguous() ? w : w.contiguous();
  auto y = paddle::empty({s.n, s.co, x.shape()[2], x.shape()[3]}, paddle::DataType::FLOAT32,
                         paddle::CPUPlace());
  const float *xp = xc.data<float>(), *wp = wc.data<float>();
  float* yp = y.data<float>();
  const int hw = static_cast<int>(s.hw);
  ForBlocks(s, [&](int, int64_t n, int64_t p0, int64_t len) {
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, s.co, len, s.ci, 1.f, wp, s.ci,
                xp + n * s.ci * s.hw + p0, hw, 0.f, yp + n * s.co * s.hw + p0, hw);
  });
  return {y};
}

std::vector<paddle::Tensor> PointwiseBackward(const paddle::Tensor& x, const paddle::Tensor& w,
                                              const paddle::Tensor& dy) {
  const Shape s = GetShape(x, w);
  const paddle::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const paddle::Tensor wc = w.is_contiguous() ? w : w.contiguous();
  const paddle::Tensor gc = dy.is_contiguous() ? dy : dy.contiguous();
  auto dx = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto dw = paddle::empty(w.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *xp = xc.data<float>(), *wp = wc.data<float>(), *gp = gc.data<float>();
  float *dxp = dx.data<float>(), *dwp = dw.data<float>();
  const int hw = static_cast<int>(s.hw);
  const int64_t wsize = s.co * s.ci;
  const int threads = omp_get_max_threads();
  std::vector<float> part(static_cast<size_t>(threads) * wsize, 0.f);
  ForBlocks(s, [&](int t, int64_t n, int64_t p0, int64_t len) {
    const float* g = gp + n * s.co * s.hw + p0;
    cblas_sgemm(kRowMajor, kTrans, kNoTrans, s.ci, len, s.co, 1.f, wp, s.ci, g, hw, 0.f,
                dxp + n * s.ci * s.hw + p0, hw);
    cblas_sgemm(kRowMajor, kNoTrans, kTrans, s.co, s.ci, len, 1.f, g, hw,
                xp + n * s.ci * s.hw + p0, hw, 1.f, part.data() + t * wsize, s.ci);
  });
  for (int64_t i = 0; i < wsize; ++i) {
    float acc = 0.f;
    for (int t = 0; t < threads; ++t) acc += part[static_cast<size_t>(t) * wsize + i];
    dwp[i] = acc;
  }
  return {dx, dw};
}

std::vector<std::vector<int64_t>> PointwiseInferShape(const std::vector<int64_t>& x_shape,
                                                      const std::vector<int64_t>& w_shape) {
  return {{x_shape[0], w_shape[0], x_shape[2], x_shape[3]}};
}

std::vector<paddle::DataType> PointwiseInferDtype(const paddle::DataType& x_dtype,
                                                  const paddle::DataType&) {
  return {x_dtype};
}

PD_BUILD_OP(mbv2_pointwise_conv2d)
    .Inputs({"X", "Weight"})
    .Outputs({"Y"})
    .SetKernelFn(PD_KERNEL(PointwiseForward))
    .SetInferShapeFn(PD_INFER_SHAPE(PointwiseInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PointwiseInferDtype));

PD_BUILD_GRAD_OP(mbv2_pointwise_conv2d)
    .Inputs({"X", "Weight", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight")})
    .SetKernelFn(PD_KERNEL(PointwiseBackward));

#endif  // MBV2_WITH_MKL
