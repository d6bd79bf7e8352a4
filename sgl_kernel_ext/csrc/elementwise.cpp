#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

// The per-layer elementwise ops of a Llama decoder, one pass each instead of 5-8 torch ops (each a
// full read and write of the activations, plus dispatch overhead that dominates at decode sizes).
// Math in float32; results rounded to the storage type where the torch reference rounds, so bf16
// outputs match it up to float32 rounding-order differences.

template <typename T>
static inline T to(float x) { return static_cast<T>(x); }

// Rows per parallel task: about 16K elements, so decode-sized inputs stay on one thread.
static inline int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// out = w * to_T(x * rsqrt(mean(x^2) + eps)); with a residual: r = to_T(x + r) first, normalising r.
template <typename T>
static void rms_rows(T* x, T* r, const T* w, T* out, int64_t rows, int64_t n, double eps) {
  at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* xi = x + i * n;
      T* src = xi;
      if (r != nullptr) {
        T* ri = r + i * n;
        for (int64_t j = 0; j < n; ++j) ri[j] = to<T>(static_cast<float>(ri[j]) + static_cast<float>(xi[j]));
        src = ri;
      }
      float ss = 0.f;
      for (int64_t j = 0; j < n; ++j) ss += static_cast<float>(src[j]) * static_cast<float>(src[j]);
      const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(ss) / n + eps));
      T* oi = out + i * n;
      for (int64_t j = 0; j < n; ++j)
        oi[j] = to<T>(static_cast<float>(w[j]) * static_cast<float>(to<T>(static_cast<float>(src[j]) * scale)));
    }
  });
}

static void check_rows(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && w.numel() == x.size(1));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: input and weight dtypes differ");
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, w);
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), nullptr, w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                       x.size(0), x.size(1), eps);
  });
  return out;
}

// In place, as FlashInfer's: residual <- residual + x, x <- rms_norm(residual).
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps) {
  check_rows(x, w);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.is_contiguous() && residual.scalar_type() == x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_rms_norm", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    rms_rows<scalar_t>(xp, residual.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), xp, x.size(0), x.size(1), eps);
  });
}

// [T, 2I] -> [T, I]: to_T(silu(gate)) * up.
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0);
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  auto out = torch::empty({rows, n}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t *g = in + i * 2 * n, *u = g + n;
        for (int64_t j = 0; j < n; ++j) {
          const float x = static_cast<float>(g[j]);
          const float s = static_cast<float>(to<scalar_t>(x / (1.f + std::exp(-x))));
          o[i * n + j] = to<scalar_t>(s * static_cast<float>(u[j]));
        }
      }
    });
  });
  return out;
}

// Neox rotary embedding of [T, heads, D] rows (any row stride) into a new contiguous tensor:
// out = x * cos + rotate_half(x) * sin, cos/sin from the float32 [max_pos, D] cos|sin cache,
// rounded to the storage type like the reference's per-forward table.
template <typename T>
static void rope_rows(const T* x, int64_t stride_t, int64_t stride_h, T* out, const int64_t* pos,
                      const float* cache, int64_t rows, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  at::parallel_for(0, rows, grain(heads * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cs = cache + pos[t] * D;
      for (int64_t h = 0; h < heads; ++h) {
        const T* xi = x + t * stride_t + h * stride_h;
        T* oi = out + (t * heads + h) * D;
        for (int64_t j = 0; j < half; ++j) {
          const float c = static_cast<float>(to<T>(cs[j])), s = static_cast<float>(to<T>(cs[half + j]));
          const float x1 = static_cast<float>(xi[j]), x2 = static_cast<float>(xi[half + j]);
          const float a1 = static_cast<float>(to<T>(x1 * c)), b1 = static_cast<float>(to<T>(x2 * -s));
          const float a2 = static_cast<float>(to<T>(x2 * c)), b2 = static_cast<float>(to<T>(x1 * s));
          oi[j] = to<T>(a1 + b1);
          oi[half + j] = to<T>(a2 + b2);
        }
      }
    }
  });
}

std::vector<torch::Tensor> apply_rope(torch::Tensor q, torch::Tensor k, torch::Tensor positions,
                                      torch::Tensor cos_sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.size(2) == k.size(2) && q.size(0) == k.size(0));
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == q.size(0));
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() && cos_sin.size(1) == q.size(2));
  auto qo = torch::empty(q.sizes(), q.options()), ko = torch::empty(k.sizes(), k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "apply_rope", [&] {
    for (auto [in, out] : {std::pair{&q, &qo}, std::pair{&k, &ko}})
      rope_rows<scalar_t>(in->data_ptr<scalar_t>(), in->stride(0), in->stride(1), out->data_ptr<scalar_t>(),
                          positions.data_ptr<int64_t>(), cos_sin.data_ptr<float>(), in->size(0), in->size(1),
                          in->size(2));
  });
  return {qo, ko};
}
