// Cache-blocked LM head + logsumexp + target gather on CPU (the forward of chunked.py, fused).
//
// For each token i (x_i = h_i . W^T in fp32, z = transform(x), t_i the target):
//     lse_i = logsumexp_v z_iv          zt_i = z_{i, t_i}
// transform(x) = c * tanh(s * x / c) with a soft-cap c > 0, else s * x.
//
// Work split: threads own blocks of `rows` tokens. A thread walks the vocabulary in blocks of
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
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads do not inherit the caller's
    at::Tensor tile = at::empty({rows, cols}, hidden.options());  // [rows, cols] fp32, this thread's
    at::Tensor mt_buf = at::empty({rows}, hidden.options()), st_buf = at::empty({rows}, hidden.options());
    std::vector<float> m(rows), s(rows);
    for (int64_t blk = b0; blk < b1; ++blk) {
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("lse_target_fwd", &lse_target_fwd, "fused LM head logsumexp + target logit (fp32, CPU)");
}
