// Shared by float32_rows.cpp and float32_experts.cpp: the float32 tiles on AVX-512. A weight's blocks of 16 outputs
// are packed [K][16] (one 64-byte load holds one input's weights for 16 outputs) and up to 8 rows pass over them, one
// FMA per row and load, each output's sum along the inputs in order. cpu_kernel.py hashes every header here into the
// library's tag, so a change here rebuilds it.
#pragma once
#include <immintrin.h>
#include <stdint.h>

namespace nanoseek_tiles {

// The 16 x 16 floats in r transposed in registers (unpacks, then two rounds of 128-bit lane shuffles); row i of
// the result lands in r[kSlot[i]].
constexpr int kSlot[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};

inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 2; ++j) {
      const __m512d a = _mm512_castps_pd(t[4 * i + j]), b = _mm512_castps_pd(t[4 * i + 2 + j]);
      r[4 * i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[4 * i + 2 + j] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

// 16 outputs' weights w [16][K] (row stride K) -> dst [K][16]; K % 16 == 0.
inline void pack_block(const float* w, int64_t K, float* dst) {
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(w + i * K + k0);
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + (k0 + kSlot[i]) * 16, r[i]);
  }
}

// M rows of x [.., K] times NB packed blocks p [NB][K][16] (+ each block's 16 biases) -> out [.., N] at column n0.
template <int M, int NB>
inline void tile(const float* p, const float* x, int64_t K, const float* const* bias, float* out, int64_t N,
                 int64_t n0) {
  __m512 acc[M][NB];
  for (int b = 0; b < NB; ++b) {
    const __m512 start = bias[b] ? _mm512_loadu_ps(bias[b]) : _mm512_setzero_ps();
    for (int r = 0; r < M; ++r) acc[r][b] = start;
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[NB];
    for (int b = 0; b < NB; ++b) w[b] = _mm512_loadu_ps(p + (b * K + k) * 16);
    for (int r = 0; r < M; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * K + k]);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(xr, w[b], acc[r][b]);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(out + r * N + n0 + b * 16, acc[r][b]);
}

template <int NB>
inline void rows(int64_t m, const float* p, const float* x, int64_t K, const float* const* bias, float* out,
                 int64_t N, int64_t n0) {
  switch (m) {
    case 1: tile<1, NB>(p, x, K, bias, out, N, n0); break;
    case 2: tile<2, NB>(p, x, K, bias, out, N, n0); break;
    case 3: tile<3, NB>(p, x, K, bias, out, N, n0); break;
    case 4: tile<4, NB>(p, x, K, bias, out, N, n0); break;
    case 5: tile<5, NB>(p, x, K, bias, out, N, n0); break;
    case 6: tile<6, NB>(p, x, K, bias, out, N, n0); break;
    case 7: tile<7, NB>(p, x, K, bias, out, N, n0); break;
    default: tile<8, NB>(p, x, K, bias, out, N, n0); break;
  }
}

}  // namespace nanoseek_tiles
