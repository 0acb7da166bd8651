// A few rows times a bf16 weight on a CPU with AVX-512 BF16: the decode step's products (nanoseek/model/cpu_kernel.py
// builds this file with the C++ compiler inductor uses and calls it through ctypes).
//
// The weight is packed [N/16, K/2, 16, 2]: one 64-byte load holds 16 outputs x 2 inputs, the operand of vdpbf16ps,
// which multiplies it by a broadcast pair of one row's inputs and adds the 16 pair sums to 16 float32 sums. Each
// output's sum runs along K in order, as oneDNN's kernel does, and is rounded to bf16 once at the end. Every row
// reuses each loaded block of weights, so at up to 8 rows the loop streams the weight at the memory's rate, where
// oneDNN's prepacked kernel reads it 1.1-1.9x slower (docs/LOG.md, 2026-12-04, twenty-second session).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

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

// The same product through AMX (Sapphire Rapids and later): the packed layout above is already the layout of AMX's
// second operand, so a block of 16 outputs x 32 inputs is one contiguous 1 KiB tile. tdpbf16ps multiplies up to 16
// rows x 32 inputs (a tile loaded straight from x, one row every K inputs) by it and adds the float32 sums into a
// 16 x 16 tile; four such sums (64 outputs) share each row tile. At 1-16 rows the loop then costs what reading the
// weight costs: `small`'s step, 201 MB, 7.0 ms at 1-16 rows against 8.2-9.4 for oneDNN's AMX kernel (which reads
// the weight at 26-28 GB/s; the machine reads at 29-30: docs/LOG.md, 2026-12-05, thirty-fifth session).
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")

namespace {

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: the sums [16 x 16 float32]; 4: 16 rows x 32 inputs; 5-7: weight blocks [16 pairs x 16 outputs x 2].
// Always 16 rows: a last chunk of fewer is padded with zero rows (AMX's arithmetic is not what limits a few rows).
void configure() {
  TileConfig c = {};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

void finish(const float* sums, int64_t m, const uint16_t* bias, uint16_t* out, int64_t N, int64_t n0) {
  const __m512 add = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(bias + n0))), 16))
                          : _mm512_setzero_ps();
  for (int64_t r = 0; r < m; ++r)
    _mm256_storeu_si256((__m256i*)(out + r * N + n0),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(sums + r * 16), add)));
}

// Outputs of blocks [b, b + NB) for every chunk of 16 rows: the blocks' weights (NB x 24 KiB at K = 768) come from
// memory for the first chunk and from L2 for the rest. Chunk r reads x's rows from `rows(r)`, K inputs apart.
template <int NB, typename Rows>
void amx_blocks(Rows rows, int64_t chunks, int64_t M, const uint16_t* P, const uint16_t* bias, uint16_t* out,
                int64_t N, int64_t K, int64_t b) {
  const int64_t steps = K / 32, block = K * 16;  // a block's packed weights: K / 2 pairs x 16 outputs x 2
  const uint16_t* p = P + b * block;
  alignas(64) float sums[NB][16 * 16];
  for (int64_t r = 0; r < chunks; ++r) {
    const uint16_t* xr = rows(r);
    _tile_zero(0);
    if (NB == 4) {
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t c = 0; c < steps; ++c) {
      _tile_loadd(4, xr + 32 * c, K * 2);
      _tile_loadd(5, p + 512 * c, 64);
      if (NB == 4) {
        _tile_loadd(6, p + block + 512 * c, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(7, p + 2 * block + 512 * c, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, p + 3 * block + 512 * c, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 4, 5);
      } else {
        _tile_dpbf16ps(0, 4, 5);
      }
    }
    _tile_stored(0, sums[0], 64);
    if (NB == 4) {
      _tile_stored(1, sums[1], 64);
      _tile_stored(2, sums[2], 64);
      _tile_stored(3, sums[3], 64);
    }
    const int64_t m = M - 16 * r < 16 ? M - 16 * r : 16;
    for (int j = 0; j < NB; ++j) finish(sums[j], m, bias, out + 16 * r * N, N, (b + j) * 16);
  }
}

}  // namespace

// Linux hands out AMX's tile state only to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); 0 once granted.
extern "C" int nanoseek_amx_request(void) { return (int)syscall(SYS_arch_prctl, 0x1023, 18); }

// As nanoseek_few_rows_bf16, through AMX: K % 32 == 0, nanoseek_amx_request() granted. Each thread takes a
// contiguous run of output blocks, four at a time, and passes every chunk of 16 rows over them; a last chunk of
// fewer rows is copied into a zeroed buffer of 16. The tile configuration is per thread.
extern "C" void nanoseek_amx_rows_bf16(const uint16_t* x, int64_t M, const uint16_t* P, const uint16_t* bias,
                                       uint16_t* out, int64_t N, int64_t K, int threads) {
  const int64_t nblk = N / 16, full = M / 16, chunks = (M + 15) / 16;
  uint16_t* padded = nullptr;  // the last chunk's rows and zeros (16 x K), shared read-only by the threads
  if (M % 16) {
    padded = (uint16_t*)calloc(16 * K, sizeof(uint16_t));
    if (!padded) {  // out of memory for 16 rows: the same product through the AVX-512 BF16 loop, which needs none
      nanoseek_few_rows_bf16(x, M, P, bias, out, N, K, threads);
      return;
    }
    memcpy(padded, x + full * 16 * K, (M - full * 16) * K * sizeof(uint16_t));
  }
  const auto rows = [&](int64_t r) { return r < full ? x + 16 * r * K : padded; };
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t lo = nblk * t / T, hi = nblk * (t + 1) / T;
    if (lo < hi) {
      configure();
      int64_t b = lo;
      for (; b + 4 <= hi; b += 4) amx_blocks<4>(rows, chunks, M, P, bias, out, N, K, b);
      for (; b < hi; ++b) amx_blocks<1>(rows, chunks, M, P, bias, out, N, K, b);
      _tile_release();
    }
  }
  free(padded);
}

#pragma GCC pop_options
