// SeerAttention's block-sparse attention on CPU: one C++ loop over (batch, head, query block) pairs.
// Built at first use by edgecompress/sparsity/seer/cpp.py (torch.utils.cpp_extension); see its docstring.
//
// Per pair, with no copy of K or V: its kept key blocks read from the block mask (a decoder's blocks
// after the diagonal skipped, the diagonal first), the raw scores S [B, w*B] = Q K_j^T by one oneDNN
// brgemm per block (K passed transposed per block, [D, B]), -inf above the diagonal in slot 0 and the
// key bias (0 / -inf: padding, the tail past N) where given, the softmax of scale * S per row in place
// (vectorised; a row with no visible key gives 0), then O = sum_j P_j V_j by brgemm accumulating into
// the output, times 1 / row sum. S stays in the thread's cache (B x w x B floats).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

using Vec = at::vec::Vectorized<float>;
static const float NEG = -std::numeric_limits<float>::infinity();

// Softmax of scale * row over n entries in place; returns 1 / sum, or 0 (row zeroed) if nothing visible.
// With lse: *lse = the row's log-sum-exp of scale * row (-inf if nothing visible).
static float softmax_row(float* row, int64_t n, float scale, float* lse) {
  Vec vm(NEG);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(row + c));
  float tmp[Vec::size()];
  vm.store(tmp);
  float mx = NEG;
  for (int64_t u = 0; u < Vec::size(); ++u) mx = std::max(mx, tmp[u]);
  for (; c < n; ++c) mx = std::max(mx, row[c]);
  if (mx == NEG) {
    std::memset(row, 0, n * sizeof(float));
    if (lse) *lse = NEG;
    return 0.f;
  }
  Vec vs(0.f), vmx(mx), vsc(scale);
  for (c = 0; c + Vec::size() <= n; c += Vec::size()) {
    Vec x = ((Vec::loadu(row + c) - vmx) * vsc).exp_u20();
    x.store(row + c);
    vs = vs + x;
  }
  vs.store(tmp);
  float s = 0.f;
  for (int64_t u = 0; u < Vec::size(); ++u) s += tmp[u];
  for (; c < n; ++c) {
    row[c] = std::exp((row[c] - mx) * scale);
    s += row[c];
  }
  if (lse) *lse = mx * scale + std::log(s);
  return 1.f / s;
}

// q [b*h*nb, B, D]; kt [b*hkv*nb, D, B] (K blocks transposed); vb [b*hkv*nb, B, D]; keep [b*h*nb, nb]
// bool; kbias [b*nb, B] (0 / -inf) or empty; out [b*h*nb, B, D]; lse [b*h*nb, B] (each row's log-sum-exp)
// or empty (not written). GQA: head i reads K/V head i / (h/hkv).
// Estimates of the dropped blocks (dropped: mean, sparsity/seer/dropped.py), or all three empty:
// kbar_t [b*hkv, D, nb] the blocks' mean keys transposed, vbar [b*hkv, nb, D] their mean values, beta
// [b, nb] log(real keys per block) (-inf: none). Each row then has nb more score columns, q . kbar_j +
// beta_j / scale for the dropped blocks (a decoder's: only blocks before the row's), -inf for the rest,
// in the same softmax as its kept keys, and O += P_est vbar.
void seer_attend(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& vb, const at::Tensor& keep,
                 const at::Tensor& kbias, int64_t h, int64_t hkv, bool causal, double scale, at::Tensor& out,
                 at::Tensor& lse, const at::Tensor& kbar_t, const at::Tensor& vbar, const at::Tensor& beta) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &kt, &vb, &out})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3, "float32 contiguous 3-D");
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.is_contiguous() && keep.dim() == 2, "keep: bool [P, nb]");
  TORCH_CHECK(kbias.numel() == 0 || (kbias.scalar_type() == at::kFloat && kbias.is_contiguous()));
  TORCH_CHECK(scale > 0, "scale must be positive");
  TORCH_CHECK(lse.numel() == 0 || (lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                                   lse.numel() == q.size(0) * q.size(1)), "lse: float32 [P, B] or empty");
  const int64_t P = q.size(0), B = q.size(1), D = q.size(2), nb = keep.size(1), group = h / hkv;
  TORCH_CHECK(P % (h * nb) == 0 && kt.size(0) == P / h * hkv && kt.size(1) == D && kt.size(2) == B);
  const bool est = kbar_t.numel() > 0;
  const int64_t E = est ? nb : 0;  // estimate columns per row
  if (est) {
    const int64_t bs = P / (h * nb);
    for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&kbar_t, &vbar, &beta})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "estimates: float32 contiguous");
    TORCH_CHECK(kbar_t.numel() == bs * hkv * D * nb && vbar.numel() == bs * hkv * nb * D && beta.numel() == bs * nb,
                "estimates: kbar_t [b*hkv, D, nb], vbar [b*hkv, nb, D], beta [b, nb]");
  }
  const float* ebk = est ? kbar_t.data_ptr<float>() : nullptr;
  const float* ebv = est ? vbar.data_ptr<float>() : nullptr;
  const float* ebb = est ? beta.data_ptr<float>() : nullptr;
  const float *qp = q.data_ptr<float>(), *kp = kt.data_ptr<float>(), *vp = vb.data_ptr<float>();
  const bool* mp = keep.data_ptr<bool>();
  const float* bp = kbias.numel() ? kbias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  float* lp = lse.numel() ? lse.data_ptr<float>() : nullptr;
  const int64_t T = at::get_num_threads();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> S(B * (nb * B + E)), rs(B), addv(E);
    std::vector<int64_t> cols(nb);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t p = t; p < P; p += T) {  // pairs in turn: decoder rows spread over the threads
        const int64_t r = p % nb, bh = p / nb, bi = bh / h, kv0 = (bi * hkv + (bh % h) / group) * nb;
        const bool* row = mp + p * nb;
        const int64_t last = causal ? r : nb - 1;
        int64_t w = 0;
        const bool diag = causal && row[r];
        if (diag) cols[w++] = r;
        for (int64_t j = 0; j <= last; ++j)
          if (row[j] && !(diag && j == r)) cols[w++] = j;
        float* o = op + p * B * D;
        const int64_t kvh = bi * hkv + (bh % h) / group;  // the K/V head's index (estimates)
        bool any_est = false;
        if (est)
          for (int64_t j = 0; j < nb && !any_est; ++j)
            any_est = !row[j] && (!causal || j < r) && ebb[bi * nb + j] != NEG;
        if (w == 0 && !any_est) {
          std::memset(o, 0, B * D * sizeof(float));
          if (lp) std::fill(lp + p * B, lp + (p + 1) * B, NEG);
          continue;
        }
        const int64_t ne = any_est ? (causal ? r : nb) : 0;  // estimate columns: a decoder's blocks before r
        const int64_t N = w * B, Ns = N + ne;                  // Ns: the row stride of S
        for (int64_t s = 0; s < w; ++s)
          at::native::cpublas::brgemm(B, B, D, D, B, Ns, false, qp + p * B * D, kp + (kv0 + cols[s]) * B * D,
                                      S.data() + s * B, false);
        if (any_est) {
          at::native::cpublas::brgemm(B, ne, D, D, nb, Ns, false, qp + p * B * D, ebk + kvh * D * nb, S.data() + N,
                                      false);
          const float inv = 1.f / sc;
          for (int64_t j = 0; j < ne; ++j) addv[j] = row[j] ? NEG : ebb[bi * nb + j] * inv;
          for (int64_t i = 0; i < B; ++i) {
            float* x = S.data() + i * Ns + N;
            int64_t c = 0;
            for (; c + Vec::size() <= ne; c += Vec::size())
              (Vec::loadu(x + c) + Vec::loadu(addv.data() + c)).store(x + c);
            for (; c < ne; ++c) x[c] += addv[c];
          }
        }
        if (bp) {
          for (int64_t i = 0; i < B; ++i)
            for (int64_t s = 0; s < w; ++s) {
              const float* kb = bp + (bi * nb + cols[s]) * B;
              float* dst = S.data() + i * Ns + s * B;
              for (int64_t c = 0; c < B; ++c) dst[c] += kb[c];
            }
        }
        if (diag)
          for (int64_t i = 0; i < B; ++i) std::fill(S.data() + i * Ns + i + 1, S.data() + i * Ns + B, NEG);
        for (int64_t i = 0; i < B; ++i) rs[i] = softmax_row(S.data() + i * Ns, Ns, sc, lp ? lp + p * B + i : nullptr);
        for (int64_t s = 0; s < w; ++s)
          at::native::cpublas::brgemm(B, D, B, Ns, D, D, s > 0, S.data() + s * B, vp + (kv0 + cols[s]) * B * D, o,
                                      false);
        if (any_est)
          at::native::cpublas::brgemm(B, D, ne, Ns, D, D, w > 0, S.data() + N, ebv + kvh * nb * D, o, false);
        for (int64_t i = 0; i < B; ++i) {
          const Vec f(rs[i]);
          int64_t c = 0;
          for (; c + Vec::size() <= D; c += Vec::size()) (Vec::loadu(o + i * D + c) * f).store(o + i * D + c);
          for (; c < D; ++c) o[i * D + c] *= rs[i];
        }
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
}

TORCH_LIBRARY(edgecompress_seer, m) {
  m.def("attend(Tensor q, Tensor kt, Tensor vb, Tensor keep, Tensor kbias, int h, int hkv, bool causal, "
        "float scale, Tensor(a!) out, Tensor(b!) lse, Tensor kbar_t, Tensor vbar, Tensor beta) -> ()");
  m.impl("attend", c10::DispatchKey::CPU, TORCH_FN(seer_attend));
}
