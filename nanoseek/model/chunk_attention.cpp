// Causal attention over a training chunk on a CPU with AVX-512, forward and backward, packed documents kept apart:
// the torch operations nanoseek::chunk_attention and nanoseek::chunk_attention_backward (built with float32_rows.cpp
// against torch's headers by nanoseek/model/cpu_kernel.py, which registers their autograd formula and shapes, so a
// compiled training step calls them too).
//
// Query i sees key j when j <= i and both lie in one document. Where a row's document ids never decrease (packed
// documents) that is one run of keys, [start of i's document, i], and only those scores are computed; elsewhere every
// earlier key is tested. Eager, the blocked matmuls materialise each block's scores and pass over them for the mask,
// the softmax and its casts; compiled, the one-block form passes over all T x T of them, several times, from memory
// (16 MiB of float32 scores a layer at the demo's 16 x 256 tokens: the fused softmax and its backward were ~35% of
// the compiled pretraining step; docs/LOG.md, 2026-12-05, thirty-fourth session). Here one query's scores at a time
// stay in L1, flash-attention style: the forward keeps each row's log-sum-exp, the backward recomputes the
// probabilities from it. One (sequence, kv head) per unit of work, so the keys' and values' gradients of the query
// heads that share a kv head are summed by one thread. float32 throughout (the caller converts bf16 rows).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "vector_exp.h"  // exp16

namespace {

constexpr float kHidden = -std::numeric_limits<float>::infinity();

// The keys query i may see: [lo[i], i], and, where `exact`, only those of its document (a row whose ids decrease).
struct Rows {
  std::vector<int64_t> lo;  // [B * T]
  std::vector<char> exact;  // [B]
};

Rows visible(const std::optional<at::Tensor>& doc_ids, int64_t B, int64_t T) {
  Rows r{std::vector<int64_t>(B * T, 0), std::vector<char>(B, 0)};
  if (!doc_ids) return r;
  const int64_t* doc = doc_ids->data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* d = doc + b * T;
    for (int64_t i = 1; i < T; ++i) {
      if (d[i] < d[i - 1]) r.exact[b] = 1;
    }
    for (int64_t i = 0; i < T; ++i)
      r.lo[b * T + i] = r.exact[b] ? 0 : (i > 0 && d[i] == d[i - 1] ? r.lo[b * T + i - 1] : i);
  }
  return r;
}

// k [T, d] (row-major) -> kt [ceil(T / 16)][d][16]: one 64-byte load holds one feature of 16 keys (zeros past T).
void pack_keys(const float* k, int64_t T, int64_t d, float* kt) {
  for (int64_t blk = 0; blk * 16 < T; ++blk)
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t key = blk * 16 + j;
        kt[(blk * d + c) * 16 + j] = key < T ? k[key * d + c] : 0.0f;
      }
}

// s[j] = scale * q . k_j for the blocks of 16 keys that hold [lo, hi], then the lanes outside [lo, hi] (or, exact,
// of another document) set to -inf. Returns the largest score.
inline float scores(const float* q, const float* kt, int64_t d, float scale, int64_t lo, int64_t hi,
                    const int64_t* doc, bool exact, int64_t i, float* s) {
  __m512 best = _mm512_set1_ps(kHidden);
  for (int64_t blk = lo / 16; blk <= hi / 16; ++blk) {
    __m512 acc = _mm512_setzero_ps();
    const float* kb = kt + blk * d * 16;
    for (int64_t c = 0; c < d; ++c) acc = _mm512_fmadd_ps(_mm512_set1_ps(q[c]), _mm512_loadu_ps(kb + c * 16), acc);
    acc = _mm512_mul_ps(acc, _mm512_set1_ps(scale));
    const int64_t first = blk * 16;
    __mmask16 keep = 0xffff;
    if (first < lo) keep &= static_cast<__mmask16>(0xffff << (lo - first));
    if (first + 15 > hi) keep &= static_cast<__mmask16>(0xffff >> (first + 15 - hi));
    if (exact)
      for (int j = 0; j < 16; ++j)
        if (((keep >> j) & 1) && doc[first + j] != doc[i]) keep &= static_cast<__mmask16>(~(1u << j));
    acc = _mm512_mask_blend_ps(keep, _mm512_set1_ps(kHidden), acc);
    _mm512_storeu_ps(s + first, acc);
    best = _mm512_max_ps(best, acc);
  }
  return _mm512_reduce_max_ps(best);
}

// p[j] = exp(s[j] - shift) over the blocks holding [lo, hi] (hidden lanes: 0). Returns their sum.
inline float probabilities(float* s, int64_t lo, int64_t hi, float shift) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t blk = lo / 16; blk <= hi / 16; ++blk) {
    const __m512 v = _mm512_loadu_ps(s + blk * 16);
    const __mmask16 seen = _mm512_cmp_ps_mask(v, _mm512_set1_ps(kHidden), _CMP_NEQ_OQ);
    // hidden lanes take exp(0) and are zeroed: exp16 of -inf - shift would be NaN
    const __m512 p = _mm512_maskz_mov_ps(seen, exp16(_mm512_mask_sub_ps(_mm512_setzero_ps(), seen, v,
                                                                        _mm512_set1_ps(shift))));
    _mm512_storeu_ps(s + blk * 16, p);
    sum = _mm512_add_ps(sum, p);
  }
  return _mm512_reduce_add_ps(sum);
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& doc_ids) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "chunk_attention: q, k, v [B, H, T, d] expected");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Hkv = k.size(1);
  TORCH_CHECK_VALUE(k.size(0) == B && v.size(0) == B && k.size(2) == T && v.size(2) == T && v.size(1) == Hkv &&
                        k.size(3) == q.size(3) && Hkv > 0 && H % Hkv == 0,
                    "chunk_attention: q [B, H, T, d], k [B, Hkv, T, d] and v [B, Hkv, T, dv] with H a multiple of "
                    "Hkv expected, got ",
                    q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(q.size(3) % 16 == 0 && v.size(3) % 16 == 0,
                    "chunk_attention: head widths must be multiples of 16, got ", q.size(3), " and ", v.size(3));
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                      "chunk_attention: float32 CPU tensors only");
  if (doc_ids)
    TORCH_CHECK_VALUE(doc_ids->dim() == 2 && doc_ids->size(0) == B && doc_ids->size(1) == T &&
                          doc_ids->scalar_type() == at::kLong && doc_ids->device().is_cpu(),
                      "chunk_attention: doc_ids [B, T] int64 expected, got ", doc_ids->sizes());
}

float* floats(int64_t n) { return static_cast<float*>(std::aligned_alloc(64, (n + 16) * sizeof(float))); }

// (out [B, H, T, dv], the log-sum-exp of each query's scores [B, H, T])
std::tuple<at::Tensor, at::Tensor> chunk_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& v_in, const std::optional<at::Tensor>& doc_in,
                                                   double scale_in) {
  check(q_in, k_in, v_in, doc_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const std::optional<at::Tensor> doc_ids = doc_in ? std::optional<at::Tensor>(doc_in->contiguous()) : std::nullopt;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3), Hkv = k.size(1), dv = v.size(3);
  const int64_t rep = H / Hkv, nblk = (T + 15) / 16;
  const float scale = static_cast<float>(scale_in);
  at::Tensor out = at::empty({B, H, T, dv}, q.options()), lse = at::empty({B, H, T}, q.options());
  if (B * H * T == 0) return {out, lse};
  const Rows rows = visible(doc_ids, B, T);
  const int64_t* doc = doc_ids ? doc_ids->data_ptr<int64_t>() : nullptr;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
#pragma omp parallel num_threads(at::get_num_threads())
  {
    float* kt = floats(nblk * 16 * d);
    float* s = floats(nblk * 16);
#pragma omp for schedule(static)
    for (int64_t unit = 0; unit < B * Hkv; ++unit) {
      const int64_t b = unit / Hkv, g = unit % Hkv;
      pack_keys(kp + unit * T * d, T, d, kt);
      const float* vu = vp + unit * T * dv;
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h)
        for (int64_t i = 0; i < T; ++i) {
          const int64_t row = (b * H + h) * T + i, lo = rows.lo[b * T + i];
          const float best = scores(qp + row * d, kt, d, scale, lo, i, doc ? doc + b * T : nullptr, rows.exact[b], i, s);
          const float sum = probabilities(s, lo, i, best);
          lp[row] = best + std::log(sum);
          const __m512 norm = _mm512_set1_ps(1.0f / sum);
          for (int64_t c0 = 0; c0 < dv; c0 += 16) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = lo; j <= i; ++j)
              acc = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), _mm512_loadu_ps(vu + j * dv + c0), acc);
            _mm512_storeu_ps(op + row * dv + c0, _mm512_mul_ps(acc, norm));
          }
        }
    }
    std::free(kt);
    std::free(s);
  }
  return {out, lse};
}

// (dq, dk, dv) given the output's gradient and what the forward returned. Per query i and visible key j:
// p = exp(s - lse_i), dp = grad_i . v_j, ds = p (dp - grad_i . out_i); dq_i += scale ds k_j, dk_j += scale ds q_i,
// dv_j += p grad_i.
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_attention_backward(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& doc_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale_in) {
  check(q_in, k_in, v_in, doc_in);
  const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), d = q_in.size(3), Hkv = k_in.size(1),
                dv = v_in.size(3);
  TORCH_CHECK_VALUE(grad_in.sizes() == out_in.sizes() && out_in.dim() == 4 && out_in.size(0) == B &&
                        out_in.size(1) == H && out_in.size(2) == T && out_in.size(3) == dv && lse_in.dim() == 3 &&
                        lse_in.size(0) == B && lse_in.size(1) == H && lse_in.size(2) == T,
                    "chunk_attention_backward: grad and out [B, H, T, dv], lse [B, H, T] expected");
  for (const at::Tensor* t : {&grad_in, &out_in, &lse_in})
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->device().is_cpu(),
                      "chunk_attention_backward: float32 CPU tensors only");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(), go = grad_in.contiguous(),
                   o = out_in.contiguous(), lse = lse_in.contiguous();
  const std::optional<at::Tensor> doc_ids = doc_in ? std::optional<at::Tensor>(doc_in->contiguous()) : std::nullopt;
  const int64_t rep = H / Hkv, nblk = (T + 15) / 16;
  const float scale = static_cast<float>(scale_in);
  at::Tensor dq = at::empty_like(q), dk = at::zeros_like(k), dvt = at::zeros_like(v);
  if (B * H * T == 0) return {dq, dk, dvt};
  const Rows rows = visible(doc_ids, B, T);
  const int64_t* doc = doc_ids ? doc_ids->data_ptr<int64_t>() : nullptr;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(),
              *gp = go.data_ptr<float>(), *opp = o.data_ptr<float>(), *lp = lse.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dvt.data_ptr<float>();
#pragma omp parallel num_threads(at::get_num_threads())
  {
    float* kt = floats(nblk * 16 * d);
    float* vt = floats(nblk * 16 * dv);
    float* p = floats(nblk * 16);
    float* ds = floats(nblk * 16);
#pragma omp for schedule(static)
    for (int64_t unit = 0; unit < B * Hkv; ++unit) {
      const int64_t b = unit / Hkv, g = unit % Hkv;
      const float *ku = kp + unit * T * d, *vu = vp + unit * T * dv;
      float *dku = dkp + unit * T * d, *dvu = dvp + unit * T * dv;
      pack_keys(ku, T, d, kt);
      pack_keys(vu, T, dv, vt);
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h)
        for (int64_t i = 0; i < T; ++i) {
          const int64_t row = (b * H + h) * T + i, lo = rows.lo[b * T + i];
          const float *qi = qp + row * d, *gi = gp + row * dv;
          scores(qi, kt, d, scale, lo, i, doc ? doc + b * T : nullptr, rows.exact[b], i, p);
          probabilities(p, lo, i, lp[row]);
          __m512 dot = _mm512_setzero_ps();
          for (int64_t c0 = 0; c0 < dv; c0 += 16)
            dot = _mm512_fmadd_ps(_mm512_loadu_ps(gi + c0), _mm512_loadu_ps(opp + row * dv + c0), dot);
          const __m512 di = _mm512_set1_ps(_mm512_reduce_add_ps(dot));
          for (int64_t blk = lo / 16; blk <= i / 16; ++blk) {
            __m512 dp = _mm512_setzero_ps();
            const float* vb = vt + blk * dv * 16;
            for (int64_t c = 0; c < dv; ++c) dp = _mm512_fmadd_ps(_mm512_set1_ps(gi[c]), _mm512_loadu_ps(vb + c * 16), dp);
            const __m512 pb = _mm512_loadu_ps(p + blk * 16);  // 0 at hidden keys, so ds is too
            _mm512_storeu_ps(ds + blk * 16, _mm512_mul_ps(_mm512_mul_ps(pb, _mm512_sub_ps(dp, di)),
                                                          _mm512_set1_ps(scale)));
          }
          for (int64_t c0 = 0; c0 < d; c0 += 16) {
            const __m512 qv = _mm512_loadu_ps(qi + c0);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = lo; j <= i; ++j) {
              const __m512 sj = _mm512_set1_ps(ds[j]);
              acc = _mm512_fmadd_ps(sj, _mm512_loadu_ps(ku + j * d + c0), acc);
              _mm512_storeu_ps(dku + j * d + c0, _mm512_fmadd_ps(sj, qv, _mm512_loadu_ps(dku + j * d + c0)));
            }
            _mm512_storeu_ps(dqp + row * d + c0, acc);
          }
          for (int64_t c0 = 0; c0 < dv; c0 += 16) {
            const __m512 gv = _mm512_loadu_ps(gi + c0);
            for (int64_t j = lo; j <= i; ++j)
              _mm512_storeu_ps(dvu + j * dv + c0,
                               _mm512_fmadd_ps(_mm512_set1_ps(p[j]), gv, _mm512_loadu_ps(dvu + j * dv + c0)));
          }
        }
    }
    std::free(kt);
    std::free(vt);
    std::free(p);
    std::free(ds);
  }
  return {dq, dk, dvt};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("chunk_attention(Tensor q, Tensor k, Tensor v, Tensor? doc_ids, float scale) -> (Tensor, Tensor)");
  m.def(
      "chunk_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? doc_ids, Tensor out, Tensor lse, "
      "float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("chunk_attention", chunk_attention);
  m.impl("chunk_attention_backward", chunk_attention_backward);
}
