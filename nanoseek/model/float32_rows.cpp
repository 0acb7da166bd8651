// Rows times float32 weights on a CPU with AVX-512: the products of a float32 model's decode step, registered as the
// torch operation nanoseek::float32_rows, and an MoE layer's routed experts as nanoseek::float32_experts (the same
// tiles; at the end of the file). nanoseek/model/cpu_kernel.py builds them against torch's headers, so a compiled
// step calls them from C++, not through Python.
//
// At a decode step's shapes (8-512 rows of 128-768 inputs) MKL's sgemm runs on one of two threads while the other
// packs and waits; here the threads split the outputs in groups of 32, and each packs its group's weights into a
// buffer that stays in its L1 cache ([2][K][16]: one 64-byte load holds one input's weights for 16 outputs, a 16 x 16
// transpose per 16 inputs) while every chunk of up to 8 rows passes over it, one FMA per row and load. The weights
// are read as they are, at every call: no packed copy to keep in step with an optimizer. Each output's sum runs along
// the inputs in order in float32, as MKL's kernel does (tested against float64; docs/LOG.md, 2026-12-05).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

#include "vector_exp.h"  // exp16: SiLU's e^-x (2^n by scalef: 0 or inf at the ends, so SiLU is x or 0)

namespace {

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

// out [M, N] = x [M, K] times the blocks of 16 outputs (block j: weights at weight[j], row stride K; biases at
// bias[j] or null), one group of two blocks at a time per thread.
void product(const float* x, int64_t M, const std::vector<const float*>& weight, const std::vector<const float*>& bias,
             float* out, int64_t K, int threads) {
  const int64_t nblk = weight.size(), N = nblk * 16, groups = (nblk + 1) / 2;
#pragma omp parallel num_threads(threads)
  {
    float* buf = static_cast<float*>(std::aligned_alloc(64, 2 * K * 16 * sizeof(float)));
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b0 = 2 * g, nb = b0 + 1 < nblk ? 2 : 1;
      for (int64_t b = 0; b < nb; ++b) pack_block(weight[b0 + b], K, buf + b * K * 16);
      for (int64_t r0 = 0; r0 < M; r0 += 8) {
        const int64_t m = M - r0 < 8 ? M - r0 : 8;
        if (nb == 2)
          rows<2>(m, buf, x + r0 * K, K, bias.data() + b0, out + r0 * N, N, b0 * 16);
        else
          rows<1>(m, buf, x + r0 * K, K, bias.data() + b0, out + r0 * N, N, b0 * 16);
      }
    }
    std::free(buf);
  }
}

// x [..., K] times each weight [N_i, K] transposed (plus its bias [N_i], if biases are given, one per weight), the
// products side by side: [..., sum N_i]. float32 on the CPU; K and every N_i multiples of 16.
at::Tensor float32_rows(const at::Tensor& x, at::TensorList weights, at::TensorList biases) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "float32_rows: x must be float32 on the CPU");
  TORCH_CHECK(!weights.empty() && (biases.empty() || biases.size() == weights.size()),
              "float32_rows: one or more weights, and a bias for each or none");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % 16 == 0, "float32_rows: the inputs must be a multiple of 16, got ", K);
  std::vector<at::Tensor> held;  // contiguous copies (if any) live until the product is done
  std::vector<const float*> block, block_bias;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.size(0) % 16 == 0 && w.scalar_type() == at::kFloat &&
                    w.device().is_cpu(),
                "float32_rows: weight ", i, " must be float32 [16n, ", K, "] on the CPU, got ", w.sizes());
    held.push_back(w.contiguous());
    const float* wp = held.back().data_ptr<float>();
    const float* b = nullptr;
    if (!biases.empty()) {
      const at::Tensor& bi = biases[i];
      TORCH_CHECK(bi.dim() == 1 && bi.size(0) == w.size(0) && bi.scalar_type() == at::kFloat && bi.device().is_cpu(),
                  "float32_rows: bias ", i, " must be float32 [", w.size(0), "] on the CPU");
      held.push_back(bi.contiguous());
      b = held.back().data_ptr<float>();
    }
    for (int64_t j = 0; j < w.size(0) / 16; ++j) {
      block.push_back(wp + j * 16 * K);
      block_bias.push_back(b ? b + j * 16 : nullptr);
    }
  }
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0), N = static_cast<int64_t>(block.size()) * 16;
  at::Tensor out = at::empty({M, N}, x.options());
  if (M > 0) product(rows.data_ptr<float>(), M, block, block_bias, out.data_ptr<float>(), K, at::get_num_threads());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(N);
  return out.view(shape);
}

// A unit of work's cost in rows passing over its packed weights: its expert's rows plus the packing (~4 rows' worth).
constexpr int64_t kPackCost = 4;

// The units [begin, end) of thread `thread` of `threads`: contiguous, of about equal cost (`prefix`: the units' costs'
// running sums from 0). Contiguous in expert order, the threads share few experts' rows and no output lines: units
// dealt one at a time in turn (OpenMP's dynamic schedule) put both threads on each expert's rows together and ran
// ~1.4x slower (2,048 tokens of tiny-moe: 1.8 ms against 1.26).
inline std::pair<size_t, size_t> share(const std::vector<int64_t>& prefix, int thread, int threads) {
  const int64_t total = prefix.back();
  const auto at = [&](int t) {
    return static_cast<size_t>(std::lower_bound(prefix.begin(), prefix.end(), total * t / threads) - prefix.begin());
  };
  return {at(thread), at(thread + 1)};
}

// Routed SwiGLU experts: copy (t, j) of token t goes through expert e = ids[t, j], (silu(x w1[e]^T) * (x w3[e]^T))
// w2[e]^T, and out[t] is the sum over j, in the order of the choices, of weights[t, j] times copy (t, j).
// The copies are sorted by expert (stable), so each chosen expert's weights are packed once per call and all of its
// copies pass over them (a loop per copy, inductor's, reads the weights and sums across a vector once per copy and
// output; eager, the sorted path gathers, converts and scatters through a dozen ATen calls). The threads take
// (expert, 16 or 32 outputs) units: gate and up side by side (a two-block tile, silu(gate) * up at the store), then
// down; then tokens for the weighted sum.
at::Tensor float32_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w1,
                           const at::Tensor& w3, const at::Tensor& w2) {
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong &&
                  weights.sizes() == ids.sizes(),
              "float32_experts: x [N, D], ids [N, k] (int64) and weights [N, k] expected, got ", x.sizes(), ", ",
              ids.sizes(), " and ", weights.sizes());
  const int64_t N = x.size(0), k = ids.size(1), E = w1.size(0), F = w1.size(1), D = x.size(1);
  for (const at::Tensor* t : {&x, &weights, &w1, &w3, &w2})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "float32_experts: float32 CPU tensors only");
  TORCH_CHECK(w1.dim() == 3 && w1.sizes() == w3.sizes() && w1.size(2) == D && w2.dim() == 3 && w2.size(0) == E &&
                  w2.size(1) == D && w2.size(2) == F && D % 16 == 0 && F % 16 == 0,
              "float32_experts: w1, w3 [E, F, D] and w2 [E, D, F] with D and F multiples of 16 expected, got ",
              w1.sizes(), ", ", w3.sizes(), ", ", w2.sizes(), " for D ", D);
  const at::Tensor xc = x.contiguous(), ic = ids.contiguous(), wc = weights.contiguous(), g = w1.contiguous(),
                   u = w3.contiguous(), d = w2.contiguous();
  const int64_t copies = N * k;
  const int64_t* id = ic.data_ptr<int64_t>();
  // expert e's copies: order[start[e] .. start[e + 1]); copy c sits at sorted position where[c]
  std::vector<int64_t> start(E + 1, 0), order(copies), where(copies);
  for (int64_t c = 0; c < copies; ++c) {
    TORCH_CHECK(id[c] >= 0 && id[c] < E, "float32_experts: expert id ", id[c], " out of range for ", E, " experts");
    ++start[id[c] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t c = 0; c < copies; ++c) {
    where[c] = next[id[c]]++;
    order[where[c]] = c;
  }
  // (expert, first block of 16 outputs) units in expert order, and their costs' running sums (`share`)
  std::vector<std::pair<int64_t, int64_t>> up_units, down_units;
  std::vector<int64_t> up_cost{0}, down_cost{0};
  for (int64_t e = 0; e < E; ++e) {
    const int64_t cost = start[e + 1] - start[e] + kPackCost;
    if (cost == kPackCost) continue;  // an expert no copy chose: its weights stay unread
    for (int64_t b = 0; b < F / 16; ++b) {
      up_units.emplace_back(e, b);
      up_cost.push_back(up_cost.back() + cost);
    }
    for (int64_t b = 0; b < D / 16; b += 2) {
      down_units.emplace_back(e, b);
      down_cost.push_back(down_cost.back() + cost);
    }
  }

  at::Tensor out = at::empty({N, D}, x.options());
  if (N == 0) return out;
  // the copies' inputs, hidden rows and outputs in sorted order (uninitialised: every element is written), each row
  // on whole cache lines (D and F are multiples of 16), so threads writing neighbouring outputs share none
  const auto lines = [](int64_t n) { return std::unique_ptr<float[], decltype(&std::free)>(
                                         static_cast<float*>(std::aligned_alloc(64, n * sizeof(float))), &std::free); };
  const auto xs = lines(copies * D), hs = lines(copies * F), ys = lines(copies * D);
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>(), *gp = g.data_ptr<float>(),
              *up = u.data_ptr<float>(), *dp = d.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* const none[2] = {nullptr, nullptr};
  const int64_t pack_k = D > F ? D : F;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    float* buf = static_cast<float*>(std::aligned_alloc(64, 2 * pack_k * 16 * sizeof(float)));
    alignas(64) float gate_up[8 * 32];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < copies; ++i) std::copy_n(xp + (order[i] / k) * D, D, xs.get() + i * D);
    const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const auto [up_begin, up_end] = share(up_cost, thread, threads);
    for (size_t i = up_begin; i < up_end; ++i) {
      const auto [e, b] = up_units[i];
      pack_block(gp + (e * F + b * 16) * D, D, buf);
      pack_block(up + (e * F + b * 16) * D, D, buf + D * 16);
      for (int64_t r0 = start[e]; r0 < start[e + 1]; r0 += 8) {
        const int64_t m = start[e + 1] - r0 < 8 ? start[e + 1] - r0 : 8;
        rows<2>(m, buf, xs.get() + r0 * D, D, none, gate_up, 32, 0);
        for (int64_t r = 0; r < m; ++r) {
          const __m512 gv = _mm512_loadu_ps(gate_up + r * 32), uv = _mm512_loadu_ps(gate_up + r * 32 + 16);
          const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(-gv)));
          _mm512_storeu_ps(hs.get() + (r0 + r) * F + b * 16, _mm512_mul_ps(silu, uv));
        }
      }
    }
#pragma omp barrier
    const auto [down_begin, down_end] = share(down_cost, thread, threads);
    for (size_t i = down_begin; i < down_end; ++i) {
      const auto [e, b0] = down_units[i];
      const int64_t nb = b0 + 1 < D / 16 ? 2 : 1;
      for (int64_t b = 0; b < nb; ++b) pack_block(dp + (e * D + (b0 + b) * 16) * F, F, buf + b * F * 16);
      for (int64_t r0 = start[e]; r0 < start[e + 1]; r0 += 8) {
        const int64_t m = start[e + 1] - r0 < 8 ? start[e + 1] - r0 : 8;
        if (nb == 2)
          rows<2>(m, buf, hs.get() + r0 * F, F, none, ys.get() + r0 * D, D, b0 * 16);
        else
          rows<1>(m, buf, hs.get() + r0 * F, F, none, ys.get() + r0 * D, D, b0 * 16);
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t)
      for (int64_t c0 = 0; c0 < D; c0 += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < k; ++j) {
          const __m512 y = _mm512_loadu_ps(ys.get() + where[t * k + j] * D + c0);
          const __m512 term = _mm512_mul_ps(_mm512_set1_ps(wp[t * k + j]), y);
          acc = j == 0 ? term : _mm512_add_ps(acc, term);
        }
        _mm512_storeu_ps(op + t * D + c0, acc);
      }
    std::free(buf);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("float32_rows(Tensor x, Tensor[] weights, Tensor[] biases) -> Tensor");
  m.def("float32_experts(Tensor x, Tensor ids, Tensor weights, Tensor w1, Tensor w3, Tensor w2) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("float32_rows", float32_rows);
  m.impl("float32_experts", float32_experts);
}
