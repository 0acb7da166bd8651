// An MoE layer's routed SwiGLU experts in float32 on a CPU with AVX-512, as torch operations (built with
// float32_rows.cpp against torch's headers by nanoseek/model/cpu_kernel.py):
//   nanoseek::float32_experts           the layer's output, no gradients (decoding, prefill, evaluation);
//   nanoseek::float32_experts_train     the same, and what the backward reads (the gate and up pre-activations and
//                                       each copy's output, in sorted order);
//   nanoseek::float32_experts_backward  the gradients of the rows, the gate weights and the three expert weights.
// cpu_kernel.float32_experts puts the last two under autograd. Eager, the padded path gathers, pads, multiplies,
// unpads and scatters through a few dozen ATen calls forward and backward, with autocast's casts of the expert weights
// and their gradients; at a small MoE's shapes those calls, not the arithmetic, are the step (docs/LOG.md,
// 2026-12-05, thirty-fourth session).
//
// Copy (t, j) of token t goes through expert e = ids[t, j]. The copies are sorted by expert (stable), so each expert's
// rows lie together and its weights stay in cache while they pass; the threads take experts (or (expert, 16 or 32
// outputs) units forward) in contiguous runs of about equal cost. Every sum runs in float32 (tested against float64).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "float32_tiles.h"  // pack_block, rows: the packed blocks and the tiles that pass over them
#include "vector_exp.h"     // exp16: SiLU's e^-x (2^n by scalef: 0 or inf at the ends, so SiLU is x or 0)

namespace {

using nanoseek_tiles::pack_block;
using nanoseek_tiles::rows;

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

// The copies sorted by expert: expert e's copies are order[start[e] .. start[e + 1]), copy c sits at where[c].
struct Sorted {
  std::vector<int64_t> start, order, where;
};

Sorted sort_by_expert(const int64_t* id, int64_t copies, int64_t E) {
  Sorted s{std::vector<int64_t>(E + 1, 0), std::vector<int64_t>(copies), std::vector<int64_t>(copies)};
  for (int64_t c = 0; c < copies; ++c) {
    TORCH_CHECK(id[c] >= 0 && id[c] < E, "float32_experts: expert id ", id[c], " out of range for ", E,
                      " experts");
    ++s.start[id[c] + 1];
  }
  for (int64_t e = 0; e < E; ++e) s.start[e + 1] += s.start[e];
  std::vector<int64_t> next(s.start.begin(), s.start.end() - 1);
  for (int64_t c = 0; c < copies; ++c) {
    s.where[c] = next[id[c]]++;
    s.order[s.where[c]] = c;
  }
  return s;
}

using Buffer = std::unique_ptr<float[], decltype(&std::free)>;

// n floats on whole cache lines (rows of multiples of 16 floats then share none between threads), uninitialised.
Buffer lines(int64_t n) {
  return Buffer(static_cast<float*>(std::aligned_alloc(64, std::max<int64_t>(n, 16) * sizeof(float))), &std::free);
}

void check_inputs(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w1,
                  const at::Tensor& w3, const at::Tensor& w2) {
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && ids.size(0) == x.size(0) && ids.scalar_type() == at::kLong &&
                        weights.sizes() == ids.sizes(),
                    "float32_experts: x [N, D], ids [N, k] (int64) and weights [N, k] expected, got ", x.sizes(), ", ",
                    ids.sizes(), " and ", weights.sizes());
  for (const at::Tensor* t : {&x, &weights, &w1, &w3, &w2})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                      "float32_experts: float32 CPU tensors only");
  const int64_t D = x.size(1);
  TORCH_CHECK(w1.dim() == 3 && w1.sizes() == w3.sizes() && w1.size(2) == D && w2.dim() == 3 &&
                        w2.size(0) == w1.size(0) && w2.size(1) == D && w2.size(2) == w1.size(1) && D % 16 == 0 &&
                        w1.size(1) % 16 == 0,
                    "float32_experts: w1, w3 [E, F, D] and w2 [E, D, F] with D and F multiples of 16 expected, got ",
                    w1.sizes(), ", ", w3.sizes(), ", ", w2.sizes(), " for D ", D);
}

// The forward: out[t] is the sum over j, in the order of the choices, of weights[t, j] times copy (t, j)'s
// (silu(x w1[e]^T) * (x w3[e]^T)) w2[e]^T. The threads take (expert, 16 outputs) units of gate and up side by side (a
// two-block tile, silu(gate) * up at the store), then (expert, 32 outputs) units of down, then tokens for the weighted
// sum. ys [copies, D] receives each copy's output in sorted order; gate_pre and up_pre [copies, F], where not null,
// the pre-activations.
void forward(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w1,
             const at::Tensor& w3, const at::Tensor& w2, const Sorted& s, float* op, float* ys, float* gate_pre,
             float* up_pre) {
  const int64_t N = x.size(0), k = ids.size(1), E = w1.size(0), F = w1.size(1), D = x.size(1), copies = N * k;
  // (expert, first block of 16 outputs) units in expert order, and their costs' running sums (`share`)
  std::vector<std::pair<int64_t, int64_t>> up_units, down_units;
  std::vector<int64_t> up_cost{0}, down_cost{0};
  for (int64_t e = 0; e < E; ++e) {
    const int64_t cost = s.start[e + 1] - s.start[e] + kPackCost;
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
  const Buffer xs = lines(copies * D), hs = lines(copies * F);
  const float *xp = x.data_ptr<float>(), *wp = weights.data_ptr<float>(), *gp = w1.data_ptr<float>(),
              *up = w3.data_ptr<float>(), *dp = w2.data_ptr<float>();
  const float* const none[2] = {nullptr, nullptr};
  const int64_t pack_k = D > F ? D : F;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    float* buf = static_cast<float*>(std::aligned_alloc(64, 2 * pack_k * 16 * sizeof(float)));
    alignas(64) float gate_up[8 * 32];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < copies; ++i) std::copy_n(xp + (s.order[i] / k) * D, D, xs.get() + i * D);
    const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const auto [up_begin, up_end] = share(up_cost, thread, threads);
    for (size_t i = up_begin; i < up_end; ++i) {
      const auto [e, b] = up_units[i];
      pack_block(gp + (e * F + b * 16) * D, D, buf);
      pack_block(up + (e * F + b * 16) * D, D, buf + D * 16);
      for (int64_t r0 = s.start[e]; r0 < s.start[e + 1]; r0 += 8) {
        const int64_t m = s.start[e + 1] - r0 < 8 ? s.start[e + 1] - r0 : 8;
        rows<2>(m, buf, xs.get() + r0 * D, D, none, gate_up, 32, 0);
        for (int64_t r = 0; r < m; ++r) {
          const __m512 gv = _mm512_loadu_ps(gate_up + r * 32), uv = _mm512_loadu_ps(gate_up + r * 32 + 16);
          const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(-gv)));
          const int64_t at = (r0 + r) * F + b * 16;
          _mm512_storeu_ps(hs.get() + at, _mm512_mul_ps(silu, uv));
          if (gate_pre) {
            _mm512_storeu_ps(gate_pre + at, gv);
            _mm512_storeu_ps(up_pre + at, uv);
          }
        }
      }
    }
#pragma omp barrier
    const auto [down_begin, down_end] = share(down_cost, thread, threads);
    for (size_t i = down_begin; i < down_end; ++i) {
      const auto [e, b0] = down_units[i];
      const int64_t nb = b0 + 1 < D / 16 ? 2 : 1;
      for (int64_t b = 0; b < nb; ++b) pack_block(dp + (e * D + (b0 + b) * 16) * F, F, buf + b * F * 16);
      for (int64_t r0 = s.start[e]; r0 < s.start[e + 1]; r0 += 8) {
        const int64_t m = s.start[e + 1] - r0 < 8 ? s.start[e + 1] - r0 : 8;
        if (nb == 2)
          rows<2>(m, buf, hs.get() + r0 * F, F, none, ys + r0 * D, D, b0 * 16);
        else
          rows<1>(m, buf, hs.get() + r0 * F, F, none, ys + r0 * D, D, b0 * 16);
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t)
      for (int64_t c0 = 0; c0 < D; c0 += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < k; ++j) {
          const __m512 y = _mm512_loadu_ps(ys + s.where[t * k + j] * D + c0);
          const __m512 term = _mm512_mul_ps(_mm512_set1_ps(wp[t * k + j]), y);
          acc = j == 0 ? term : _mm512_add_ps(acc, term);
        }
        _mm512_storeu_ps(op + t * D + c0, acc);
      }
    std::free(buf);
  }
}

at::Tensor float32_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w1,
                           const at::Tensor& w3, const at::Tensor& w2) {
  check_inputs(x, ids, weights, w1, w3, w2);
  const at::Tensor xc = x.contiguous(), ic = ids.contiguous(), wc = weights.contiguous(), g = w1.contiguous(),
                   u = w3.contiguous(), d = w2.contiguous();
  const Sorted s = sort_by_expert(ic.data_ptr<int64_t>(), ic.numel(), w1.size(0));
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.size(0) == 0) return out;
  const Buffer ys = lines(ic.numel() * x.size(1));
  forward(xc, ic, wc, g, u, d, s, out.data_ptr<float>(), ys.get(), nullptr, nullptr);
  return out;
}

// (out, gate and up pre-activations [N * k, F], each copy's output [N * k, D]; the last three in sorted order)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> float32_experts_train(
    const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w1, const at::Tensor& w3,
    const at::Tensor& w2) {
  check_inputs(x, ids, weights, w1, w3, w2);
  const at::Tensor xc = x.contiguous(), ic = ids.contiguous(), wc = weights.contiguous(), g = w1.contiguous(),
                   u = w3.contiguous(), d = w2.contiguous();
  const int64_t copies = ic.numel(), F = w1.size(1), D = x.size(1);
  const Sorted s = sort_by_expert(ic.data_ptr<int64_t>(), copies, w1.size(0));
  at::Tensor out = at::empty({x.size(0), D}, x.options()), gate = at::empty({copies, F}, x.options()),
             up = at::empty({copies, F}, x.options()), ys = at::empty({copies, D}, x.options());
  if (copies > 0)
    forward(xc, ic, wc, g, u, d, s, out.data_ptr<float>(), ys.data_ptr<float>(), gate.data_ptr<float>(),
            up.data_ptr<float>());
  return {out, gate, up, ys};
}

// c[m, n] (+)= sum over k of a[m * am + k * ak] * b[k * ldb + n], for m < M rows (up to 8) and the n of NB blocks of
// 16 columns: rows of a (or, with am = 1, its columns) against a row-major b.
template <int M, int NB>
inline void tile_ab(const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb, int64_t K, float* c,
                    int64_t ldc, bool add) {
  __m512 acc[M][NB];
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = add ? _mm512_loadu_ps(c + r * ldc + j * 16) : _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K; ++kk) {
    __m512 w[NB];
    for (int j = 0; j < NB; ++j) w[j] = _mm512_loadu_ps(b + kk * ldb + j * 16);
    for (int r = 0; r < M; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r * am + kk * ak]);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_fmadd_ps(ar, w[j], acc[r][j]);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(c + r * ldc + j * 16, acc[r][j]);
}

template <int NB>
inline void tile_rows(int64_t m, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb, int64_t K,
                      float* c, int64_t ldc, bool add) {
  switch (m) {
    case 1: tile_ab<1, NB>(a, am, ak, b, ldb, K, c, ldc, add); break;
    case 2: tile_ab<2, NB>(a, am, ak, b, ldb, K, c, ldc, add); break;
    case 3: tile_ab<3, NB>(a, am, ak, b, ldb, K, c, ldc, add); break;
    case 4: tile_ab<4, NB>(a, am, ak, b, ldb, K, c, ldc, add); break;
    case 5: tile_ab<5, NB>(a, am, ak, b, ldb, K, c, ldc, add); break;
    case 6: tile_ab<6, NB>(a, am, ak, b, ldb, K, c, ldc, add); break;
    case 7: tile_ab<7, NB>(a, am, ak, b, ldb, K, c, ldc, add); break;
    default: tile_ab<8, NB>(a, am, ak, b, ldb, K, c, ldc, add); break;
  }
}

// C [M, N] (+)= A [M, K] B [K, N], A read as a[m * am + k * ak] (am = 1: A is stored transposed), B and C row-major
// (strides ldb, ldc); N a multiple of 16. One thread: the backward runs one expert per call.
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool add) {
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    const bool two = N - n0 >= 32;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t m = M - m0 < 8 ? M - m0 : 8;
      if (two)
        tile_rows<2>(m, a + m0 * am, am, ak, b + n0, ldb, K, c + m0 * ldc + n0, ldc, add);
      else
        tile_rows<1>(m, a + m0 * am, am, ak, b + n0, ldb, K, c + m0 * ldc + n0, ldc, add);
    }
  }
}

// The gradients (of x, the gate weights, w1, w3, w2) given the output's `grad` and what float32_experts_train kept.
// Per sorted copy i (token t, choice j, expert e; y its output, g and u its pre-activations, h = silu(g) * u):
//   d weights[t, j] = grad[t] . y,   dy = weights[t, j] grad[t],   dh = dy w2[e],
//   dg = dh u silu'(g),   du = dh silu(g),   dx[t] += dg w1[e] + du w3[e],
//   dw2[e] += dy^T h,   dw1[e] += dg^T x[t],   dw3[e] += du^T x[t].
// First the copies (dy and d weights), then the experts in contiguous runs of about equal cost per thread (each
// thread writes its own experts' weight gradients and copies' dx rows), then the tokens (dx summed over the choices
// in their order).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> float32_experts_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
    const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2, const at::Tensor& gate, const at::Tensor& up,
    const at::Tensor& ys) {
  check_inputs(x, ids, weights, w1, w3, w2);
  const int64_t N = x.size(0), k = ids.size(1), E = w1.size(0), F = w1.size(1), D = x.size(1), copies = N * k;
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == at::kFloat && gate.sizes() == up.sizes() &&
                        gate.dim() == 2 && gate.size(0) == copies && gate.size(1) == F && ys.dim() == 2 &&
                        ys.size(0) == copies && ys.size(1) == D,
                    "float32_experts_backward: grad [N, D], gate and up [N * k, F], ys [N * k, D] expected");
  for (const at::Tensor* t : {&grad, &gate, &up, &ys})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                      "float32_experts_backward: float32 CPU tensors only");
  const at::Tensor xc = x.contiguous(), ic = ids.contiguous(), wc = weights.contiguous(), gc = grad.contiguous(),
                   w1c = w1.contiguous(), w3c = w3.contiguous(), w2c = w2.contiguous(), gatec = gate.contiguous(),
                   upc = up.contiguous(), ysc = ys.contiguous();
  const Sorted s = sort_by_expert(ic.data_ptr<int64_t>(), copies, E);
  at::Tensor dx = at::empty({N, D}, x.options()), dweights = at::empty({N, k}, x.options()),
             dw1 = at::empty({E, F, D}, x.options()), dw3 = at::empty({E, F, D}, x.options()),
             dw2 = at::empty({E, D, F}, x.options());
  std::vector<int64_t> cost{0};  // every expert, a chosen one's rows plus a few (an unchosen one: zeros written)
  for (int64_t e = 0; e < E; ++e) cost.push_back(cost.back() + s.start[e + 1] - s.start[e] + kPackCost);
  const Buffer xs = lines(copies * D), dys = lines(copies * D), dxs = lines(copies * D), hs = lines(copies * F),
               dgs = lines(copies * F), dus = lines(copies * F);
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>(), *gp = gc.data_ptr<float>(),
              *w1p = w1c.data_ptr<float>(), *w3p = w3c.data_ptr<float>(), *w2p = w2c.data_ptr<float>(),
              *gatep = gatec.data_ptr<float>(), *upp = upc.data_ptr<float>(), *yp = ysc.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *dwp = dweights.data_ptr<float>(), *dw1p = dw1.data_ptr<float>(),
        *dw3p = dw3.data_ptr<float>(), *dw2p = dw2.data_ptr<float>();
#pragma omp parallel num_threads(at::get_num_threads())
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < copies; ++i) {
      const int64_t c = s.order[i], t = c / k;
      const __m512 scale = _mm512_set1_ps(wp[c]);
      __m512 dot = _mm512_setzero_ps();
      for (int64_t c0 = 0; c0 < D; c0 += 16) {
        const __m512 gv = _mm512_loadu_ps(gp + t * D + c0);
        dot = _mm512_fmadd_ps(gv, _mm512_loadu_ps(yp + i * D + c0), dot);
        _mm512_storeu_ps(dys.get() + i * D + c0, _mm512_mul_ps(scale, gv));
        _mm512_storeu_ps(xs.get() + i * D + c0, _mm512_loadu_ps(xp + t * D + c0));
      }
      dwp[c] = _mm512_reduce_add_ps(dot);
    }
    const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const auto [begin, end] = share(cost, thread, threads);
    for (size_t e = begin; e < end; ++e) {
      const int64_t r0 = s.start[e], m = s.start[e + 1] - r0;
      float *dw1e = dw1p + e * F * D, *dw3e = dw3p + e * F * D, *dw2e = dw2p + e * D * F;
      if (m == 0) {
        std::fill_n(dw1e, F * D, 0.0f);
        std::fill_n(dw3e, F * D, 0.0f);
        std::fill_n(dw2e, D * F, 0.0f);
        continue;
      }
      float *dy = dys.get() + r0 * D, *h = hs.get() + r0 * F, *dg = dgs.get() + r0 * F, *du = dus.get() + r0 * F;
      gemm(m, F, D, dy, D, 1, w2p + e * D * F, F, dg, F, false);  // dh, into dg's rows
      for (int64_t i = 0; i < m * F; i += 16) {
        const __m512 g = _mm512_loadu_ps(gatep + r0 * F + i), u = _mm512_loadu_ps(upp + r0 * F + i);
        const __m512 dh = _mm512_loadu_ps(dg + i), one = _mm512_set1_ps(1.0f);
        const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp16(-g)));
        const __m512 silu = _mm512_mul_ps(g, sig);
        // silu'(g) = sig (1 + g (1 - sig))
        const __m512 slope = _mm512_mul_ps(sig, _mm512_fmadd_ps(g, _mm512_sub_ps(one, sig), one));
        _mm512_storeu_ps(h + i, _mm512_mul_ps(silu, u));
        _mm512_storeu_ps(dg + i, _mm512_mul_ps(_mm512_mul_ps(dh, u), slope));
        _mm512_storeu_ps(du + i, _mm512_mul_ps(dh, silu));
      }
      const float* xe = xs.get() + r0 * D;
      gemm(D, F, m, dy, 1, D, h, F, dw2e, F, false);   // dw2[e] = dy^T h
      gemm(F, D, m, dg, 1, F, xe, D, dw1e, D, false);  // dw1[e] = dg^T x
      gemm(F, D, m, du, 1, F, xe, D, dw3e, D, false);  // dw3[e] = du^T x
      float* dxe = dxs.get() + r0 * D;
      gemm(m, D, F, dg, F, 1, w1p + e * F * D, D, dxe, D, false);  // dx = dg w1[e]
      gemm(m, D, F, du, F, 1, w3p + e * F * D, D, dxe, D, true);   //    + du w3[e]
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t t = 0; t < N; ++t)
      for (int64_t c0 = 0; c0 < D; c0 += 16) {
        __m512 acc = _mm512_loadu_ps(dxs.get() + s.where[t * k] * D + c0);
        for (int64_t j = 1; j < k; ++j)
          acc = _mm512_add_ps(acc, _mm512_loadu_ps(dxs.get() + s.where[t * k + j] * D + c0));
        _mm512_storeu_ps(dxp + t * D + c0, acc);
      }
  }
  return {dx, dweights, dw1, dw3, dw2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("float32_experts(Tensor x, Tensor ids, Tensor weights, Tensor w1, Tensor w3, Tensor w2) -> Tensor");
  m.def(
      "float32_experts_train(Tensor x, Tensor ids, Tensor weights, Tensor w1, Tensor w3, Tensor w2) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "float32_experts_backward(Tensor grad, Tensor x, Tensor ids, Tensor weights, Tensor w1, Tensor w3, Tensor w2, "
      "Tensor gate, Tensor up, Tensor ys) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("float32_experts", float32_experts);
  m.impl("float32_experts_train", float32_experts_train);
  m.impl("float32_experts_backward", float32_experts_backward);
}
