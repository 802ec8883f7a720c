// SeerAttention's block-sparse attention on CPU: one C++ loop over (batch, head, query block) pairs.
// Built at first use by edgecompress/sparsity/seer/cpp.py (torch.utils.cpp_extension); see its docstring.
//
// Per pair, with no copy of K or V: the scores of the kept key blocks S [B, w*B] = Q K_j^T by one
// oneDNN brgemm per block (K is passed transposed per block, [D, B]), the causal triangle on slot 0
// (the diagonal block, where kept) and a key bias (padding, the tail past N) where given, the
// softmax over the row in place (vectorised; a row with no visible key gives 0), then
// O = sum_j P_j V_j by brgemm accumulating into the output, scaled by 1 / row sum at the end.
// S stays in the thread's cache (64 x w x 64 floats), which is what the batched PyTorch form cannot do.
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

// q [P, B, D] (scaled), kt [NK, D, B] (K blocks transposed), vb [NK, B, D], lin [P, W] int64 (the kept
// blocks' rows of kt / vb, the first counts[p] valid), counts [P] int64, diag [P] bool or empty (slot 0
// is the diagonal block: causal triangle), kbias [NK, B] float or empty (added per key), out [P, B, D].
void seer_attend(const at::Tensor& q, const at::Tensor& kb, const at::Tensor& vb, const at::Tensor& lin,
                 const at::Tensor& counts, const at::Tensor& diag, const at::Tensor& kbias, at::Tensor& out) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &kb, &vb, &out})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3, "float32 contiguous 3-D");
  TORCH_CHECK(lin.scalar_type() == at::kLong && counts.scalar_type() == at::kLong && lin.is_contiguous());
  TORCH_CHECK(kbias.numel() == 0 || (kbias.scalar_type() == at::kFloat && kbias.is_contiguous()));
  TORCH_CHECK(diag.numel() == 0 || diag.scalar_type() == at::kBool);
  const int64_t P = q.size(0), B = q.size(1), D = q.size(2), W = lin.size(1);
  const float* qp = q.data_ptr<float>();
  const float* kp = kb.data_ptr<float>();
  const float* vp = vb.data_ptr<float>();
  const int64_t* lp = lin.data_ptr<int64_t>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  const bool* dp = diag.numel() ? diag.data_ptr<bool>() : nullptr;
  const float* bp = kbias.numel() ? kbias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t T = at::get_num_threads();
  const float NEG = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> S(B * W * B), rs(B);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t p = t; p < P; p += T) {
        const int64_t w = cp[p], N = w * B;
        float* o = op + p * B * D;
        if (w == 0) { std::memset(o, 0, B * D * sizeof(float)); continue; }
        const int64_t* l = lp + p * W;
        for (int64_t j = 0; j < w; ++j)  // kb holds K blocks transposed: [NK, D, B]
          at::native::cpublas::brgemm(B, B, D, D, B, N, false, qp + p * B * D, kp + l[j] * B * D, S.data() + j * B, false);
        if (bp) {
          for (int64_t i = 0; i < B; ++i) {
            float* row = S.data() + i * N;
            for (int64_t j = 0; j < w; ++j) {
              const float* kbj = bp + l[j] * B;
              for (int64_t c = 0; c < B; ++c) row[j * B + c] += kbj[c];
            }
          }
        }
        if (dp && dp[p]) {
          for (int64_t i = 0; i < B; ++i) for (int64_t c = i + 1; c < B; ++c) S[i * N + c] = NEG;
        }
        for (int64_t i = 0; i < B; ++i) {
          float* row = S.data() + i * N;
          Vec vm(NEG);
          int64_t c = 0;
          for (; c + Vec::size() <= N; c += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(row + c));
          float tmp[Vec::size()];
          vm.store(tmp);
          float mx = NEG;
          for (int64_t u = 0; u < Vec::size(); ++u) mx = std::max(mx, tmp[u]);
          for (; c < N; ++c) mx = std::max(mx, row[c]);
          if (mx == NEG) { std::memset(row, 0, N * sizeof(float)); rs[i] = 0.f; continue; }
          Vec vs(0.f), vmx(mx);
          c = 0;
          for (; c + Vec::size() <= N; c += Vec::size()) {
            Vec x = (Vec::loadu(row + c) - vmx).exp_u20();
            x.store(row + c);
            vs = vs + x;
          }
          vs.store(tmp);
          float s = 0.f;
          for (int64_t u = 0; u < Vec::size(); ++u) s += tmp[u];
          for (; c < N; ++c) { row[c] = std::exp(row[c] - mx); s += row[c]; }
          rs[i] = 1.f / s;
        }
        for (int64_t j = 0; j < w; ++j)
          at::native::cpublas::brgemm(B, D, B, N, D, D, j > 0, S.data() + j * B, vp + l[j] * B * D, o, false);
        for (int64_t i = 0; i < B; ++i) {
          Vec r(rs[i]);
          int64_t c = 0;
          for (; c + Vec::size() <= D; c += Vec::size()) (Vec::loadu(o + i * D + c) * r).store(o + i * D + c);
          for (; c < D; ++c) o[i * D + c] *= rs[i];
        }
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
}

TORCH_LIBRARY(edgecompress_seer, m) {
  m.def("attend(Tensor q, Tensor kb, Tensor vb, Tensor lin, Tensor counts, Tensor diag, Tensor kbias, Tensor(a!) out) -> ()");
  m.impl("attend", c10::DispatchKey::CPU, TORCH_FN(seer_attend));
}
