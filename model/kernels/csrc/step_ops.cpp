// The small per-layer ops of a step, each one call: RMSNorm (with the residual add), RoPE, and the KV cache write.
// In eager mode each was 6-10 ATen ops (18-19 us a call at batch 8 on a 2-core Zen 5 VM, ~0.11 ms a layer for the
// six calls; these take 4-8 us); compiled graphs fuse them themselves and keep the torch forms (model/ops).
// Plain C++ (the compiler's baseline vectors, no FMA contraction): RoPE and the residual add round exactly as the
// torch forms do; RMSNorm's mean differs from torch's only in summation order. Rows are independent, so a row's
// result does not depend on its batch.
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace gptoss {
namespace {

void check_float_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, what, " must be a float32 CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
}

constexpr int64_t kRowGrain = 16;  // rows per parallel task: a decode step's few rows stay on one thread

// y = x / sqrt(mean(x^2) + eps) * w for each row of n values (the squares summed in 16 float lanes, so the compiler
// can keep them in vectors: 11.7 -> 8.0 us for add_rms_norm at 8 x 768 against one double sum; then the lanes in
// double).
void norm_row(const float* x, const float* w, float eps, int64_t n, float* y) {
  constexpr int kLanes = 16;
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += x[i + j] * x[i + j];
  double squares = 0;
  for (int j = 0; j < kLanes; ++j) squares += lanes[j];
  for (; i < n; ++i) squares += static_cast<double>(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(squares / n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& weight_, double eps) {
  check_float_cpu(x_, "rms_norm's x");
  check_float_cpu(weight_, "rms_norm's weight");
  const int64_t n = weight_.numel();
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) == n, "rms_norm: x ", x_.sizes(), " does not end in the weight's ", n);
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous();
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel() / std::max<int64_t>(n, 1), kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * n, wp, static_cast<float>(eps), n, yp + r * n);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_, const at::Tensor& residual_,
                                                const at::Tensor& weight_, double eps) {
  check_float_cpu(x_, "add_rms_norm's x");
  check_float_cpu(residual_, "add_rms_norm's residual");
  check_float_cpu(weight_, "add_rms_norm's weight");
  const int64_t n = weight_.numel();
  TORCH_CHECK(x_.sizes() == residual_.sizes() && x_.dim() >= 1 && x_.size(-1) == n, "add_rms_norm: x ",
              x_.sizes(), " and residual ", residual_.sizes(), " must match and end in the weight's ", n);
  const at::Tensor x = x_.contiguous(), residual = residual_.contiguous(), weight = weight_.contiguous();
  at::Tensor summed = at::empty_like(x), y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *rp = residual.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *sp = summed.data_ptr<float>(), *yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel() / std::max<int64_t>(n, 1), kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t i = 0; i < n; ++i) sp[r * n + i] = xp[r * n + i] + rp[r * n + i];
      norm_row(sp + r * n, wp, static_cast<float>(eps), n, yp + r * n);
    }
  });
  return {y, summed};
}

// x [B, T, H, D] (each (b, t)'s H x D values contiguous, rows may be strided: q and k are views of the fused qkv);
// cos, sin [B, T, D/2]. Half-split rotation into a new contiguous tensor.
at::Tensor rope(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_) {
  check_float_cpu(x_, "rope's x");
  check_float_cpu(cos_, "rope's cos");
  check_float_cpu(sin_, "rope's sin");
  TORCH_CHECK(x_.dim() == 4 && x_.size(3) % 2 == 0, "rope: x must be [B, T, H, D] with D even, got ", x_.sizes());
  const int64_t batch = x_.size(0), steps = x_.size(1), heads = x_.size(2), dim = x_.size(3), half = dim / 2;
  TORCH_CHECK(cos_.sizes() == at::IntArrayRef({batch, steps, half}) && sin_.sizes() == cos_.sizes(),
              "rope: cos and sin must be [", batch, ", ", steps, ", ", half, "], got ", cos_.sizes(), " and ",
              sin_.sizes());
  const bool rows_dense = x_.stride(3) == 1 && x_.stride(2) == dim;
  const at::Tensor x = rows_dense ? x_ : x_.contiguous();
  const at::Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
  at::Tensor y = at::empty({batch, steps, heads, dim}, x.options());
  const float *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  const int64_t sb = x.stride(0), st = x.stride(1);
  at::parallel_for(0, batch * steps, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* src = x.data_ptr<float>() + (r / steps) * sb + (r % steps) * st;
      float* dst = y.data_ptr<float>() + r * heads * dim;
      const float *c = cp + r * half, *s = snp + r * half;
      for (int64_t h = 0; h < heads; ++h, src += dim, dst += dim)
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = src[i], x2 = src[half + i];
          const float a = x1 * c[i], b = x2 * s[i], d = x2 * c[i], e = x1 * s[i];
          dst[i] = a - b;
          dst[half + i] = d + e;
        }
    }
  });
  return y;
}

// In place: cache[b, (start[b] + t) mod S] = values[b, t]. cache [B, S, H, D] contiguous; values [B, T, H, D] with
// each (b, t)'s H x D values contiguous (rows may be strided: v is a view of the fused qkv); start [B] integers >= 0.
void cache_write(at::Tensor cache, const at::Tensor& start_, const at::Tensor& values_) {
  check_float_cpu(cache, "cache_write's cache");
  check_float_cpu(values_, "cache_write's values");
  TORCH_CHECK(start_.device().is_cpu(), "cache_write's start must be a CPU tensor");
  TORCH_CHECK(cache.dim() == 4 && cache.is_contiguous() && cache.size(1) > 0,
              "cache_write: the cache must be a contiguous [B, S, H, D] with S > 0, got ", cache.sizes());
  TORCH_CHECK(values_.dim() == 4, "cache_write: values must be [B, T, H, D], got ", values_.sizes());
  const int64_t batch = values_.size(0), steps = values_.size(1), slots = cache.size(1);
  TORCH_CHECK(cache.size(0) == batch && values_.size(2) == cache.size(2) &&
                  values_.size(3) == cache.size(3) && start_.numel() == batch,
              "cache_write: values ", values_.sizes(), " and start ", start_.sizes(), " do not fit the cache ",
              cache.sizes());
  const int64_t width = cache.size(2) * cache.size(3);
  const bool rows_dense = values_.stride(3) == 1 && values_.stride(2) == cache.size(3);
  const at::Tensor values = rows_dense ? values_ : values_.contiguous();
  const at::Tensor start = start_.to(at::kLong).contiguous();
  const int64_t* sp = start.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(sp[b] >= 0, "cache_write: start[", b, "] = ", sp[b], " is negative");
    for (int64_t t = 0; t < steps; ++t) {
      const float* src = values.data_ptr<float>() + b * values.stride(0) + t * values.stride(1);
      float* dst = cache.data_ptr<float>() + (b * slots + (sp[b] + t) % slots) * width;
      std::memcpy(dst, src, width * sizeof(float));
    }
  }
}

}  // namespace gptoss
