// Fused softmax attention for XLA:CPU, forward and backward, as XLA FFI handlers.
//
//   O = softmax(scale * Q K^T) V                      for each (batch, head): Q, K, V, O of shape (N, dh)
//
// Layouts are token-major, as the projections around attention read and write them: the input is the qkv
// projection's output (B, N, 3, H, dh) = [q | k | v] as it is, the output (B, N, H, dh) goes straight into the
// output projection, and the backward pass writes dqkv (B, N, 3, H, dh) for the qkv projection's backward. A head's
// rows are then strided (3 H dh floats apart in qkv), but no transpose of the activations is ever made: in
// XLA's head-major alternative, slicing and transposing q, k, v and their gradients took ~5% of ViT-Ti's step.
//
// Why: at ViT-Ti shapes (N = 197, dh = 64) XLA:CPU runs the attention as separate batched matmuls with the
// (N, N) scores written to memory between them, at ~35% of the machine's matmul peak. Here each (batch, head)
// is done whole while its (N, N) scores sit in the core's L2 cache, and the matmuls use one register-blocked
// kernel. The backward pass recomputes the probabilities from the saved log-sum-exp (as flash attention does)
// rather than storing them: one extra N x N x dh matmul against two (N, N) arrays written and read per head.
//
// Vectors are GCC vector extensions, so the same source compiles to AVX-512, AVX2 or NEON with -march=native.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

// Floats per vector: one AVX-512 register, two of AVX2 (whose 16 registers of 8 floats could not hold AVX-512's
// register blocks: every accumulator spilled, and ViT-Ti's step ran 4x slower than with XLA's attention on an AVX2
// EPYC), four of NEON. The register blocks below (R rows x V vectors of accumulators) are sized for 32 registers of
// 16 floats on AVX-512; elsewhere every matmul takes 6 x 16-float blocks (12 AVX2 or 24 NEON accumulators).
#if defined(__AVX512F__)
constexpr int kW = 16;
constexpr bool kWideRegisters = true;
#elif defined(__AVX__)
constexpr int kW = 8;
constexpr bool kWideRegisters = false;
#else
constexpr int kW = 16;
constexpr bool kWideRegisters = false;
#endif
constexpr int kNarrowV = 16 / kW;  // vectors per 16 floats: the width of the narrow blocks

typedef float vf __attribute__((vector_size(kW * sizeof(float)), aligned(4)));
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t)), aligned(4)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// exp(x) for x <= 0 (every caller subtracts a row maximum or the log-sum-exp): 2^n * p(r), r = x - n ln 2,
// |r| <= ln(2) / 2, p the degree-6 Taylor polynomial (truncation error ~1e-7 relative).
inline vf exp_nonpositive(vf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;  // exp(-87) ~ 1.6e-38: still a normal float
  const vf n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f + (x < 0 ? -0.5f : 0.5f), vi), vf);
  const vf r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  vf p = splat(1.0f / 720);
  p = p * r + 1.0f / 120; p = p * r + 1.0f / 24; p = p * r + 1.0f / 6; p = p * r + 0.5f; p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale; std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// C[R rows, 16*V columns] = A B, with A[r][k] = a[r * ars + k * aks] and B[k][:] = b + k * ldb. The
// accumulators stay in registers for the whole k loop; A's entries are broadcast, B's rows loaded.
template <int R, int V>
inline void block(const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, int K, float* c,
                  int64_t ldc) {
  vf acc[R][V] = {};
  for (int k = 0; k < K; ++k) {
    vf bk[V];
    for (int v = 0; v < V; ++v) bk[v] = load(b + k * ldb + v * kW);
    for (int r = 0; r < R; ++r) {
      const vf ar = splat(a[r * ars + k * aks]);
      for (int v = 0; v < V; ++v) acc[r][v] += ar * bk[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store(c + r * ldc + v * kW, acc[r][v]);
}

// The same for the last, shorter, block of rows: a kernel per row count, as the loop bounds must be constants.
template <int R, int V>
inline void tail_block(int rows, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, int K,
                       float* c, int64_t ldc) {
  if constexpr (R > 1) {
    if (rows == R - 1) return block<R - 1, V>(a, ars, aks, b, ldb, K, c, ldc);
    return tail_block<R - 1, V>(rows, a, ars, aks, b, ldb, K, c, ldc);
  } else {
    block<1, V>(a, ars, aks, b, ldb, K, c, ldc);
  }
}

template <int R, int V>
inline void rows_block(int rows, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, int K,
                       float* c, int64_t ldc) {
  if (rows == R) block<R, V>(a, ars, aks, b, ldb, K, c, ldc);
  else tail_block<R, V>(rows, a, ars, aks, b, ldb, K, c, ldc);
}

// C (M x 16*nv) = A (M x K) B (K x 16*nv), in blocks of R rows and V vectors (and narrower last blocks). Column
// panels outermost: a panel of B (K x 16*V) stays in L1 while the row blocks pass over it.
template <int R, int V>
void matmul(int M, int nv, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, int K, float* c,
            int64_t ldc) {
  auto panel = [&](auto width, int v) {
    constexpr int W = decltype(width)::value;
    for (int i = 0; i < M; i += R)
      rows_block<R, W>(std::min(R, M - i), a + i * ars, ars, aks, b + v * kW, ldb, K, c + i * ldc + v * kW, ldc);
  };
  int v = 0;
  for (; v + V <= nv; v += V) panel(std::integral_constant<int, V>{}, v);
  for (; v + 2 <= nv; v += 2) panel(std::integral_constant<int, 2>{}, v);
  for (; v < nv; ++v) panel(std::integral_constant<int, 1>{}, v);
}

#ifdef VIT_ATTENTION_BLAS
// The BLAS variant (cpu_attention.py builds both and measures which is faster here): the same two matmul shapes
// through MKL's cblas_sgemm, sequential inside each (batch, head), as the register-blocked kernels below are.
extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

// out (N x 16 nv) = A (N x K) B (K x 16 nv), A row-major (aks = 1) or transposed (ars = 1).
void matmul_dh(int N, int nv, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, int K, float* c,
               int64_t ldc) {
  const bool row_major = aks == 1;
  cblas_sgemm(101, row_major ? 111 : 112, 111, N, nv * kW, K, 1.0f, a, int(row_major ? ars : aks), b, int(ldb),
              0.0f, c, int(ldc));
}

// S (N x Np) = X Y^T, its padding columns zero.
void scores(int N, int Np, int dh, const float* x, int64_t ldx, const float* y, int64_t ldy, float*, float* s) {
  cblas_sgemm(101, 111, 112, N, N, dh, 1.0f, x, int(ldx), y, int(ldy), 0.0f, s, Np);
  for (int i = 0; i < N; ++i)
    for (int j = N; j < Np; ++j) s[int64_t(i) * Np + j] = 0.0f;
}
#else
// out (N x dh) = A (N x K) B (K x dh) for dh = 16 * nv, the head dimension in registers; B's and out's rows are
// ldb and ldc floats apart.
void matmul_dh(int N, int nv, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, int K, float* c,
               int64_t ldc) {
  if (!kWideRegisters) return matmul<6, kNarrowV>(N, nv, a, ars, aks, b, ldb, K, c, ldc);
  switch (nv) {
    case 1: matmul<12, 1>(N, 1, a, ars, aks, b, ldb, K, c, ldc); break;
    case 2: matmul<12, 2>(N, 2, a, ars, aks, b, ldb, K, c, ldc); break;
    case 3: matmul<8, 3>(N, 3, a, ars, aks, b, ldb, K, c, ldc); break;
    case 4: matmul<6, 4>(N, 4, a, ars, aks, b, ldb, K, c, ldc); break;
    case 5: matmul<4, 5>(N, 5, a, ars, aks, b, ldb, K, c, ldc); break;
    case 6: matmul<4, 6>(N, 6, a, ars, aks, b, ldb, K, c, ldc); break;
    default: matmul<6, 4>(N, nv, a, ars, aks, b, ldb, K, c, ldc); break;
  }
}

// S (N x Np) = X Y^T for X, Y of N rows of dh (ldx, ldy floats apart): Y is first written transposed and
// zero-padded to Np columns.
void scores(int N, int Np, int dh, const float* x, int64_t ldx, const float* y, int64_t ldy, float* yt, float* s) {
  // In 16 x 16 tiles, read a row of 16 and written a column at a time, so both sides stay in a few cache lines.
  for (int j0 = 0; j0 < Np; j0 += kW)
    for (int d0 = 0; d0 < dh; d0 += kW)
      for (int j = j0; j < j0 + kW; ++j)
        for (int d = d0; d < d0 + kW; ++d) yt[int64_t(d) * Np + j] = j < N ? y[int64_t(j) * ldy + d] : 0.0f;
  if (kWideRegisters) matmul<6, 4>(N, Np / kW, x, ldx, 1, yt, Np, dh, s, Np);
  else matmul<6, kNarrowV>(N, Np / kW, x, ldx, 1, yt, Np, dh, s, Np);
}
#endif  // VIT_ATTENTION_BLAS

struct Scratch {
  std::vector<float> s, ds, t;  // (N, Np) scores / probabilities, (N, Np) their gradient, (dh, Np) a transpose
  // Sizes the buffers for one head of N tokens and returns Np, N padded to whole vectors.
  int reserve(int N, int dh) {
    const int Np = (N + kW - 1) / kW * kW;
    s.resize(int64_t(N) * Np); ds.resize(int64_t(N) * Np); t.resize(int64_t(dh) * Np);
    return Np;
  }
};

// Row i of the probabilities, exp(scale * s - shift) over the first N columns, zero over the padding.
inline void probabilities(float* row, int N, int Np, float scale, float shift) {
  int j = 0;
  for (; j + kW <= N; j += kW) store(row + j, exp_nonpositive(load(row + j) * scale - shift));
  for (; j < Np; j += kW) {  // the last, partly padded, vector
    vf p = exp_nonpositive(load(row + j) * scale - shift);
    for (int l = 0; l < kW; ++l) if (j + l >= N) p[l] = 0.0f;
    store(row + j, p);
  }
}

// One (batch, head). Its rows of q, k, v (and of dq, dk, dv) are ld floats apart, those of o and dout ldo apart.
void forward_head(int N, int dh, float scale, const float* q, const float* k, const float* v, int64_t ld, float* o,
                  int64_t ldo, float* lse, Scratch& w) {
  const int Np = w.reserve(N, dh);
  float* s = w.s.data();
  scores(N, Np, dh, q, ld, k, ld, w.t.data(), s);
  float inv[N];
  for (int i = 0; i < N; ++i) {
    float* row = s + int64_t(i) * Np;
    vf mv = load(row);  // N >= 1; where N < 16 this reads padding, and only the first N lanes count below
    int j = kW;
    for (; j + kW <= N; j += kW) { const vf x = load(row + j); mv = mv > x ? mv : x; }
    float m = row[0];
    for (int t = 0; t < kW && t < N; ++t) m = std::max(m, mv[t]);
    for (; j < N; ++j) m = std::max(m, row[j]);
    m *= scale;  // scale > 0
    probabilities(row, N, Np, scale, m);
    vf acc{};
    for (int j = 0; j < Np; j += kW) acc += load(row + j);
    float l = 0.0f;
    for (int t = 0; t < kW; ++t) l += acc[t];
    inv[i] = 1.0f / l;
    lse[i] = m + std::log(l);
  }
  matmul_dh(N, dh / kW, s, Np, 1, v, ld, N, o, ldo);  // unnormalised probabilities times V, then each row / its sum
  for (int i = 0; i < N; ++i)
    for (int d = 0; d < dh; d += kW) store(o + i * ldo + d, load(o + i * ldo + d) * inv[i]);
}

void backward_head(int N, int dh, float scale, const float* q, const float* k, const float* v, int64_t ld,
                   const float* o, const float* dout, int64_t ldo, const float* lse, float* dq, float* dk, float* dv,
                   Scratch& w) {
  const int Np = w.reserve(N, dh);
  float* p = w.s.data();
  float* ds = w.ds.data();
  scores(N, Np, dh, q, ld, k, ld, w.t.data(), p);
  for (int i = 0; i < N; ++i) probabilities(p + int64_t(i) * Np, N, Np, scale, lse[i]);
  matmul_dh(N, dh / kW, p, 1, Np, dout, ldo, N, dv, ld);  // dV = P^T dO
  scores(N, Np, dh, dout, ldo, v, ld, w.t.data(), ds);    // dP = dO V^T
  for (int i = 0; i < N; ++i) {                            // dS = P * (dP - rowsum(dO * O)), times the logits' scale
    vf acc{};
    for (int d = 0; d < dh; d += kW) acc += load(dout + i * ldo + d) * load(o + i * ldo + d);
    float delta = 0.0f;
    for (int t = 0; t < kW; ++t) delta += acc[t];
    float* prow = p + int64_t(i) * Np;
    float* drow = ds + int64_t(i) * Np;
    for (int j = 0; j < Np; j += kW) store(drow + j, load(prow + j) * (load(drow + j) - delta) * scale);
  }
  matmul_dh(N, dh / kW, ds, Np, 1, k, ld, N, dq, ld);  // dQ = dS K
  matmul_dh(N, dh / kW, ds, 1, Np, q, ld, N, dk, ld);  // dK = dS^T Q
}

// The shape of an attention call, from qkv's dimensions (B, N, 3, H, dh).
struct Shape {
  int64_t batch, heads;
  int N, dh;
  int64_t ldo() const { return heads * dh; }  // floats between a head's rows of o, and from its q to its k in qkv
  int64_t ld() const { return 3 * ldo(); }    // floats between a head's rows of qkv
  // The i-th (batch, head)'s first q row in qkv and first row in o.
  int64_t q_offset(int64_t i) const { return (i / heads) * N * ld() + (i % heads) * dh; }
  int64_t o_offset(int64_t i) const { return (i / heads) * N * ldo() + (i % heads) * dh; }
};

ffi::Error check(ffi::Span<const int64_t> dims, Shape& shape) {
  if (dims.size() != 5 || dims[2] != 3)
    return ffi::Error::InvalidArgument("attention expects qkv of shape (B, N, 3, H, dh)");
  shape = {dims[0], dims[3], static_cast<int>(dims[1]), static_cast<int>(dims[4])};
  if (shape.dh % kW != 0)
    return ffi::Error::InvalidArgument("attention kernel needs a head dimension divisible by 16");
  return ffi::Error::Success();
}

// qkv (B, N, 3, H, dh) -> o (B, N, H, dh) and the log-sum-exp of each row of scores, lse (B, H, N).
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, float scale, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  Shape x;
  if (auto e = check(qkv.dimensions(), x); e.failure()) return e;
  vit_jax::parallel_for<Scratch>(pool, x.batch * x.heads, [&](int64_t i, Scratch& w) {
    const float* q = qkv.typed_data() + x.q_offset(i);
    const int64_t k = x.ldo(), v = 2 * x.ldo();
    forward_head(x.N, x.dh, scale, q, q + k, q + v, x.ld(), o->typed_data() + x.o_offset(i), x.ldo(),
                 lse->typed_data() + i * x.N, w);
  });
  return ffi::Error::Success();
}

// qkv, o, lse and dout (the gradient of o) -> dqkv (B, N, 3, H, dh).
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> o,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, float scale,
                    ffi::ResultBuffer<ffi::F32> dqkv) {
  Shape x;
  if (auto e = check(qkv.dimensions(), x); e.failure()) return e;
  vit_jax::parallel_for<Scratch>(pool, x.batch * x.heads, [&](int64_t i, Scratch& w) {
    const float* q = qkv.typed_data() + x.q_offset(i);
    float* dq = dqkv->typed_data() + x.q_offset(i);
    const int64_t k = x.ldo(), v = 2 * x.ldo();
    backward_head(x.N, x.dh, scale, q, q + k, q + v, x.ld(), o.typed_data() + x.o_offset(i),
                  dout.typed_data() + x.o_offset(i), x.ldo(), lse.typed_data() + i * x.N, dq, dq + k, dq + v, w);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VitAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
