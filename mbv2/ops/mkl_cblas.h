// MKL's CBLAS entry points the ops call (libmklml_intel.so), declared here: Paddle ships
// the library, not its header. Included only where MBV2_WITH_MKL is defined.
#pragma once

#include <cstddef>

extern "C" {
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c,
                 int ldc);
int MKL_Set_Num_Threads_Local(int nt);
// A matrix packed once (cblas_sgemm_pack) and used by many products (cblas_sgemm_compute).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest);
void cblas_sgemm_compute(int layout, int trans_a, int trans_b, int m, int n, int k,
                         const float* a, int lda, const float* b, int ldb, float beta, float* c,
                         int ldc);
}
