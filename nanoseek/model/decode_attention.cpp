// Decode attention over a bf16 KV cache on a CPU with AVX-512 BF16: the engine's many-row decode step, as the torch
// operation nanoseek::decode_attention (nanoseek/model/cpu_kernel.py builds this file with float32_rows.cpp against
// torch's headers, so a compiled step calls it from C++, not through Python: ~11 us a call).
//
// One (sequence, kv head) at a time: its R query rows (the query heads sharing the kv head, times the step's new
// tokens) against the keys each may see. Every score is computed once (a key's 32-wide chunks by vdpbf16ps against
// the query, the 16 lanes summed), kept in a float32 row, soft-maxed with a vector exp, and the values are summed
// in float32 weighted by the probabilities; the output is rounded to bf16 once. Inductor's fused loop for the same
// sums recomputed each score in each pass of the softmax, with the query's RoPE inside (docs/LOG.md, 2026-12-04,
// twenty-seventh session).
//
// The library is built for AVX-512F (float32_rows.cpp runs on any such CPU): the kernel's own functions, below the
// includes, are compiled for AVX-512 BF16 by the pragma, and the operation refuses a CPU without it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <stdint.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <optional>

#include "vector_exp.h"  // exp16: the softmax's

// After the includes: only the functions defined below take the target.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

// 16 bf16 numbers (the low `m` of them) widened to float32: the 16 bits to the top of a word.
static inline __m512 widen(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline __mmask16 first16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
static inline __mmask32 first32(int64_t n) { return n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1); }

// out[i] = the sum of p[i]'s 16 lanes, for 16 vectors at once: halves, quarters, pairs and single lanes of the
// vectors added pairwise (45 operations, against ~8 a vector summed alone), then the lanes put in key order.
static inline __m512 sum16(__m512 p[16]) {
  __m512 h[8], q[4], s[2];
  for (int i = 0; i < 8; ++i)  // h[i]: vector 2i's 8 partial sums in lanes 0-7, vector 2i+1's in 8-15
    h[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // q[i]: 128-bit lane l holds vector 4i+l's 4 partial sums
    q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // s[i]: lane l holds vectors 8i+l's and 8i+4+l's 2 partial sums each
    s[i] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * i], q[2 * i + 1], 0x44), _mm512_shuffle_ps(q[2 * i], q[2 * i + 1], 0xEE));
  // t: lane l holds the sums of vectors l, 4+l, 8+l, 12+l.
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], 0x88), _mm512_shuffle_ps(s[0], s[1], 0xDD));
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, t);
}

// One query row's scores against 16 keys (fewer at the end: the first `n`), each times `scale`, into row[0..16).
// DK: the key's 32-number chunks, 0 for any count (`dk32` of them). Past the n-th key the last key is read again
// (never memory past the keys) and its score thrown away: the loops stay whole and unrolled.
template <int DK>
static inline void scores16(const uint16_t* key, int64_t kl, int64_t n, const uint16_t* q, int64_t dk, int64_t dk32,
                            float scale, float* row) {
  const int64_t chunks = DK ? DK : dk32;
  __m512 p[16];
  for (int i = 0; i < 16; ++i) {
    const uint16_t* k = key + (i < n ? i : n - 1) * kl;
    p[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask32 m = first32(dk - c * 32);
      p[i] = _mm512_dpbf16_ps(p[i], (__m512bh)_mm512_maskz_loadu_epi16(m, k + c * 32),
                              (__m512bh)_mm512_maskz_loadu_epi16(m, q + c * 32));
    }
  }
  _mm512_storeu_ps(row, _mm512_mul_ps(sum16(p), _mm512_set1_ps(scale)));
}

// out rows [NR][NC x 16 numbers from c0 x 16] = the probabilities' rows times the values (keys 0..n), summed in
// float32 in registers, rounded to bf16 once.
template <int NR, int NC>
static inline void weighted(const uint16_t* values, int64_t vl, int64_t n, const float* probs, int64_t stride,
                            int64_t c0, int64_t dv, uint16_t* out) {
  __m512 acc[NR][NC];
  __mmask16 m[NC];
  for (int c = 0; c < NC; ++c) m[c] = first16(dv - (c0 + c) * 16);
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 v[NC];
    for (int c = 0; c < NC; ++c) v[c] = widen(values + j * vl + (c0 + c) * 16, m[c]);
    for (int r = 0; r < NR; ++r) {
      const __m512 pr = _mm512_set1_ps(probs[r * stride + j]);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(pr, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c)
      _mm256_mask_storeu_epi16(out + r * dv + (c0 + c) * 16, m[c], (__m256i)_mm512_cvtneps_pbh(acc[r][c]));
}

template <int NR>
static inline void weighted_rows(const uint16_t* values, int64_t vl, int64_t n, const float* probs, int64_t stride,
                                 int64_t dv, uint16_t* out) {
  const int64_t dv16 = (dv + 15) / 16;
  for (int64_t c0 = 0; c0 < dv16; c0 += 4) {
    switch (dv16 - c0 < 4 ? dv16 - c0 : 4) {
      case 1: weighted<NR, 1>(values, vl, n, probs, stride, c0, dv, out); break;
      case 2: weighted<NR, 2>(values, vl, n, probs, stride, c0, dv, out); break;
      case 3: weighted<NR, 3>(values, vl, n, probs, stride, c0, dv, out); break;
      default: weighted<NR, 4>(values, vl, n, probs, stride, c0, dv, out); break;
    }
  }
}

// q [B, Hkv, R, dk] and out [B, Hkv, R, dv], contiguous. Key j of cache row s, kv head h starts at
// K + s * ks + h * kh + j * kl (dk contiguous numbers); values likewise in V. Row b of the batch reads cache row
// slots[b] (row b where slots is null). Query row r is the step's token t = r % T, which sees keys
// 0..min(pos[b, t], L - 1).
static void attention_bf16(const uint16_t* q, const uint16_t* K, int64_t ks, int64_t kh, int64_t kl,
                           const uint16_t* V, int64_t vs, int64_t vh, int64_t vl, const int64_t* slots,
                           const int64_t* pos, int64_t B, int64_t Hkv, int64_t R, int64_t T, int64_t L, int64_t dk,
                           int64_t dv, float scale, uint16_t* out, int threads) {
  const int64_t dk32 = (dk + 31) / 32, Lpad = (L + 15) / 16 * 16;
#pragma omp parallel num_threads(threads)
  {
    // Row r's scores, then its probabilities, zero past its last key; how many keys row r sees. By malloc, not in
    // std::vectors: no library template is instantiated under this file's target pragma.
    float* probs = static_cast<float*>(std::malloc(sizeof(float) * R * Lpad));
    int64_t* seen = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * R));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * Hkv; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv, s = slots ? slots[b] : b;
      const uint16_t* keys = K + s * ks + h * kh;
      const uint16_t* values = V + s * vs + h * vh;
      const uint16_t* qs = q + bh * R * dk;
      uint16_t* o = out + bh * R * dv;
      int64_t most = 0;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t p = pos[b * T + r % T] + 1;
        seen[r] = p < L ? p : L;
        most = seen[r] > most ? seen[r] : most;
      }
      // Scores, 16 keys at a time, one query row after another (the keys stay in the core's cache between them).
      for (int64_t r = 0; r < R; ++r) {
        const uint16_t* qr = qs + r * dk;
        float* row = probs + r * Lpad;
        for (int64_t j = 0; j < most; j += 16) {
          const int64_t n = most - j;
          switch (dk32) {
            case 1: scores16<1>(keys + j * kl, kl, n, qr, dk, dk32, scale, row + j); break;
            case 2: scores16<2>(keys + j * kl, kl, n, qr, dk, dk32, scale, row + j); break;
            case 3: scores16<3>(keys + j * kl, kl, n, qr, dk, dk32, scale, row + j); break;
            case 4: scores16<4>(keys + j * kl, kl, n, qr, dk, dk32, scale, row + j); break;
            default: scores16<0>(keys + j * kl, kl, n, qr, dk, dk32, scale, row + j); break;
          }
        }
      }
      // Softmax of each row over the keys it sees; zero past them (the weighted sum runs to `most`).
      for (int64_t r = 0; r < R; ++r) {
        float* row = probs + r * Lpad;
        const int64_t n = seen[r];
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 16) top = _mm512_mask_max_ps(top, first16(n - j), top, _mm512_loadu_ps(row + j));
        const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        __m512 total = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
          const __mmask16 m = first16(n - j);
          const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift)));
          _mm512_storeu_ps(row + j, e);
          total = _mm512_add_ps(total, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
        for (int64_t j = 0; j < n; j += 16) _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), inv));
        for (int64_t j = n; j < most; ++j) row[j] = 0.0f;
      }
      // The weighted sum, up to 4 rows per pass over the values.
      for (int64_t r0 = 0; r0 < R; r0 += 4) {
        const float* rows = probs + r0 * Lpad;
        switch (R - r0 < 4 ? R - r0 : 4) {
          case 1: weighted_rows<1>(values, vl, most, rows, Lpad, dv, o + r0 * dv); break;
          case 2: weighted_rows<2>(values, vl, most, rows, Lpad, dv, o + r0 * dv); break;
          case 3: weighted_rows<3>(values, vl, most, rows, Lpad, dv, o + r0 * dv); break;
          default: weighted_rows<4>(values, vl, most, rows, Lpad, dv, o + r0 * dv); break;
        }
      }
    }
    std::free(probs);
    std::free(seen);
  }
}
#pragma GCC pop_options

namespace {

// q [B, Hkv, R, dk] against a cache layer's keys [n_slots, Hkv, max_seq_len, dk] and values [..., dv] (a view of the
// keys is fine): see cpu_kernel.decode_attention. The kernel reads raw memory, so a wrong input is an error here,
// never a wrong read; the slot indices are not checked (a reduction per call): the engine's own.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& positions, const std::optional<at::Tensor>& slots, int64_t kv_len,
                            double scale) {
  TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "nanoseek::decode_attention needs a CPU with AVX-512 BF16");
  const auto bf16 = at::kBFloat16;
  bool ok = q.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && positions.dim() == 2;
  ok = ok && q.scalar_type() == bf16 && keys.scalar_type() == bf16 && values.scalar_type() == bf16;
  ok = ok && q.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu() && positions.device().is_cpu();
  ok = ok && keys.size(3) == q.size(3) && keys.size(1) == q.size(1) && keys.stride(3) == 1 && values.stride(3) == 1;
  ok = ok && positions.scalar_type() == at::kLong && values.size(0) == keys.size(0) &&
       values.size(1) == keys.size(1) && values.size(2) == keys.size(2);
  ok = ok && (slots.has_value() ? slots->dim() == 1 && slots->size(0) == q.size(0) : q.size(0) <= keys.size(0));
  ok = ok && 0 < kv_len && kv_len <= keys.size(2) && positions.size(0) == q.size(0) && positions.size(1) > 0 &&
       q.size(2) % positions.size(1) == 0;
  TORCH_CHECK_VALUE(ok, "cpu_kernel.decode_attention: q ", q.scalar_type(), " ", q.sizes(), ", keys ",
                    keys.scalar_type(), " ", keys.sizes(), ", values ", values.scalar_type(), " ", values.sizes(),
                    ", positions ", positions.scalar_type(), " ", positions.sizes(), ", kv_len ", kv_len);
  const int64_t B = q.size(0), Hkv = q.size(1), R = q.size(2), dk = q.size(3), dv = values.size(3);
  const at::Tensor qc = q.contiguous(), pc = positions.contiguous();
  const std::optional<at::Tensor> sc =
      slots ? std::optional<at::Tensor>(slots->to(at::kLong).contiguous()) : std::nullopt;
  at::Tensor out = at::empty({B, Hkv, R, dv}, q.options());
  if (B > 0)
    attention_bf16(reinterpret_cast<const uint16_t*>(qc.data_ptr()),
                   reinterpret_cast<const uint16_t*>(keys.data_ptr()), keys.stride(0), keys.stride(1), keys.stride(2),
                   reinterpret_cast<const uint16_t*>(values.data_ptr()), values.stride(0), values.stride(1),
                   values.stride(2), sc ? sc->data_ptr<int64_t>() : nullptr,
                   pc.data_ptr<int64_t>(), B, Hkv, R, pc.size(1), kv_len, dk, dv, static_cast<float>(scale),
                   reinterpret_cast<uint16_t*>(out.data_ptr()), at::get_num_threads());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def(
      "decode_attention(Tensor q, Tensor keys, Tensor values, Tensor positions, Tensor? slots, SymInt kv_len, "
      "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("decode_attention", decode_attention); }
