// Cache-blocked LM head + logsumexp + target gather on CPU (the forward of chunked.py, fused).
//
// For each token i (x_i = h_i . W^T in fp32, z = transform(x), t_i the target):
//     lse_i = logsumexp_v z_iv          zt_i = z_{i, t_i}
// transform(x) = c * tanh(s * x / c) with a soft-cap c > 0, else s * x.
//
// Work split: threads take blocks of `rows` tokens one at a time (an atomic counter, so a thread slowed by
// another process on its core takes fewer). A thread walks the vocabulary in blocks of
// `cols` entries: one single-threaded GEMM writes the fp32 tile [rows, cols] (small enough to stay in
// this core's L2), then each tile row gets its max, then sum exp(z - max), merged
// into the row's running (max, sum) online:  m' = max(m, m_t);  s' = s e^(m - m') + s_t e^(m_t - m').
// The element-wise work uses ATen's own vectorized CPU kernels, called on this thread's tile: the gain
// over the pure-torch path is one parallel region per call (no per-op thread barriers, which stall
// badly when the cores are shared) and tiles that never leave the core's cache.
// The [N, V] logits never exist; each tile is read back from cache, not memory.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>


// hidden [N, D] fp32 contiguous, weight [V, D] fp32 contiguous, targets [N] int64.
// Returns {lse [N] fp32, target logit [N] fp32}. softcap <= 0 means none.
std::vector<at::Tensor> lse_target_fwd(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                       double logit_scale, double softcap, int64_t rows, int64_t cols) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), "shapes");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "fp32 only");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "contiguous only");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.numel() == hidden.size(0), "targets");
  TORCH_CHECK(rows > 0 && cols > 0, "block sizes");
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  at::Tensor lse = at::empty({n}, hidden.options());
  at::Tensor zt = at::empty({n}, hidden.options());
  const at::Tensor tgt_c = targets.contiguous();  // kept alive for the raw pointer below
  const int64_t* tgt = tgt_c.data_ptr<int64_t>();
  float* lse_p = lse.data_ptr<float>();
  float* zt_p = zt.data_ptr<float>();
  const float scale = static_cast<float>(logit_scale);
  const float cap = static_cast<float>(softcap);
  const bool has_cap = softcap > 0.0;
  const int64_t nblocks = (n + rows - 1) / rows;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblocks));
  std::atomic<int64_t> next_block{0};  // row blocks handed out one at a time: a stalled thread takes fewer
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads do not inherit the caller's
    at::Tensor tile = at::empty({rows, cols}, hidden.options());  // [rows, cols] fp32, this thread's
    at::Tensor mt_buf = at::empty({rows}, hidden.options()), st_buf = at::empty({rows}, hidden.options());
    std::vector<float> m(rows), s(rows);
    for (int64_t blk = next_block++; blk < nblocks; blk = next_block++) {
      const int64_t a = blk * rows, r = std::min(rows, n - a);
      at::Tensor h = hidden.narrow(0, a, r);  // [r, D]
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(s.begin(), s.end(), 0.0f);
      for (int64_t v0 = 0; v0 < vocab; v0 += cols) {
        const int64_t c = std::min(cols, vocab - v0);
        at::Tensor z = tile.narrow(0, 0, r).narrow(1, 0, c);  // [r, c], row stride `cols`
        at::mm_out(z, h, weight.narrow(0, v0, c).t());
        if (scale != 1.0f) z.mul_(scale);
        if (has_cap) z.div_(cap).tanh_().mul_(cap);
        const float* zp = tile.data_ptr<float>();
        for (int64_t i = 0; i < r; ++i) {  // target logits, before the tile is overwritten by exp
          const int64_t t = tgt[a + i];
          if (t >= v0 && t < v0 + c) zt_p[a + i] = zp[i * cols + (t - v0)];
        }
        // tile max and sum of exp(z - max) per row, with ATen's vectorized single-threaded kernels
        // (we are inside a parallel region: each op runs on this thread, on data in this core's cache)
        at::Tensor mt = mt_buf.narrow(0, 0, r), st = st_buf.narrow(0, 0, r);
        at::amax_out(mt, z, {1});
        at::sum_out(st, z.sub_(mt.unsqueeze(1)).exp_(), {1});
        const float* mtp = mt.data_ptr<float>();
        const float* stp = st.data_ptr<float>();
        for (int64_t i = 0; i < r; ++i) {
          const float mn = std::max(m[i], mtp[i]);
          s[i] = s[i] * std::exp(m[i] - mn) + stp[i] * std::exp(mtp[i] - mn);
          m[i] = mn;
        }
      }
      for (int64_t i = 0; i < r; ++i) lse_p[a + i] = m[i] + std::log(s[i]);
    }
  });
  return {lse, zt};
}

// Backward, softmax part. With coef_i = -g_i * s (g = d loss / d out, s the logit scale):
//     dx_iv = coef_i * p_iv * d_iv,   p_iv = exp(z_iv - lse_i),   d_iv = 1 - tanh^2(s x_iv / c) (1 without soft-cap)
//     d_hidden = dx W  [N, D],        d_weight = dx^T h  [V, D]
// (the target term g_i s d_{i,t_i} at (i, t_i) is a gather / index_add done by the caller, O(N D)).
// Work split: the vocabulary is cut into `cols`-wide blocks, handed out one at a time (an atomic counter) to
// `parts` = threads workers, so every d_weight row has one writer (first row block: mm, then addmm) and a
// thread slowed by another process on its core takes fewer blocks (static halves waited for the slower one).
// A worker takes a vocab block (outer) and walks all row blocks of `rows` tokens (inner): it recomputes the fp32
// tile x = h_r W_v^T [rows, cols] (stays in L2), turns it into dx in place with ATen's vectorized kernels,
// then d_weight[v] += dx^T h_r and d_hidden_part[r] += dx W_v, single-threaded GEMMs on this thread.
// d_hidden has one [chunk, D] fp32 partial per worker beyond the first (worker 0 writes the output), summed at the end.
// Rows go in chunks of `chunk_rows` (one parallel region each), which bounds the partials' memory.
std::vector<at::Tensor> softmax_bwd(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& lse,
                                    const at::Tensor& coef, double logit_scale, double softcap, int64_t rows,
                                    int64_t cols, int64_t chunk_rows, bool need_hidden, bool need_weight) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), "shapes");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "fp32 only");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "contiguous only");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && coef.scalar_type() == at::kFloat, "lse / coef fp32");
  TORCH_CHECK(lse.numel() == hidden.size(0) && coef.numel() == hidden.size(0), "lse / coef [N]");
  TORCH_CHECK(rows > 0 && cols > 0, "block sizes");
  const int64_t n = hidden.size(0), d = hidden.size(1), vocab = weight.size(0);
  at::Tensor dh = need_hidden ? at::zeros({n, d}, hidden.options()) : at::Tensor();
  at::Tensor dw = need_weight ? at::empty({vocab, d}, weight.options()) : at::Tensor();
  if (n == 0 || vocab == 0 || !(need_hidden || need_weight)) {
    if (need_weight) dw.zero_();
    return {dh, dw};
  }
  const at::Tensor lse_c = lse.contiguous().view({n, 1}), coef_c = coef.contiguous().view({n, 1});
  const float scale = static_cast<float>(logit_scale);
  const float cap = static_cast<float>(softcap);
  const bool has_cap = softcap > 0.0;
  const int64_t nvb = (vocab + cols - 1) / cols;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nvb));
  // d_hidden partials of parts 1.. over one chunk of `chunk` rows (part 0 accumulates into dh itself)
  const int64_t chunk = std::min(n, std::max<int64_t>(1, chunk_rows));
  at::Tensor partials = (need_hidden && parts > 1) ? at::empty({parts - 1, chunk, d}, hidden.options()) : at::Tensor();
  for (int64_t c0 = 0; c0 < n; c0 += chunk) {  // one parallel region per chunk of rows
    const int64_t c1 = std::min(n, c0 + chunk);
    if (partials.defined()) partials.zero_();
    std::atomic<int64_t> next_block{0};
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {  // one call per worker (or all inline)
      at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads do not inherit the caller's
      at::Tensor tile = at::empty({rows, cols}, hidden.options());                              // x -> dx
      at::Tensor dtile = has_cap ? at::empty({rows, cols}, hidden.options()) : at::Tensor();  // 1 - tanh^2
      for (int64_t part = p0; part < p1; ++part) {
        at::Tensor dhp = need_hidden ? (part == 0 ? dh.narrow(0, c0, c1 - c0) : partials.select(0, part - 1))
                                     : at::Tensor();  // [c1 - c0, D], row 0 = token c0
        for (int64_t vb = next_block++; vb < nvb; vb = next_block++) {  // dynamic: a stalled thread takes fewer
          const int64_t v0 = vb * cols, c = std::min(cols, vocab - v0);
          const at::Tensor w_v = weight.narrow(0, v0, c);  // [c, D]
          for (int64_t a = c0; a < c1; a += rows) {
            const int64_t r = std::min(rows, c1 - a);
            const at::Tensor h_r = hidden.narrow(0, a, r);  // [r, D]
            at::Tensor x = tile.narrow(0, 0, r).narrow(1, 0, c);  // [r, c], row stride `cols`
            at::mm_out(x, h_r, w_v.t());
            const at::Tensor lse_r = lse_c.narrow(0, a, r), coef_r = coef_c.narrow(0, a, r);  // [r, 1]
            if (has_cap) {
              x.mul_(scale / cap).tanh_();  // th
              at::Tensor dd = dtile.narrow(0, 0, r).narrow(1, 0, c);
              at::mul_out(dd, x, x).neg_().add_(1.0);  // 1 - th^2
              x.mul_(cap).sub_(lse_r).exp_().mul_(dd).mul_(coef_r);
            } else {
              if (scale != 1.0f) x.mul_(scale);
              x.sub_(lse_r).exp_().mul_(coef_r);
            }
            if (need_weight) {
              at::Tensor dw_v = dw.narrow(0, v0, c);  // [c, D]: this part's rows only
              if (a == 0) at::mm_out(dw_v, x.t(), h_r); else dw_v.addmm_(x.t(), h_r);
            }
            if (need_hidden) dhp.narrow(0, a - c0, r).addmm_(x, w_v);
          }
        }
      }
    });
    if (need_hidden)
      for (int64_t p = 1; p < parts; ++p) dh.narrow(0, c0, c1 - c0).add_(partials.select(0, p - 1).narrow(0, 0, c1 - c0));
  }
  return {dh, dw};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("lse_target_fwd", &lse_target_fwd, "fused LM head logsumexp + target logit (fp32, CPU)");
  mod.def("softmax_bwd", &softmax_bwd, "LM head backward, softmax term: (d_hidden, d_weight) fp32 (CPU)");
}
