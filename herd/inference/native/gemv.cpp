// herd's native CPU kernels: matrix-vector products over int8 weights, for decode at batch 1.
//
// Decode at batch 1 reads every active weight once per token, so its speed is the rate at which a
// kernel streams weights from memory. torch's weight-only int8 kernel converts each weight to
// float inside a loop that is compute-bound (slower per byte than bf16), and fbgemm's dynamic
// linear is a GEMM that pays its packing and quantization machinery for one row. These two
// kernels stream int8 rows at close to memory bandwidth:
//
//   w8a16: y[n] = s[n] · Σ_k q[n,k] · x[k]           (weight-only: x stays in float, exact maths)
//   w8a8:  y[n] = s[n] · Σ_b d[b] · Σ_{k∈b} q[n,k] · xq[k]
//          x quantized to int8 per block of 64 values, x[k] ≈ d[b] · xq[k]  (llama.cpp's Q8_0 idea,
//          blocks of 64 instead of 32), the block sums on VNNI int8 dot-product instructions.
//
// q int8 [N, K] row-major, s float32 [N], x float32 or bfloat16 [K] → y [N] in x's dtype; float32
// accumulation. Rows are split across torch's intra-op threads (at::parallel_for); four rows at a
// time share each load of x. Needs AVX-512 (F, BW, VL) and, for w8a8, AVX-512 VNNI; K % 64 == 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;  // values per activation block (one 512-bit register of int8)
constexpr int64_t kRows = 4;    // rows per inner loop
constexpr int64_t kGrain = 32;  // rows per parallel task, at least

// Each loop over a group of kRows rows also asks for the same bytes of the next group: software
// prefetch one group ahead lets both cores keep ~29 GB/s in flight on this machine, against
// ~20 GB/s from the hardware prefetchers alone (rows 1–2 KB apart defeat their stride detection).
inline void prefetch(const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

void check(const at::Tensor& q, const at::Tensor& s, const at::Tensor& x) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be a contiguous int8 [N, K]");
  TORCH_CHECK(s.dim() == 1 && s.scalar_type() == at::kFloat && s.is_contiguous() && s.size(0) == q.size(0),
              "s must be a contiguous float32 [N]");
  TORCH_CHECK(x.dim() == 1 && x.size(0) == q.size(1), "x must be [K] with K = q.size(1)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(q.size(1) % kBlock == 0, "K must be a multiple of 64");
}

// x [K] (float32 or bfloat16) → float32 copy, contiguous
std::vector<float> to_float(const at::Tensor& x) {
  const int64_t K = x.size(0);
  std::vector<float> out(K);
  auto xc = x.contiguous();
  if (xc.scalar_type() == at::kFloat) {
    const float* p = xc.data_ptr<float>();
    std::copy(p, p + K, out.begin());
  } else {
    const at::BFloat16* p = xc.data_ptr<at::BFloat16>();
    for (int64_t k = 0; k < K; k++) out[k] = static_cast<float>(p[k]);
  }
  return out;
}

// Runs rows(out, n0, n1) over [0, N) on torch's intra-op threads; out is y's data as float or bf16.
template <typename F>
at::Tensor over_rows(int64_t N, const at::Tensor& x, F rows) {
  auto y = at::empty({N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    float* out = y.data_ptr<float>();
    at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) { rows(out, b, e); });
  } else {
    at::BFloat16* out = y.data_ptr<at::BFloat16>();
    at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) { rows(out, b, e); });
  }
  return y;
}

// ---- w8a16 ---------------------------------------------------------------------------------------
inline __m512 widen(const int8_t* p) {  // 16 int8 → 16 float32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <int R, typename Out>
void w8a16_rows(const int8_t* q, const float* s, const float* x, Out* y, int64_t n, int64_t K) {
  __m512 acc[R];
  for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kBlock) {  // one 64-byte line of each row per step
    for (int i = 0; i < R; i++) prefetch(q + (n + i + R) * K + k);
    for (int64_t j = 0; j < kBlock; j += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k + j);
      for (int i = 0; i < R; i++) acc[i] = _mm512_fmadd_ps(widen(q + (n + i) * K + k + j), xv, acc[i]);
    }
  }
  for (int i = 0; i < R; i++) y[n + i] = static_cast<Out>(s[n + i] * _mm512_reduce_add_ps(acc[i]));
}

at::Tensor w8a16(const at::Tensor& q, const at::Tensor& s, const at::Tensor& x) {
  check(q, s, x);
  const int64_t N = q.size(0), K = q.size(1);
  const std::vector<float> xf = to_float(x);
  const int8_t* Q = q.data_ptr<int8_t>();
  const float* S = s.data_ptr<float>();
  return over_rows(N, x, [&](auto* y, int64_t b, int64_t e) {
    int64_t n = b;
    for (; n + kRows <= e; n += kRows) w8a16_rows<kRows>(Q, S, xf.data(), y, n, K);
    for (; n < e; n++) w8a16_rows<1>(Q, S, xf.data(), y, n, K);
  });
}

// ---- w8a8 ----------------------------------------------------------------------------------------
// dpbusd multiplies unsigned by signed bytes, so x is stored as |xq| (unsigned) and its signs move
// onto the weights: q·xq = (±q)·|xq|. q ∈ [-127, 127], so negating a weight never overflows.
struct QuantizedX {
  std::vector<uint8_t> mag;    // |xq| [K]
  std::vector<uint64_t> sign;  // bit k%64 of word k/64: xq[k] < 0
  std::vector<float> scale;    // d [K/64]
};

QuantizedX quantize_x(const std::vector<float>& x) {
  const int64_t K = static_cast<int64_t>(x.size()), B = K / kBlock;
  QuantizedX out{std::vector<uint8_t>(K), std::vector<uint64_t>(B), std::vector<float>(B)};
  for (int64_t b = 0; b < B; b++) {
    const float* xb = x.data() + b * kBlock;
    float amax = 0.f;
    for (int64_t j = 0; j < kBlock; j++) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    uint64_t sign = 0;
    for (int64_t j = 0; j < kBlock; j++) {
      const int v = static_cast<int>(std::nearbyint(xb[j] * inv));  // round half to even, |v| ≤ 127
      out.mag[b * kBlock + j] = static_cast<uint8_t>(v < 0 ? -v : v);
      if (v < 0) sign |= uint64_t(1) << j;
    }
    out.sign[b] = sign;
    out.scale[b] = d;
  }
  return out;
}

template <int R, typename Out>
void w8a8_rows(const int8_t* q, const float* s, const QuantizedX& xq, Out* y, int64_t n, int64_t K) {
  __m512 acc[R];
  for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t b = 0; b < K / kBlock; b++) {
    const __m512i mag = _mm512_loadu_si512(xq.mag.data() + b * kBlock);
    const __mmask64 neg = xq.sign[b];
    const __m512 d = _mm512_set1_ps(xq.scale[b]);
    for (int i = 0; i < R; i++) {
      const int8_t* row = q + (n + i) * K + b * kBlock;
      prefetch(row + R * K);
      __m512i w = _mm512_loadu_si512(row);
      w = _mm512_mask_sub_epi8(w, neg, zero, w);                   // ±q
      const __m512i dot = _mm512_dpbusd_epi32(zero, mag, w);      // 16 sums of 4 products
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, acc[i]);
    }
  }
  for (int i = 0; i < R; i++) y[n + i] = static_cast<Out>(s[n + i] * _mm512_reduce_add_ps(acc[i]));
}

at::Tensor w8a8(const at::Tensor& q, const at::Tensor& s, const at::Tensor& x) {
  check(q, s, x);
  const int64_t N = q.size(0), K = q.size(1);
  const QuantizedX xq = quantize_x(to_float(x));
  const int8_t* Q = q.data_ptr<int8_t>();
  const float* S = s.data_ptr<float>();
  return over_rows(N, x, [&](auto* y, int64_t b, int64_t e) {
    int64_t n = b;
    for (; n + kRows <= e; n += kRows) w8a8_rows<kRows>(Q, S, xq, y, n, K);
    for (; n < e; n++) w8a8_rows<1>(Q, S, xq, y, n, K);
  });
}

// ---- bf16 ----------------------------------------------------------------------------------------
// y[n] = Σ_k w[n,k] · x[k] for bf16 w and x: vdpbf16ps multiplies 32 bf16 pairs exactly and adds
// them into 16 float32 lanes. Only built into the running code where the CPU has AVX512-BF16.
template <int R>
__attribute__((target("avx512bf16"))) void bf16_rows(const uint16_t* w, const uint16_t* x, at::BFloat16* y,
                                                      int64_t n, int64_t K) {
  __m512 acc[R][2];
  for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {  // two 64-byte lines of each row per step
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + k), x1 = (__m512bh)_mm512_loadu_si512(x + k + 32);
    for (int i = 0; i < R; i++) {
      const uint16_t* row = w + (n + i) * K + k;
      prefetch(row + R * K);
      prefetch(row + R * K + 32);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_loadu_si512(row), x0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)_mm512_loadu_si512(row + 32), x1);
    }
  }
  for (int i = 0; i < R; i++) y[n + i] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1])));
}

at::Tensor bf16(const at::Tensor& w, const at::Tensor& x) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "w must be a contiguous bf16 [N, K]");
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kBFloat16 && x.size(0) == w.size(1), "x must be bf16 [K]");
  TORCH_CHECK(w.size(1) % kBlock == 0, "K must be a multiple of 64");
  const int64_t N = w.size(0), K = w.size(1);
  const auto xc = x.contiguous();
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const uint16_t* X = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  auto y = at::empty({N}, x.options());
  at::BFloat16* Y = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
    int64_t n = b;
    for (; n + kRows <= e; n += kRows) bf16_rows<kRows>(W, X, Y, n, K);
    for (; n < e; n++) bf16_rows<1>(W, X, Y, n, K);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(herd_native, m) {
  m.def("bf16_gemv(Tensor w, Tensor x) -> Tensor", bf16);
  m.def("w8a16_gemv(Tensor q, Tensor s, Tensor x) -> Tensor", w8a16);
  m.def("w8a8_gemv(Tensor q, Tensor s, Tensor x) -> Tensor", w8a8);
}
