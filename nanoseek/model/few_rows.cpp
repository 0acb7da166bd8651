// A few rows times a bf16 weight on a CPU with AVX-512 BF16: the decode step's products (nanoseek/model/cpu_kernel.py
// builds this file with the C++ compiler inductor uses and calls it through ctypes).
//
// The weight is packed [N/16, K/2, 16, 2]: one 64-byte load holds 16 outputs x 2 inputs, the operand of vdpbf16ps,
// which multiplies it by a broadcast pair of one row's inputs and adds the 16 pair sums to 16 float32 sums. Each
// output's sum runs along K in order, as oneDNN's kernel does, and is rounded to bf16 once at the end. Every row
// reuses each loaded block of weights, so at up to 8 rows the loop streams the weight at the memory's rate, where
// oneDNN's prepacked kernel reads it 1.1-1.9x slower (docs/LOG.md, 2026-12-04, twenty-second session).
#include <immintrin.h>
#include <stdint.h>

template <int M, int NB>
static inline void blocks(const uint16_t* P, const uint32_t* x, int64_t K2, const uint16_t* bias, uint16_t* out,
                          int64_t N, int64_t b0) {
  __m512 acc[M][NB];
  for (int r = 0; r < M; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  const uint16_t* p = P + b0 * K2 * 32;
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh w[NB];
    for (int b = 0; b < NB; ++b) w[b] = (__m512bh)_mm512_loadu_si512(p + (b * K2 + k) * 32);
    for (int r = 0; r < M; ++r) {
      __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[r * K2 + k]);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], w[b], xb);
    }
  }
  for (int b = 0; b < NB; ++b) {
    // The bias added to the finished sum, as oneDNN adds it (bf16 -> float32: the 16 bits to the top of a word).
    const __m512 add = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                  (const __m256i*)(bias + (b0 + b) * 16))), 16))
                            : _mm512_setzero_ps();
    for (int r = 0; r < M; ++r)
      _mm256_storeu_si256((__m256i*)(out + r * N + (b0 + b) * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][b], add)));
  }
}

template <int NB>
static inline void rows(int64_t m, const uint16_t* P, const uint32_t* x, int64_t K2, const uint16_t* bias,
                        uint16_t* out, int64_t N, int64_t b0) {
  switch (m) {
    case 1: blocks<1, NB>(P, x, K2, bias, out, N, b0); break;
    case 2: blocks<2, NB>(P, x, K2, bias, out, N, b0); break;
    case 3: blocks<3, NB>(P, x, K2, bias, out, N, b0); break;
    case 4: blocks<4, NB>(P, x, K2, bias, out, N, b0); break;
    case 5: blocks<5, NB>(P, x, K2, bias, out, N, b0); break;
    case 6: blocks<6, NB>(P, x, K2, bias, out, N, b0); break;
    case 7: blocks<7, NB>(P, x, K2, bias, out, N, b0); break;
    default: blocks<8, NB>(P, x, K2, bias, out, N, b0); break;
  }
}

// out [M, N] = x [M, K] @ W^T (+ bias [N]), all bf16 and contiguous, W packed as above; N % 16 == 0, K % 2 == 0.
extern "C" void nanoseek_few_rows_bf16(const uint16_t* x, int64_t M, const uint16_t* P, const uint16_t* bias,
                                       uint16_t* out, int64_t N, int64_t K, int threads) {
  const int64_t K2 = K / 2, nblk = N / 16, groups = (nblk + 1) / 2;
  // Threads split the outputs in groups of 32; a group's weights (48 KiB at K = 768) come from memory once and stay
  // in the core's cache while each chunk of up to 8 rows passes over them, so many rows cost arithmetic, not reads.
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b0 = 2 * g;
    for (int64_t r0 = 0; r0 < M; r0 += 8) {
      const int64_t m = M - r0 < 8 ? M - r0 : 8;
      const uint32_t* xr = (const uint32_t*)x + r0 * K2;
      if (b0 + 1 < nblk)
        rows<2>(m, P, xr, K2, bias, out + r0 * N, N, b0);
      else
        rows<1>(m, P, xr, K2, bias, out + r0 * N, N, b0);
    }
  }
}
