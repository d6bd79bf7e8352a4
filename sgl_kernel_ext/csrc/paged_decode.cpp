#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// One query token per request against its KV pages, read in place (no gather): per (request, kv head),
// the scores of its G query heads, a float32 softmax, then the weighted sum of V. Each K/V row is
// converted to float32 once and reused by the G heads that share it.
// kD > 0 fixes the head dim at compile time (~2x faster: unrolled, no remainder loops); 0 reads dim.
template <typename T, int64_t kD>
static void decode(const T* q, const T* k, const T* v, const int64_t* pages, const int64_t* lens, float* out,
                   int64_t B, int64_t H, int64_t Hkv, int64_t dim, int64_t ps, int64_t W, float scale) {
  const int64_t G = H / Hkv, D = kD > 0 ? kD : dim;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), row(D), inv(G), scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, len = lens[b];
      scores.resize(G * len);
      // element offset of token t's row for head h; t / ps only once per page (64-bit division is slow)
      int64_t page_base = 0, page_end = 0;
      auto row_offset = [&](int64_t t) {
        if (t >= page_end || t < page_end - ps) {
          page_base = pages[b * W + t / ps] * ps - t / ps * ps;
          page_end = (t / ps + 1) * ps;
        }
        return ((page_base + t) * Hkv + h) * D;
      };
      for (int64_t j = 0; j < G * D; ++j) qf[j] = static_cast<float>(q[(b * H + h * G) * D + j]) * scale;
      for (int64_t t = 0; t < len; ++t) {
        const T* kt = k + row_offset(t);
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(kt[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qg[d] * row[d];
          scores[g * len + t] = s;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * len;
        const float m = *std::max_element(sg, sg + len);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) sg[t] = std::exp(sg[t] - m);
        for (int64_t t = 0; t < len; ++t) sum += sg[t];
        inv[g] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* vt = v + row_offset(t);
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(vt[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * len + t];
          float* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] += p * row[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) out[(b * H + h * G + g) * D + d] = acc[g * D + d] * inv[g];
    }
  });
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pages, torch::Tensor v_pages,
                                     torch::Tensor page_idx, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pages.dim() == 4 && q.is_contiguous() && k_pages.is_contiguous()
              && v_pages.is_contiguous() && page_idx.is_contiguous() && seq_lens.is_contiguous());
  TORCH_CHECK(q.scalar_type() == k_pages.scalar_type() && k_pages.scalar_type() == v_pages.scalar_type());
  TORCH_CHECK(page_idx.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t ps = k_pages.size(1), Hkv = k_pages.size(2);
  TORCH_CHECK(k_pages.size(3) == D && H % Hkv == 0 && page_idx.size(0) == B && seq_lens.size(0) == B);
  auto out = torch::empty({B, H, D}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    auto run = [&](auto kernel) {
      kernel(q.data_ptr<scalar_t>(), k_pages.data_ptr<scalar_t>(), v_pages.data_ptr<scalar_t>(),
             page_idx.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), out.data_ptr<float>(),
             B, H, Hkv, D, ps, page_idx.size(1), static_cast<float>(scale));
    };
    switch (D) {
      case 64: run(decode<scalar_t, 64>); break;
      case 128: run(decode<scalar_t, 128>); break;
      default: run(decode<scalar_t, 0>);
    }
  });
  return out;
}
