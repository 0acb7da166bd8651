// Rows times float32 weights on a CPU with AVX-512: the products of a float32 model's decode step, registered as the
// torch operation nanoseek::float32_rows (an MoE layer's routed experts, on the same tiles, are float32_experts.cpp).
// nanoseek/model/cpu_kernel.py builds both against torch's headers, so a compiled step calls them from C++, not
// through Python.
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

#include <cstdlib>
#include <vector>

#include "float32_tiles.h"  // pack_block, rows: the packed blocks and the tiles that pass over them

namespace {

using nanoseek_tiles::pack_block;
using nanoseek_tiles::rows;

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("float32_rows(Tensor x, Tensor[] weights, Tensor[] biases) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("float32_rows", float32_rows); }
