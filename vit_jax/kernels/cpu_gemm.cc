// Matrix products for XLA:CPU through a BLAS library (Intel MKL), as XLA FFI handlers.
//
//   C = op(A) op(B)       row-major; op(X) is X or X^T by the attributes trans_a, trans_b
//
// Why: XLA:CPU's own dot is fast on some CPUs and not on others (at ViT-Ti's projection shapes on an Intel Xeon it
// ran at ~40% of the fp32 matmul peak, and it never uses AMX for bf16), while MKL's kernels are tuned per CPU, AMX
// included (cblas_gemm_bf16bf16f32). Which of the two a shape takes is measured on the machine (cpu_gemm.py).
//
// Threads: MKL runs sequentially in each call (linked to its sequential layer) and the product is split into one
// tile per thread of XLA's intra-op pool (rows of C, or columns where C has more of them), so no MKL threads compete
// with XLA's.
// The bf16 handler accumulates in fp32 and writes fp32: XLA rounds to bf16 where the model asks, fused with the
// bias add that follows.

#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

// MKL's CBLAS interface (mkl_cblas.h, LP64: MKL_INT is int), declared here so that only the library is needed.
extern "C" {
enum { CblasRowMajor = 101 };
enum { CblasNoTrans = 111, CblasTrans = 112 };
void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
}

namespace {

struct NoScratch {};

// C (rows, cols) = op(A) (rows, depth) op(B) (depth, cols), split into tiles of rows or of columns.
template <typename T, typename Gemm>
ffi::Error product(ffi::ThreadPool& pool, const T* a, ffi::Span<const int64_t> a_dims, const T* b,
                   ffi::Span<const int64_t> b_dims, bool trans_a, bool trans_b, float* c,
                   ffi::Span<const int64_t> c_dims, Gemm gemm) {
  if (a_dims.size() != 2 || b_dims.size() != 2 || c_dims.size() != 2)
    return ffi::Error::InvalidArgument("gemm expects 2-D operands and result");
  const int64_t rows = trans_a ? a_dims[1] : a_dims[0], depth = trans_a ? a_dims[0] : a_dims[1];
  const int64_t cols = trans_b ? b_dims[0] : b_dims[1];
  if ((trans_b ? b_dims[1] : b_dims[0]) != depth || c_dims[0] != rows || c_dims[1] != cols)
    return ffi::Error::InvalidArgument("gemm operands' shapes do not match");
  const int64_t limit = int64_t(1) << 31;
  if (a_dims[0] * a_dims[1] >= limit || b_dims[0] * b_dims[1] >= limit || rows * cols >= limit)
    return ffi::Error::InvalidArgument("gemm operands over 2^31 elements (MKL's LP64 interface)");
  const int lda = a_dims[1], ldb = b_dims[1], ldc = cols;
  const int ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  // Tiles of at least 32 rows or columns, one per thread at most.
  const bool by_rows = rows >= cols;
  const int64_t extent = by_rows ? rows : cols;
  const int64_t tiles = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads() + 1, extent / 32));
  const int64_t step = (extent + tiles - 1) / tiles;
  vit_jax::parallel_for<NoScratch>(pool, tiles, [&](int64_t t, NoScratch&) {
    const int64_t lo = t * step, hi = std::min(extent, lo + step);
    if (lo >= hi) return;
    if (by_rows)
      gemm(CblasRowMajor, ta, tb, int(hi - lo), int(cols), int(depth), 1.0f, a + (trans_a ? lo : lo * lda), lda, b,
           ldb, 0.0f, c + lo * ldc, ldc);
    else
      gemm(CblasRowMajor, ta, tb, int(rows), int(hi - lo), int(depth), 1.0f, a, lda,
           b + (trans_b ? lo * ldb : lo), ldb, 0.0f, c + lo, ldc);
  });
  return ffi::Error::Success();
}

ffi::Error GemmF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, bool trans_a,
                   bool trans_b, ffi::ResultBuffer<ffi::F32> c) {
  return product(pool, a.typed_data(), a.dimensions(), b.typed_data(), b.dimensions(), trans_a, trans_b,
                 c->typed_data(), c->dimensions(), cblas_sgemm);
}

ffi::Error GemmBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, bool trans_a,
                    bool trans_b, ffi::ResultBuffer<ffi::F32> c) {
  return product(pool, reinterpret_cast<const uint16_t*>(a.typed_data()), a.dimensions(),
                 reinterpret_cast<const uint16_t*>(b.typed_data()), b.dimensions(), trans_a, trans_b,
                 c->typed_data(), c->dimensions(), cblas_gemm_bf16bf16f32);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitGemmF32, GemmF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitGemmBF16, GemmBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Ret<ffi::Buffer<ffi::F32>>());
