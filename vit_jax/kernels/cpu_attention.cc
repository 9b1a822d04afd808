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
// float32 or bfloat16 (a handler of each): in bf16 the matmuls take pairs of bf16 (AVX512-BF16's vdpbf16ps where
// the CPU has it) and accumulate in fp32, and the softmax is fp32.
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

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

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
typedef uint32_t vu __attribute__((vector_size(kW * sizeof(uint32_t)), aligned(4)));

typedef uint16_t vh __attribute__((vector_size(kW * sizeof(uint16_t)), aligned(2)));  // bf16s, as their bits

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline vf load(const uint16_t* p) {  // bf16 -> fp32: the bits shifted to the top half
  vh h; std::memcpy(&h, p, sizeof(h));
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
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

// The multiply-add of the matmuls below, for two element types. float: acc += a * b, a broadcast. uint32_t: a pair
// of bf16 along the contracted dimension in each 32-bit word (the lower half the even index), acc += a0 b0 + a1 b1
// in fp32: AVX512-BF16's vdpbf16ps where the CPU has it (twice the FLOPs of an fp32 FMA per instruction), elsewhere
// the same sum with the halves widened to fp32 (exact: a bf16 is the top half of a float). Acc is the accumulator's
// type: the intrinsic's own for vdpbf16ps, which GCC otherwise spilled to the stack at every step.
template <typename T> struct Madd;
template <> struct Madd<float> {
  typedef vf B;
  typedef vf Acc;
  static Acc zero() { return vf{}; }
  static B load_b(const float* p) { return load(p); }
  static Acc step(Acc acc, float a, B b) { return acc + splat(a) * b; }
  static void store_c(float* p, Acc acc) { store(p, acc); }
};
#if defined(__AVX512BF16__) && defined(__AVX512F__)
template <> struct Madd<uint32_t> {
  typedef __m512i B;
  typedef __m512 Acc;
  static Acc zero() { return _mm512_setzero_ps(); }
  static B load_b(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static Acc step(Acc acc, uint32_t a, B b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(int(a)), (__m512bh)b);
  }
  static void store_c(float* p, Acc acc) { _mm512_storeu_ps(p, acc); }
};
#else
template <> struct Madd<uint32_t> {
  typedef vu B;
  typedef vf Acc;
  static Acc zero() { return vf{}; }
  static B load_b(const uint32_t* p) { B v; std::memcpy(&v, p, sizeof(v)); return v; }
  static Acc step(Acc acc, uint32_t a, B b) {
    const vf b0 = (vf)(b << 16), b1 = (vf)(b & 0xffff0000u);
    float a0, a1;
    const uint32_t w0 = a << 16, w1 = a & 0xffff0000u;
    std::memcpy(&a0, &w0, 4); std::memcpy(&a1, &w1, 4);
    return acc + splat(a0) * b0 + splat(a1) * b1;
  }
  static void store_c(float* p, Acc acc) { store(p, acc); }
};
#endif

// C[R rows, 16*V columns] = A B, with A[r][k] = a[r * ars + k * aks] and B[k][:] = b + k * ldb (in elements of T:
// floats, or words of two bf16, for which k counts pairs). The accumulators stay in registers for the whole k loop;
// A's entries are broadcast, B's rows loaded.
template <int R, int V, typename T>
inline void block(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, int K, float* c, int64_t ldc) {
  typename Madd<T>::Acc acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = Madd<T>::zero();
  for (int k = 0; k < K; ++k) {
    typename Madd<T>::B bk[V];
    for (int v = 0; v < V; ++v) bk[v] = Madd<T>::load_b(b + k * ldb + v * kW);
    for (int r = 0; r < R; ++r) {
      const T ar = a[r * ars + k * aks];
      for (int v = 0; v < V; ++v) acc[r][v] = Madd<T>::step(acc[r][v], ar, bk[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) Madd<T>::store_c(c + r * ldc + v * kW, acc[r][v]);
}

// The same for the last, shorter, block of rows: a kernel per row count, as the loop bounds must be constants.
template <int R, int V, typename T>
inline void tail_block(int rows, const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, int K, float* c,
                       int64_t ldc) {
  if constexpr (R > 1) {
    if (rows == R - 1) return block<R - 1, V>(a, ars, aks, b, ldb, K, c, ldc);
    return tail_block<R - 1, V>(rows, a, ars, aks, b, ldb, K, c, ldc);
  } else {
    block<1, V>(a, ars, aks, b, ldb, K, c, ldc);
  }
}

template <int R, int V, typename T>
inline void rows_block(int rows, const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, int K, float* c,
                       int64_t ldc) {
  if (rows == R) block<R, V>(a, ars, aks, b, ldb, K, c, ldc);
  else tail_block<R, V>(rows, a, ars, aks, b, ldb, K, c, ldc);
}

// C (M x 16*nv) = A (M x K) B (K x 16*nv), in blocks of R rows and V vectors (and narrower last blocks). Column
// panels outermost: a panel of B (K x 16*V) stays in L1 while the row blocks pass over it.
template <int R, int V, typename T>
void matmul(int M, int nv, const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, int K, float* c,
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

// C (M x 16 nv) = A B with the register blocks sized for the head dimension's nv vectors (see kW above).
template <typename T>
void matmul_blocked(int M, int nv, const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, int K, float* c,
                    int64_t ldc) {
  if (!kWideRegisters) return matmul<6, kNarrowV>(M, nv, a, ars, aks, b, ldb, K, c, ldc);
  switch (nv) {
    case 1: matmul<12, 1>(M, 1, a, ars, aks, b, ldb, K, c, ldc); break;
    case 2: matmul<12, 2>(M, 2, a, ars, aks, b, ldb, K, c, ldc); break;
    case 3: matmul<8, 3>(M, 3, a, ars, aks, b, ldb, K, c, ldc); break;
    case 4: matmul<6, 4>(M, 4, a, ars, aks, b, ldb, K, c, ldc); break;
    case 5: matmul<4, 5>(M, 5, a, ars, aks, b, ldb, K, c, ldc); break;
    case 6: matmul<4, 6>(M, 6, a, ars, aks, b, ldb, K, c, ldc); break;
    default: matmul<6, 4>(M, nv, a, ars, aks, b, ldb, K, c, ldc); break;
  }
}

// N tokens padded to whole vectors: the row length of a head's (N, Np) scores.
inline int padded(int N) { return (N + kW - 1) / kW * kW; }

#ifdef VIT_ATTENTION_BLAS
// The scores' padding columns (N..Np) zeroed, where a BLAS wrote only the first N.
void zero_padding(float* s, int N, int Np) {
  for (int i = 0; i < N; ++i)
    for (int j = N; j < Np; ++j) s[int64_t(i) * Np + j] = 0.0f;
}

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
  zero_padding(s, N, Np);
}
#else
// out (N x dh) = A (N x K) B (K x dh) for dh = 16 * nv, the head dimension in registers; B's and out's rows are
// ldb and ldc floats apart.
void matmul_dh(int N, int nv, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb, int K, float* c,
               int64_t ldc) {
  matmul_blocked(N, nv, a, ars, aks, b, ldb, K, c, ldc);
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
    const int Np = padded(N);
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

// Each row of the scores s (N x Np) -> its unnormalised probabilities exp(scale * s - max), in place, with the
// log-sum-exp of the row (lse) and 1 / its sum (inv).
void softmax_rows(float* s, int N, int Np, float scale, float* lse, float* inv) {
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
}

// One (batch, head). Its rows of q, k, v (and of dq, dk, dv) are ld floats apart, those of o and dout ldo apart.
void forward_head(int N, int dh, float scale, const float* q, const float* k, const float* v, int64_t ld, float* o,
                  int64_t ldo, float* lse, Scratch& w) {
  const int Np = w.reserve(N, dh);
  float* s = w.s.data();
  scores(N, Np, dh, q, ld, k, ld, w.t.data(), s);
  float inv[N];
  softmax_rows(s, N, Np, scale, lse, inv);
  matmul_dh(N, dh / kW, s, Np, 1, v, ld, N, o, ldo);  // unnormalised probabilities times V, then each row / its sum
  for (int i = 0; i < N; ++i)
    for (int d = 0; d < dh; d += kW) store(o + i * ldo + d, load(o + i * ldo + d) * inv[i]);
}

// dS = P * (dP - rowsum(dO * O)), times the logits' scale, in place of dP (ds); the rows of dO and O (float or bf16)
// are ldo apart.
template <typename E>
void score_gradient(int N, int Np, int dh, float scale, const float* p, const E* dout, const E* o, int64_t ldo,
                    float* ds) {
  for (int i = 0; i < N; ++i) {
    vf acc{};
    for (int d = 0; d < dh; d += kW) acc += load(dout + i * ldo + d) * load(o + i * ldo + d);
    float delta = 0.0f;
    for (int t = 0; t < kW; ++t) delta += acc[t];
    const float* prow = p + int64_t(i) * Np;
    float* drow = ds + int64_t(i) * Np;
    for (int j = 0; j < Np; j += kW) store(drow + j, load(prow + j) * (load(drow + j) - delta) * scale);
  }
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
  score_gradient(N, Np, dh, scale, p, dout, o, ldo, ds);  // dS
  matmul_dh(N, dh / kW, ds, Np, 1, k, ld, N, dq, ld);  // dQ = dS K
  matmul_dh(N, dh / kW, ds, 1, Np, q, ld, N, dk, ld);  // dK = dS^T Q
}

// ---- bfloat16: q, k, v, o and their gradients in bf16; the scores, softmax and every accumulation in fp32. ----
// As XLA computes a bf16 model's attention (encoder.softmax_attention), the probabilities and their gradient are
// rounded to bf16 for the matmuls that take them. A matmul's bf16 operands go in as words of two bf16 along the
// contracted dimension (Madd<uint32_t>), packed per head into scratch as each product needs them.

// fp32 -> bf16, rounded to nearest even (as XLA's convert); a NaN stays a NaN.
inline vh to_bf16(vf x) {
  const vu u = (vu)x;
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return __builtin_convertvector((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded, vh);
}

inline void store_bf16(uint16_t* p, vf x) { const vh h = to_bf16(x); std::memcpy(p, &h, sizeof(h)); }

struct ScratchBF16 {
  std::vector<float> s, ds, c;  // (N, Np) scores / probabilities, (N, Np) their gradient, (N, dh) a product
  std::vector<uint16_t> a, b;   // a product's operands in bf16: (Np, Np) and (Np, dh)
  int reserve(int N, int dh) {
    const int Np = padded(N);
    s.resize(int64_t(N) * Np); ds.resize(int64_t(N) * Np); c.resize(int64_t(N) * dh);
    a.resize(int64_t(Np) * Np); b.resize(int64_t(Np) * dh);
    return Np;
  }
};

// A (N x Np fp32, its padding columns zero) in bf16, row-major (N x Np).
void to_bf16_rows(const float* a, int N, int Np, uint16_t* out) {
  for (int64_t i = 0; i < N; ++i)
    for (int j = 0; j < Np; j += kW) store_bf16(out + i * Np + j, load(a + i * Np + j));
}

// Rows of X (fp32 or bf16; `rows` of them, ld apart, each of `cols` values) interleaved in pairs as words of two
// bf16: out[r / 2][c] = (X[r][c], X[r + 1][c]), (pairs x cols) words, zero past the last row. As a matmul's B, its
// rows are the pairs of the contracted dimension; as its A (strided: ars = 1, aks = cols), X transposed.
template <typename E>
void pairs_of_rows(const E* x, int64_t ld, int rows, int pairs, int cols, uint32_t* out) {
  for (int64_t r = 0; r < 2 * pairs; r += 2)
    for (int c = 0; c < cols; c += kW) {
      const vu lo = r < rows ? __builtin_convertvector(to_bf16(load(x + r * ld + c)), vu) : vu{};
      const vu hi = r + 1 < rows ? __builtin_convertvector(to_bf16(load(x + (r + 1) * ld + c)), vu) : vu{};
      const vu word = lo | (hi << 16);
      std::memcpy(out + r / 2 * cols + c, &word, sizeof(word));
    }
}

#ifdef VIT_ATTENTION_BLAS
extern "C" void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc);

// S (N x Np) = X Y^T for X, Y of N rows of dh bf16 (ldx, ldy apart), its padding columns zero.
void scores(int N, int Np, int dh, const uint16_t* x, int64_t ldx, const uint16_t* y, int64_t ldy, ScratchBF16&,
            float* s) {
  cblas_gemm_bf16bf16f32(101, 111, 112, N, N, dh, 1.0f, x, int(ldx), y, int(ldy), 0.0f, s, Np);
  zero_padding(s, N, Np);
}

// C (N x dh) = op(A) B: A (N x Np fp32, rounded to bf16 here), op(A) = A or A^T; B (N x dh bf16, rows ldb apart).
void matmul_dh(int N, int Np, int dh, const float* a, bool transposed, const uint16_t* b, int64_t ldb,
               ScratchBF16& w, float* c) {
  to_bf16_rows(a, N, Np, w.a.data());
  cblas_gemm_bf16bf16f32(101, transposed ? 112 : 111, 111, N, dh, N, 1.0f, w.a.data(), Np, b, int(ldb), 0.0f, c, dh);
}
#else
// S (N x Np) = X Y^T: Y^T written as words of pairs along dh, (dh / 2) x Np, zero past column N.
void scores(int N, int Np, int dh, const uint16_t* x, int64_t ldx, const uint16_t* y, int64_t ldy, ScratchBF16& w,
            float* s) {
  uint32_t* yt = reinterpret_cast<uint32_t*>(w.b.data());
  const int pairs = dh / 2;
  for (int j = 0; j < Np; ++j)
    for (int d = 0; d < pairs; ++d) {
      uint32_t word = 0;
      if (j < N) std::memcpy(&word, y + j * ldy + 2 * d, 4);
      yt[int64_t(d) * Np + j] = word;
    }
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(x);  // a row's dh values are dh / 2 pairs as they lie
  if (kWideRegisters) matmul<6, 4>(N, Np / kW, xw, ldx / 2, 1, yt, Np, pairs, s, Np);
  else matmul<6, kNarrowV>(N, Np / kW, xw, ldx / 2, 1, yt, Np, pairs, s, Np);
}

// C (N x dh) = op(A) B as above. A in bf16 is read as words of pairs along its rows; A^T as A's pairs of rows
// (strided); B is written as pairs of its rows ((Np / 2) x dh words, zero past row N).
void matmul_dh(int N, int Np, int dh, const float* a, bool transposed, const uint16_t* b, int64_t ldb,
               ScratchBF16& w, float* c) {
  uint32_t* aw = reinterpret_cast<uint32_t*>(w.a.data());
  uint32_t* bp = reinterpret_cast<uint32_t*>(w.b.data());
  const int pairs = Np / 2;
  pairs_of_rows(b, ldb, N, pairs, dh, bp);
  if (transposed) {
    pairs_of_rows(a, Np, N, pairs, Np, aw);
    matmul_blocked(N, dh / kW, aw, 1, Np, bp, dh, pairs, c, dh);
  } else {
    to_bf16_rows(a, N, Np, w.a.data());
    matmul_blocked(N, dh / kW, aw, pairs, 1, bp, dh, pairs, c, dh);
  }
}
#endif  // VIT_ATTENTION_BLAS

void forward_head(int N, int dh, float scale, const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t ld,
                  uint16_t* o, int64_t ldo, float* lse, ScratchBF16& w) {
  const int Np = w.reserve(N, dh);
  float* s = w.s.data();
  float* c = w.c.data();
  scores(N, Np, dh, q, ld, k, ld, w, s);
  float inv[N];
  softmax_rows(s, N, Np, scale, lse, inv);
  matmul_dh(N, Np, dh, s, false, v, ld, w, c);
  for (int i = 0; i < N; ++i)
    for (int d = 0; d < dh; d += kW) store_bf16(o + i * ldo + d, load(c + i * dh + d) * inv[i]);
}

void backward_head(int N, int dh, float scale, const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t ld,
                   const uint16_t* o, const uint16_t* dout, int64_t ldo, const float* lse, uint16_t* dq,
                   uint16_t* dk, uint16_t* dv, ScratchBF16& w) {
  const int Np = w.reserve(N, dh);
  float* p = w.s.data();
  float* ds = w.ds.data();
  float* c = w.c.data();
  auto write = [&](uint16_t* out) {
    for (int i = 0; i < N; ++i)
      for (int d = 0; d < dh; d += kW) store_bf16(out + i * ld + d, load(c + i * dh + d));
  };
  scores(N, Np, dh, q, ld, k, ld, w, p);
  for (int i = 0; i < N; ++i) probabilities(p + int64_t(i) * Np, N, Np, scale, lse[i]);
  matmul_dh(N, Np, dh, p, true, dout, ldo, w, c);  // dV = P^T dO
  write(dv);
  scores(N, Np, dh, dout, ldo, v, ld, w, ds);      // dP = dO V^T
  score_gradient(N, Np, dh, scale, p, dout, o, ldo, ds);  // dS
  matmul_dh(N, Np, dh, ds, false, k, ld, w, c);  // dQ = dS K
  write(dq);
  matmul_dh(N, Np, dh, ds, true, q, ld, w, c);   // dK = dS^T Q
  write(dk);
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

// The element type of each FFI dtype, and the scratch its heads take.
template <ffi::DataType T> struct Element;
template <> struct Element<ffi::F32> { typedef float type; typedef Scratch scratch; };
template <> struct Element<ffi::BF16> { typedef uint16_t type; typedef ScratchBF16 scratch; };

// qkv (B, N, 3, H, dh) -> o (B, N, H, dh) and the log-sum-exp of each row of scores, lse (B, H, N), in fp32.
template <ffi::DataType T>
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<T> qkv, float scale, ffi::ResultBuffer<T> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  typedef typename Element<T>::type E;
  Shape x;
  if (auto e = check(qkv.dimensions(), x); e.failure()) return e;
  const E* qkv_data = reinterpret_cast<const E*>(qkv.typed_data());
  E* o_data = reinterpret_cast<E*>(o->typed_data());
  vit_jax::parallel_for<typename Element<T>::scratch>(pool, x.batch * x.heads, [&](int64_t i, auto& w) {
    const E* q = qkv_data + x.q_offset(i);
    const int64_t k = x.ldo(), v = 2 * x.ldo();
    forward_head(x.N, x.dh, scale, q, q + k, q + v, x.ld(), o_data + x.o_offset(i), x.ldo(),
                 lse->typed_data() + i * x.N, w);
  });
  return ffi::Error::Success();
}

// qkv, o, lse and dout (the gradient of o) -> dqkv (B, N, 3, H, dh).
template <ffi::DataType T>
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<T> qkv, ffi::Buffer<T> o, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<T> dout, float scale, ffi::ResultBuffer<T> dqkv) {
  typedef typename Element<T>::type E;
  Shape x;
  if (auto e = check(qkv.dimensions(), x); e.failure()) return e;
  const E* qkv_data = reinterpret_cast<const E*>(qkv.typed_data());
  const E* o_data = reinterpret_cast<const E*>(o.typed_data());
  const E* dout_data = reinterpret_cast<const E*>(dout.typed_data());
  E* dqkv_data = reinterpret_cast<E*>(dqkv->typed_data());
  vit_jax::parallel_for<typename Element<T>::scratch>(pool, x.batch * x.heads, [&](int64_t i, auto& w) {
    const E* q = qkv_data + x.q_offset(i);
    E* dq = dqkv_data + x.q_offset(i);
    const int64_t k = x.ldo(), v = 2 * x.ldo();
    backward_head(x.N, x.dh, scale, q, q + k, q + v, x.ld(), o_data + x.o_offset(i), dout_data + x.o_offset(i),
                  x.ldo(), lse.typed_data() + i * x.N, dq, dq + k, dq + v, w);
  });
  return ffi::Error::Success();
}

}  // namespace

#define VIT_ATTENTION_HANDLERS(SUFFIX, T)                                                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(VitAttentionForward##SUFFIX, Forward<T>,                                              \
                                ffi::Ffi::Bind()                                                                      \
                                    .Ctx<ffi::ThreadPool>()                                                           \
                                    .Arg<ffi::Buffer<T>>()                                                            \
                                    .Attr<float>("scale")                                                             \
                                    .Ret<ffi::Buffer<T>>()                                                            \
                                    .Ret<ffi::Buffer<ffi::F32>>());                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(VitAttentionBackward##SUFFIX, Backward<T>,                                            \
                                ffi::Ffi::Bind()                                                                      \
                                    .Ctx<ffi::ThreadPool>()                                                           \
                                    .Arg<ffi::Buffer<T>>()                                                            \
                                    .Arg<ffi::Buffer<T>>()                                                            \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                                     \
                                    .Arg<ffi::Buffer<T>>()                                                            \
                                    .Attr<float>("scale")                                                             \
                                    .Ret<ffi::Buffer<T>>());

VIT_ATTENTION_HANDLERS(, ffi::F32)
VIT_ATTENTION_HANDLERS(BF16, ffi::BF16)
