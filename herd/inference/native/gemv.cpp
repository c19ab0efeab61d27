// herd's native CPU kernels for decode at batch 1: matrix-vector products (bf16 and int8 weights),
// single-query attention over the KV cache, and the step's elementwise work (norm, RoPE, SwiGLU).
//
// Decode at batch 1 reads every active weight once per token, so its speed is the rate at which a
// kernel streams weights from memory. torch.mv streams bf16 at ~23 GB/s on this project's machine;
// torch's weight-only int8 kernel widens each weight to float in a compute-bound loop (~10 GB/s), and
// fbgemm's dynamic int8 linear is a GEMM that pays its packing and quantization for one row. These
// kernels keep ~25–29 GB/s in flight with two threads:
//
//   int8 weights q [N, K] (row-major) with float32 scales s [N]:
//   y[n] = s[n] · Σ_b d[b] · Σ_{k∈b} q[n,k] · xq[k],   x[k] ≈ d[b] · xq[k] per block b of 64 values
//   w8a16: xq int16 (d = amax/32767): weight-only int8 in effect, x kept finer than bf16 keeps it;
//   w8a8:  xq int8 (d = amax/127): llama.cpp's Q8_0 idea (it uses blocks of 32), ~0.5% error.
//   Block sums on VNNI dot-product instructions (vpdpwssd, vpdpbusd), float32 across blocks.
//   bf16:  y = W x for bf16 W [N, K] and x [K] on vdpbf16ps (exact products, float32 sums).
//
// x float32 or bfloat16 [K] → y [N] in x's dtype. Rows are split across torch's intra-op threads
// (at::parallel_for); R rows at a time share each load of x. Needs AVX-512 (F, BW, VL) with VNNI,
// and AVX512-BF16 for the bf16 kernel (compiled for it, run only where the CPU has it); K % 64 == 0.
//
// Tuning (issue 19): the three products are compiled in every combination of three knobs, chosen per
// kernel at run time (set_gemv_tuning; herd/inference/native/autotune.py measures them once per CPU):
//   rows      R ∈ {1, 2, 4, 8}: rows per inner loop = independent accumulator chains sharing loads of
//             x (1: one row streamed at a time, as ggml's dot products run);
//   prefetch  P ∈ {0, 1, 2, 4}: software prefetch P row groups (P·R rows) ahead, 0 = hardware only;
//   chunk     C ∈ {0, 64, 256}: 0 = each thread streams one contiguous range of rows; C > 0 = chunks
//             of C rows dealt round-robin, so the threads read neighbouring memory at the same time.
// Every row is summed by the same instructions in the same order whatever the setting, so all
// variants give bit-identical results; only their speed differs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;  // values per activation block (one 512-bit register of int8)
constexpr int64_t kGrain = 32;  // rows per parallel task, at least

// Each loop over a group of R rows can also ask for the same bytes P groups ahead: on the Intel Xeon
// this was written on, software prefetch one group of 4 rows ahead let both cores keep ~29 GB/s in
// flight, against ~20 GB/s from the hardware prefetchers alone (rows 1–2 KB apart defeat their stride
// detection). How far ahead pays differs between CPUs, hence the knob.
inline void prefetch(const void* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

// One kernel's setting (see the header); the defaults are the pre-autotune kernel's.
struct Tuning {
  int rows = 4, prefetch = 1, chunk = 0;
};
enum Kernel { kBf16 = 0, kW8a16 = 1, kW8a8 = 2 };
Tuning g_tuning[3];  // set once at load by the autotune (set_gemv_tuning), read by every product

Tuning tuning_from(c10::IntArrayRef t, Kernel k) {  // [] → the kernel's current setting
  if (t.empty()) return g_tuning[k];
  TORCH_CHECK(t.size() == 3, "tuning must be [rows, prefetch, chunk]");
  TORCH_CHECK(t[0] == 1 || t[0] == 2 || t[0] == 4 || t[0] == 8, "tuning rows must be 1, 2, 4 or 8, not ", t[0]);
  TORCH_CHECK(t[1] == 0 || t[1] == 1 || t[1] == 2 || t[1] == 4, "tuning prefetch must be 0, 1, 2 or 4, not ", t[1]);
  TORCH_CHECK(t[2] == 0 || t[2] == 64 || t[2] == 256, "tuning chunk must be 0, 64 or 256, not ", t[2]);
  return {static_cast<int>(t[0]), static_cast<int>(t[1]), static_cast<int>(t[2])};
}

void set_gemv_tuning(c10::string_view kernel, c10::IntArrayRef t) {
  TORCH_CHECK(!t.empty(), "tuning must be [rows, prefetch, chunk]");
  const Kernel k = kernel == "bf16" ? kBf16 : kernel == "w8a16" ? kW8a16 : kernel == "w8a8" ? kW8a8 : Kernel(-1);
  TORCH_CHECK(k >= 0, "kernel must be bf16, w8a16 or w8a8, not ", std::string(kernel));
  g_tuning[k] = tuning_from(t, k);
}

// f(R, P) with R, P as compile-time constants (std::integral_constant) for the setting's rows and prefetch.
template <typename F>
void with_variant(const Tuning& t, F f) {
  auto p = [&](auto R) {
    switch (t.prefetch) {
      case 0: return f(R, std::integral_constant<int, 0>{});
      case 2: return f(R, std::integral_constant<int, 2>{});
      case 4: return f(R, std::integral_constant<int, 4>{});
      default: return f(R, std::integral_constant<int, 1>{});
    }
  };
  switch (t.rows) {
    case 1: return p(std::integral_constant<int, 1>{});
    case 2: return p(std::integral_constant<int, 2>{});
    case 8: return p(std::integral_constant<int, 8>{});
    default: return p(std::integral_constant<int, 4>{});
  }
}

void check(const at::Tensor& q, const at::Tensor& s, const at::Tensor& x) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be a contiguous int8 [N, K]");
  TORCH_CHECK(s.dim() == 1 && s.scalar_type() == at::kFloat && s.is_contiguous() && s.size(0) == q.size(0),
              "s must be a contiguous float32 [N]");
  TORCH_CHECK(x.dim() == 1 && x.size(0) == q.size(1), "x must be [K] with K = q.size(1)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(q.size(1) % kBlock == 0, "K must be a multiple of 64");
}

template <typename T>
inline __m512 load16(const T* p);
template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16<at::BFloat16>(const at::BFloat16* p) {  // bf16 → float32: the 16 bits on top
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// x [K] (float32 or bfloat16, K % 16 == 0) → float32 copy, contiguous
std::vector<float> to_float(const at::Tensor& x) {
  const int64_t K = x.size(0);
  std::vector<float> out(K);
  auto xc = x.contiguous();
  if (xc.scalar_type() == at::kFloat) {
    const float* p = xc.data_ptr<float>();
    std::copy(p, p + K, out.begin());
  } else {
    const at::BFloat16* p = xc.data_ptr<at::BFloat16>();
    for (int64_t k = 0; k < K; k += 16) _mm512_storeu_ps(out.data() + k, load16(p + k));
  }
  return out;
}

// Runs rows(out, n0, n1) over [0, N) on torch's intra-op threads, split as `chunk` says (one contiguous
// range per thread, or chunks of `chunk` rows dealt round-robin); out is y's data as float or bf16.
template <typename Out, typename F>
void split_rows(int64_t N, int64_t chunk, Out* out, F& rows) {
  const int64_t T = at::get_num_threads(), chunks = chunk > 0 ? (N + chunk - 1) / chunk : 0;
  if (chunk == 0 || T == 1 || N <= kGrain * 2 || chunks < 2) {
    at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) { rows(out, b, e); });
    return;
  }
  const int64_t tasks = std::min(T, chunks);
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++)
      for (int64_t c = t; c < chunks; c += tasks) rows(out, c * chunk, std::min(N, (c + 1) * chunk));
  });
}

template <typename F>
at::Tensor over_rows(int64_t N, const at::Tensor& x, int64_t chunk, F rows) {
  auto y = at::empty({N}, x.options());
  if (x.scalar_type() == at::kFloat)
    split_rows(N, chunk, y.data_ptr<float>(), rows);
  else
    split_rows(N, chunk, y.data_ptr<at::BFloat16>(), rows);
  return y;
}

// One block of 64 floats x → integers round-half-even(x · levels/amax) as 4 vectors of int32, and
// the block's scale amax/levels (0 for an all-zero block). Vectorized: this runs once per product,
// before the rows, on the critical path of every matrix-vector product.
inline float scale_block(const float* x, float levels, __m512i v[4]) {
  __m512 a = _mm512_setzero_ps();
  for (int c = 0; c < 4; c++) a = _mm512_max_ps(a, _mm512_abs_ps(_mm512_loadu_ps(x + 16 * c)));
  const float amax = _mm512_reduce_max_ps(a);
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? levels / amax : 0.f);
  for (int c = 0; c < 4; c++)  // cvtps_epi32 rounds to nearest even (the default rounding mode)
    v[c] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * c), inv));
  return amax / levels;
}

// ---- w8a16 ----------------------------------------------------------------------------------------
// x as int16 per block of 64 (d = amax/32767: an error of at most 2^-16 of the block's largest value,
// ~500× finer than bf16's own rounding of that value), int8 rows widened to int16, and VNNI's
// vpdpwssd summing pairs of int16 products into int32: a third of the instructions of widening every
// weight to float, which keeps the loop bound by memory, not by arithmetic.
struct Int16X {
  std::vector<int16_t> v;    // [K]
  std::vector<float> scale;  // d [K/64]

  static Int16X quantize(const std::vector<float>& x) {
    const int64_t K = static_cast<int64_t>(x.size()), B = K / kBlock;
    Int16X out{std::vector<int16_t>(K), std::vector<float>(B)};
    for (int64_t b = 0; b < B; b++) {
      __m512i v[4];
      out.scale[b] = scale_block(x.data() + b * kBlock, 32767.f, v);
      for (int c = 0; c < 4; c++)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.v.data() + b * kBlock + 16 * c), _mm512_cvtepi32_epi16(v[c]));
    }
    return out;
  }

  // Σ q·xq over block b of one row, as 16 int32 partial sums
  __m512i dot(const int8_t* row, int64_t b) const {
    const int16_t* xb = v.data() + b * kBlock;
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
    const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32)));
    const __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(xb));
    return _mm512_dpwssd_epi32(d, w1, _mm512_loadu_si512(xb + 32));
  }
};

// ---- w8a8 ----------------------------------------------------------------------------------------
// dpbusd multiplies unsigned by signed bytes, so x is stored as |xq| (unsigned) and its signs move
// onto the weights: q·xq = (±q)·|xq|. q ∈ [-127, 127], so negating a weight never overflows.
struct Int8X {
  std::vector<uint8_t> mag;    // |xq| [K]
  std::vector<uint64_t> sign;  // bit k%64 of word k/64: xq[k] < 0
  std::vector<float> scale;    // d [K/64]

  static Int8X quantize(const std::vector<float>& x) {
    const int64_t K = static_cast<int64_t>(x.size()), B = K / kBlock;
    Int8X out{std::vector<uint8_t>(K), std::vector<uint64_t>(B), std::vector<float>(B)};
    for (int64_t b = 0; b < B; b++) {
      __m512i v[4];
      out.scale[b] = scale_block(x.data() + b * kBlock, 127.f, v);
      uint64_t sign = 0;
      for (int c = 0; c < 4; c++) {  // |v| ≤ 127 as bytes, and the sign bits
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.mag.data() + b * kBlock + 16 * c),
                         _mm512_cvtepi32_epi8(_mm512_abs_epi32(v[c])));
        sign |= uint64_t(_mm512_cmplt_epi32_mask(v[c], _mm512_setzero_si512())) << (16 * c);
      }
      out.sign[b] = sign;
    }
    return out;
  }

  __m512i dot(const int8_t* row, int64_t b) const {
    const __m512i zero = _mm512_setzero_si512();
    const __m512i w = _mm512_loadu_si512(row);
    const __m512i signed_w = _mm512_mask_sub_epi8(w, sign[b], zero, w);                 // ±q
    return _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(mag.data() + b * kBlock), signed_w);  // 16 sums of 4
  }
};

// ---- both: y[n] = s[n] · Σ_b d[b] · (int32 block sum), R rows at a time ------------------------------
template <int R, int P, typename X, typename Out>
void int8_rows(const int8_t* q, const float* s, const X& xq, Out* y, int64_t n, int64_t K) {
  __m512 acc[R];
  for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / kBlock; b++) {
    const __m512 d = _mm512_set1_ps(xq.scale[b]);
    for (int i = 0; i < R; i++) {
      const int8_t* row = q + (n + i) * K + b * kBlock;
      if constexpr (P > 0) prefetch(row + P * R * K);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(xq.dot(row, b)), d, acc[i]);
    }
  }
  for (int i = 0; i < R; i++) y[n + i] = static_cast<Out>(s[n + i] * _mm512_reduce_add_ps(acc[i]));
}

template <typename X>
at::Tensor int8_gemv(const at::Tensor& q, const at::Tensor& s, const at::Tensor& x, const Tuning& t) {
  check(q, s, x);
  const int64_t N = q.size(0), K = q.size(1);
  const X xq = X::quantize(to_float(x));
  const int8_t* Q = q.data_ptr<int8_t>();
  const float* S = s.data_ptr<float>();
  at::Tensor y;
  with_variant(t, [&](auto r, auto p) {
    constexpr int R = decltype(r)::value, P = decltype(p)::value;
    y = over_rows(N, x, t.chunk, [&](auto* out, int64_t b, int64_t e) {
      int64_t n = b;
      for (; n + R <= e; n += R) int8_rows<R, P>(Q, S, xq, out, n, K);
      for (; n < e; n++) int8_rows<1, 0>(Q, S, xq, out, n, K);
    });
  });
  return y;
}

at::Tensor w8a16(const at::Tensor& q, const at::Tensor& s, const at::Tensor& x, c10::IntArrayRef t) {
  return int8_gemv<Int16X>(q, s, x, tuning_from(t, kW8a16));
}
at::Tensor w8a8(const at::Tensor& q, const at::Tensor& s, const at::Tensor& x, c10::IntArrayRef t) {
  return int8_gemv<Int8X>(q, s, x, tuning_from(t, kW8a8));
}

// ---- bf16 ----------------------------------------------------------------------------------------
// y[n] = Σ_k w[n,k] · x[k] for bf16 w and x: vdpbf16ps multiplies 32 bf16 pairs exactly and adds
// them into 16 float32 lanes. Only built into the running code where the CPU has AVX512-BF16.
template <int R, int P, typename Out>
__attribute__((target("avx512bf16"))) void bf16_rows(const uint16_t* w, const uint16_t* x, Out* y, int64_t n,
                                                      int64_t K) {
  __m512 acc[R][2];
  for (int i = 0; i < R; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {  // two 64-byte lines of each row per step
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + k), x1 = (__m512bh)_mm512_loadu_si512(x + k + 32);
    for (int i = 0; i < R; i++) {
      const uint16_t* row = w + (n + i) * K + k;
      if constexpr (P > 0) {
        prefetch(row + P * R * K);
        prefetch(row + P * R * K + 32);
      }
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_loadu_si512(row), x0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)_mm512_loadu_si512(row + 32), x1);
    }
  }
  for (int i = 0; i < R; i++) y[n + i] = static_cast<Out>(_mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1])));
}

at::Tensor bf16(const at::Tensor& w, const at::Tensor& x, c10::IntArrayRef tuning) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "w must be a contiguous bf16 [N, K]");
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kBFloat16 && x.size(0) == w.size(1), "x must be bf16 [K]");
  TORCH_CHECK(w.size(1) % kBlock == 0, "K must be a multiple of 64");
  const int64_t N = w.size(0), K = w.size(1);
  const auto xc = x.contiguous();
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const uint16_t* X = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const Tuning t = tuning_from(tuning, kBf16);
  at::Tensor y;
  with_variant(t, [&](auto r, auto p) {
    constexpr int R = decltype(r)::value, P = decltype(p)::value;
    y = over_rows(N, x, t.chunk, [&](auto* out, int64_t b, int64_t e) {
      int64_t n = b;
      for (; n + R <= e; n += R) bf16_rows<R, P>(W, X, out, n, K);
      for (; n < e; n++) bf16_rows<1, 0>(W, X, out, n, K);
    });
  });
  return y;
}

// ---- attention of one query position over a KV cache --------------------------------------------
// out[i] = Σ_s softmax_s(scale · q[i]·k[s]) · v[s] for the g = h/kv query heads i that share KV head
// j = i / g (grouped-query attention), all in float32: the decode step's attention, without the
// blocking and buffers of a flash-attention kernel that a single query does not need.

// e^x for x ≤ 0 (softmax after subtracting the max): 2^(x·log2 e) split into 2^n · 2^f, f ∈ [-½, ½],
// 2^f by its degree-6 Taylor polynomial (relative error < 2e-7), 2^n by vscalefps (0 below -126·ln 2 → tiny).
inline __m512 exp_neg(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));  // 2^(t-n) = e^f
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// 16 vectors → one vector whose lane t is the sum of v[t]'s lanes: a transpose-and-add tree, ~45
// instructions for 16 sums where 16 separate horizontal sums take ~160.
inline __m512 hsum16(const __m512 v[16]) {
  __m512 w[8], x[4], y[2];
  for (int j = 0; j < 8; j++)  // per 128-bit block: v[2j] in even positions, v[2j+1] in odd
    w[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; j++) {  // per 128-bit block: the block sums of v[4j … 4j+3] in positions 0 … 3
    const __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
    x[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int j = 0; j < 2; j++)  // add the 128-bit blocks pairwise: blocks (x0: 0+1, 2+3, x1: 0+1, 2+3)
    y[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of g query heads against n keys (k rows k_stride apart) into sc [g, kKeys], 16 keys at a
// time: each q·k as a vector of 16 partial sums, then hsum16 turns 16 of them into 16 scores.
// float32: FMAs; bf16: vdpbf16ps over the bf16 q and k themselves (exact products, float32 sums).
// Two bodies, not one template: the bf16 one is compiled for AVX512-BF16, which the float32 one must
// not require (it runs on CPUs without it).
constexpr int64_t kKeys = 512;  // keys per block (their scores stay in L1/L2)

void block_scores(const float* q, const float* k, int64_t k_stride, int64_t g, int64_t n, int64_t D,
                  float scale, float* sc) {
  for (int64_t s = 0; s < n; s += 16) {
    const int64_t m = std::min<int64_t>(16, n - s);
    for (int64_t i = 0; i < g; i++) {
      __m512 a[16];
      for (int64_t t = 0; t < 16; t++) {
        a[t] = _mm512_setzero_ps();
        if (t < m)
          for (int64_t d = 0; d < D; d += 16)
            a[t] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * D + d), _mm512_loadu_ps(k + (s + t) * k_stride + d), a[t]);
      }
      _mm512_mask_storeu_ps(sc + i * kKeys + s, (__mmask16)((1u << m) - 1), _mm512_mul_ps(hsum16(a), _mm512_set1_ps(scale)));
    }
  }
}

__attribute__((target("avx512bf16"))) void block_scores(const at::BFloat16* q, const at::BFloat16* k,
                                                        int64_t k_stride, int64_t g, int64_t n, int64_t D,
                                                        float scale, float* sc) {
  for (int64_t s = 0; s < n; s += 16) {
    const int64_t m = std::min<int64_t>(16, n - s);
    for (int64_t i = 0; i < g; i++) {
      __m512 a[16];
      for (int64_t t = 0; t < 16; t++) {
        a[t] = _mm512_setzero_ps();
        if (t >= m) continue;
        const at::BFloat16* kr = k + (s + t) * k_stride;
        int64_t d = 0;
        for (; d + 32 <= D; d += 32)
          a[t] = _mm512_dpbf16_ps(a[t], (__m512bh)_mm512_loadu_si512(q + i * D + d), (__m512bh)_mm512_loadu_si512(kr + d));
        if (d < D) a[t] = _mm512_fmadd_ps(load16(q + i * D + d), load16(kr + d), a[t]);  // D % 32 == 16
      }
      _mm512_mask_storeu_ps(sc + i * kKeys + s, (__mmask16)((1u << m) - 1), _mm512_mul_ps(hsum16(a), _mm512_set1_ps(scale)));
    }
  }
}

// The running state of one query head over a range of keys: max score m, Σ e^(score − m) l, and
// Σ e^(score − m) · v in acc [D] (flash-attention's online softmax).
struct Partial {
  std::vector<float> m, l, acc;  // [g], [g], [g, D]
};

// acc [G, D] += Σ_s p[i, s] · v[s] over n values (rows v_stride apart), p [G, kKeys]: 32 columns at a
// time (16 at the end if D % 32 == 16), the G × 2 accumulators in registers.
template <int G, typename T>
void accumulate_v(const float* p, const T* v, int64_t v_stride, int64_t n, int64_t D, float* acc_out) {
  for (int64_t d = 0; d < D; d += 32) {
    const bool two = d + 16 < D;
    __m512 acc[G][2];
    for (int i = 0; i < G; i++) {
      acc[i][0] = _mm512_loadu_ps(acc_out + i * D + d);
      acc[i][1] = two ? _mm512_loadu_ps(acc_out + i * D + d + 16) : _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < n; s++) {
      const T* vr = v + s * v_stride + d;
      const __m512 v0 = load16(vr), v1 = two ? load16(vr + 16) : v0;
      for (int i = 0; i < G; i++) {
        const __m512 w = _mm512_set1_ps(p[i * kKeys + s]);
        acc[i][0] = _mm512_fmadd_ps(w, v0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(w, v1, acc[i][1]);
      }
    }
    for (int i = 0; i < G; i++) {
      _mm512_storeu_ps(acc_out + i * D + d, acc[i][0]);
      if (two) _mm512_storeu_ps(acc_out + i * D + d + 16, acc[i][1]);
    }
  }
}

// Query heads q [g, D] against keys/values s ∈ [s0, s1) of one KV head, a block of kKeys keys at a
// time; returns the unnormalized partial state.

template <typename T>
Partial attend_range(const T* q, const T* k, const T* v, int64_t g, int64_t s0, int64_t s1, int64_t D,
                     int64_t k_stride, int64_t v_stride, float scale) {
  Partial st{std::vector<float>(g, -INFINITY), std::vector<float>(g, 0.f), std::vector<float>(g * D, 0.f)};
  std::vector<float> sc(g * kKeys);
  for (int64_t b0 = s0; b0 < s1; b0 += kKeys) {
    const int64_t n = std::min(kKeys, s1 - b0);
    block_scores(q, k + b0 * k_stride, k_stride, g, n, D, scale, sc.data());  // [g, n]
    for (int64_t i = 0; i < g; i++) {  // fold the block into the running max and sum
      float* r = sc.data() + i * kKeys;
      __m512 mv = _mm512_set1_ps(st.m[i]);
      int64_t s = 0;
      for (; s + 16 <= n; s += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(r + s));
      float m = _mm512_reduce_max_ps(mv);
      for (; s < n; s++) m = std::max(m, r[s]);
      const float corr = std::exp(st.m[i] - m);  // 0 on the first block (m was -inf)
      st.m[i] = m;
      __m512 sum = _mm512_setzero_ps();
      for (s = 0; s + 16 <= n; s += 16) {
        const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(r + s), _mm512_set1_ps(m)));
        _mm512_storeu_ps(r + s, e);
        sum = _mm512_add_ps(sum, e);
      }
      float tail = 0.f;
      for (; s < n; s++) tail += (r[s] = std::exp(r[s] - m));
      st.l[i] = st.l[i] * corr + _mm512_reduce_add_ps(sum) + tail;
      for (int64_t d = 0; d < D; d++) st.acc[i * D + d] *= corr;
    }
    // acc[i] += Σ_s p[i, s] · v[s], up to 8 heads at a time (a compile-time count, so that their
    // accumulators live in registers)
    for (int64_t i0 = 0; i0 < g; i0 += 8) {
      const float* p = sc.data() + i0 * kKeys;
      float* acc = st.acc.data() + i0 * D;
      const T* vb = v + b0 * v_stride;
      switch (std::min<int64_t>(8, g - i0)) {
        case 1: accumulate_v<1>(p, vb, v_stride, n, D, acc); break;
        case 2: accumulate_v<2>(p, vb, v_stride, n, D, acc); break;
        case 3: accumulate_v<3>(p, vb, v_stride, n, D, acc); break;
        case 4: accumulate_v<4>(p, vb, v_stride, n, D, acc); break;
        case 5: accumulate_v<5>(p, vb, v_stride, n, D, acc); break;
        case 6: accumulate_v<6>(p, vb, v_stride, n, D, acc); break;
        case 7: accumulate_v<7>(p, vb, v_stride, n, D, acc); break;
        default: accumulate_v<8>(p, vb, v_stride, n, D, acc); break;
      }
    }
  }
  return st;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 3 && v.dim() == 3, "q must be [h, D], k and v [kv, S, D]");
  const int64_t h = q.size(0), D = q.size(1), kv = k.size(0), S = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == D && h % kv == 0 && D % 16 == 0 && S > 0,
              "k and v must both be [kv, S, D] with kv dividing h, D a multiple of 16 and S > 0");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16), "q, k, v: one dtype, float32 or bf16");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k and v must be contiguous along D");
  const auto qc = q.contiguous();
  auto out = at::empty({h, D}, q.options());
  const int64_t g = h / kv;
  // Work items: each KV head, and for long contexts its keys split in as many ranges as it takes to
  // give every thread work (split-K "flash decoding"); the partial states are merged exactly.
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((at::get_num_threads() + kv - 1) / kv, S / (4 * kKeys)));
  const int64_t span = (S + splits - 1) / splits;
  std::vector<Partial> parts(kv * splits);
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* Q = qc.data_ptr<scalar_t>();
    const scalar_t* K = k.data_ptr<scalar_t>();
    const scalar_t* V = v.data_ptr<scalar_t>();
    at::parallel_for(0, kv * splits, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; t++) {
        const int64_t j = t / splits, s0 = (t % splits) * span, s1 = std::min(S, s0 + span);
        if (s0 < s1)
          parts[t] = attend_range(Q + j * g * D, K + j * k.stride(0), V + j * v.stride(0), g, s0, s1, D,
                                  k.stride(1), v.stride(1), static_cast<float>(scale));
      }
    });
    scalar_t* O = out.data_ptr<scalar_t>();
    for (int64_t j = 0; j < kv; j++)
      for (int64_t i = 0; i < g; i++) {  // out = Σ_p e^(m_p − M) acc_p / Σ_p e^(m_p − M) l_p
        float M = -INFINITY;
        for (int64_t p = 0; p < splits; p++)
          if (!parts[j * splits + p].m.empty()) M = std::max(M, parts[j * splits + p].m[i]);
        std::vector<float> o(D, 0.f);
        float l = 0.f;
        for (int64_t p = 0; p < splits; p++) {
          const Partial& st = parts[j * splits + p];
          if (st.m.empty()) continue;
          const float w = std::exp(st.m[i] - M);
          l += w * st.l[i];
          for (int64_t d = 0; d < D; d++) o[d] += w * st.acc[i * D + d];
        }
        for (int64_t d = 0; d < D; d++) O[(j * g + i) * D + d] = static_cast<scalar_t>(o[d] / l);
      }
  };
  if (q.scalar_type() == at::kFloat) run(float{}); else run(at::BFloat16{});
  return out;
}

// ---- the decode step's elementwise work ---------------------------------------------------------
// What herd/inference/single.py otherwise runs as ~25 small torch ops per layer, in one call each,
// with the same roundings to the model's dtype at the same places (float32 arithmetic in between;
// sums may differ from torch's in the last float32 bit, so results match to rounding, not bitwise).

template <typename T>
inline T cast(float v) { return static_cast<T>(v); }  // float32 → bf16 rounds to nearest even

template <typename T>
float sum_squares(const T* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 v = load16(x + k);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  float s = _mm512_reduce_add_ps(acc);
  for (; k < n; k++) s += static_cast<float>(x[k]) * static_cast<float>(x[k]);
  return s;
}

// y = dtype(x · rsqrt(mean(x²) + eps)) [· w]: herd.model.llama4.RMSNorm (and QK-norm without w)
template <typename T>
void rms_norm_into(const T* x, const T* w, T* y, int64_t n, float eps) {
  const float r = 1.f / std::sqrt(sum_squares(x, n) / n + eps);
  for (int64_t k = 0; k < n; k++) {
    const T v = cast<T>(static_cast<float>(x[k]) * r);
    y[k] = w ? cast<T>(static_cast<float>(v) * static_cast<float>(w[k])) : v;
  }
}

void check_vector(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              name, " must be a contiguous float32 or bf16 vector");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_vector(x, "x");
  check_vector(w, "w");
  TORCH_CHECK(x.sizes() == w.sizes() && x.scalar_type() == w.scalar_type(), "x and w must match in size and dtype");
  auto y = at::empty_like(x);
  if (x.scalar_type() == at::kFloat)
    rms_norm_into(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.size(0), eps);
  else
    rms_norm_into(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), x.size(0), eps);
  return y;
}

// qkv [(h + 2kv)·D] (after the projection and its bias) → q [h, D], k [kv, D], v [kv, D] as
// herd.inference.single.attention_in computes them: interleaved-pair RoPE (x0·c − x1·s, x0·s + x1·c)
// rounded; QK-norm over each head's D values, rounded; q · scale (attention temperature), rounded.
template <typename T>
void attention_prep_into(const T* qkv, const float* c, const float* s, T* q, T* k, T* v, int64_t h, int64_t kv,
                         int64_t D, bool rope, bool qk_norm, float eps, float scale, bool temp) {
  std::vector<T> row(D);
  for (int64_t r = 0; r < h + kv; r++) {
    const T* x = qkv + r * D;
    T* out = r < h ? q + r * D : k + (r - h) * D;
    std::copy(x, x + D, row.begin());
    if (rope)
      for (int64_t i = 0; i < D / 2; i++) {
        const float x0 = static_cast<float>(x[2 * i]), x1 = static_cast<float>(x[2 * i + 1]);
        const float a = x0 * c[i], b = x1 * s[i], a2 = x0 * s[i], b2 = x1 * c[i];
        row[2 * i] = cast<T>(a - b);
        row[2 * i + 1] = cast<T>(a2 + b2);
      }
    if (qk_norm) rms_norm_into<T>(row.data(), nullptr, row.data(), D, eps);
    if (temp && r < h)
      for (int64_t d = 0; d < D; d++) row[d] = cast<T>(static_cast<float>(row[d]) * scale);
    std::copy(row.begin(), row.end(), out);
  }
  std::copy(qkv + (h + kv) * D, qkv + (h + 2 * kv) * D, v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_prep(const at::Tensor& qkv, const at::Tensor& cos,
                                                              const at::Tensor& sin, int64_t h, int64_t kv,
                                                              bool rope, bool qk_norm, double eps, double scale,
                                                              bool temp) {
  check_vector(qkv, "qkv");
  TORCH_CHECK(h > 0 && kv > 0 && qkv.size(0) % (h + 2 * kv) == 0, "qkv must hold h + 2·kv heads");
  const int64_t D = qkv.size(0) / (h + 2 * kv);
  TORCH_CHECK(D % 2 == 0, "head_dim must be even");
  TORCH_CHECK(!rope || (cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                        sin.is_contiguous() && cos.numel() == D / 2 && sin.numel() == D / 2),
              "cos and sin must be contiguous float32 [head_dim / 2]");
  auto q = at::empty({h, D}, qkv.options()), k = at::empty({kv, D}, qkv.options()), v = at::empty({kv, D}, qkv.options());
  const float* c = rope ? cos.data_ptr<float>() : nullptr;
  const float* s = rope ? sin.data_ptr<float>() : nullptr;
  if (qkv.scalar_type() == at::kFloat)
    attention_prep_into(qkv.data_ptr<float>(), c, s, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                        h, kv, D, rope, qk_norm, eps, scale, temp);
  else
    attention_prep_into(qkv.data_ptr<at::BFloat16>(), c, s, q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(),
                        v.data_ptr<at::BFloat16>(), h, kv, D, rope, qk_norm, eps, scale, temp);
  return {q, k, v};
}

// gate_up [2I] → silu(gate) · up [I], each rounded to the dtype as torch rounds F.silu(g) * u.
template <typename T>
void swiglu_into(const T* gu, T* y, int64_t I) {
  for (int64_t i = 0; i < I; i++) {
    const float g = static_cast<float>(gu[i]);
    const T act = cast<T>(g / (1.f + std::exp(-g)));
    y[i] = cast<T>(static_cast<float>(act) * static_cast<float>(gu[I + i]));
  }
}

at::Tensor swiglu(const at::Tensor& gate_up) {
  check_vector(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(0) % 2 == 0, "gate_up must have an even length");
  const int64_t I = gate_up.size(0) / 2;
  auto y = at::empty({I}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat)
    swiglu_into(gate_up.data_ptr<float>(), y.data_ptr<float>(), I);
  else
    swiglu_into(gate_up.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), I);
  return y;
}

}  // namespace

// Schemas here, CPU kernels below; herd/inference/native/__init__.py registers their shapes for
// torch.compile's fake tensors (the ops stay opaque calls inside compiled graphs).
TORCH_LIBRARY(herd_native, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  // tuning [rows, prefetch, chunk] picks a variant; [] (the default) the kernel's set_gemv_tuning
  m.def("bf16_gemv(Tensor w, Tensor x, int[] tuning=[]) -> Tensor");
  m.def("w8a16_gemv(Tensor q, Tensor s, Tensor x, int[] tuning=[]) -> Tensor");
  m.def("w8a8_gemv(Tensor q, Tensor s, Tensor x, int[] tuning=[]) -> Tensor");
  m.def("set_gemv_tuning(str kernel, int[] tuning) -> ()", set_gemv_tuning);  // no tensors: no dispatch key
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("attention_prep(Tensor qkv, Tensor cos, Tensor sin, int h, int kv, bool rope, bool qk_norm, float eps, "
        "float scale, bool temp) -> (Tensor, Tensor, Tensor)");
  m.def("swiglu(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd_native, CPU, m) {
  m.impl("decode_attention", decode_attention);
  m.impl("bf16_gemv", bf16);
  m.impl("w8a16_gemv", w8a16);
  m.impl("w8a8_gemv", w8a8);
  m.impl("rms_norm", rms_norm);
  m.impl("attention_prep", attention_prep);
  m.impl("swiglu", swiglu);
}
