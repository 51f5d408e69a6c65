// Prefill attention on the CPU: chunks of several query tokens against the KV cache, with GPT-OSS's sink logits
// and sliding windows (model/ops/torch_ops.attention's semantics), fp32 throughout.
//
//   prefill_attention(q [B, T, Hq, D], k_cache, v_cache [B, S, Hkv, D], sinks [Hq], k_pos [B, n], q_pos [B, T],
//                     window, scale) -> [B, T, Hq, D]
//
// Slot j < n of row b's cache holds position k_pos[b, j] (negative: never written); it is visible to a query at p
// when 0 <= k_pos <= p and, with a window, k_pos > p - window. A work item is one tile: up to V::kVectors vectors
// of query rows (64 rows on AVX-512, 16 on AVX2) of one batch row and one kv head, heads of its group times
// consecutive positions, over the cache read in place (attention_tile.h has the arithmetic). Key blocks whose
// positions no row of a tile can see are skipped, so a chunk under a sliding window reads about the window, and a
// causal chunk the slots before it. ATen's fused kernel, which this replaces for fp32, took an additive mask over
// every slot and ran MKL's AVX2 sgemm on AMD's AVX-512 cores.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define GPTOSS_X86 1
#include <immintrin.h>
#endif

namespace gptoss {
namespace {

constexpr int64_t kKeyBlock = 64;  // slots per step of the online softmax

struct PrefillTile {
  const float* q;          // the tile's first position's row of q, at its first head: rows q_row floats apart
  int64_t q_row;           // Hq * D
  const float* k;          // slot 0 of the kv head in the batch row's caches: slot j at + j * slot_stride
  const float* v;
  int64_t slot_stride;     // Hkv * D
  const float* k_pos;      // [n] the slots' positions (exact in fp32: positions below 2^24)
  const float* block_min;  // [ceil(n / kKeyBlock)] the least and largest position of each key block
  const float* block_max;
  int64_t n;
  const float* sinks;      // the tile's heads' sink logits
  const int64_t* q_pos;    // the tile's positions
  int64_t heads, steps, dim, window;
  float scale;
  float* out;              // like q, in the output
};

// scratch floats of one tile of rows_padded rows (attend_tile's layout)
int64_t tile_floats(int64_t dim, int64_t rows_padded) { return (2 * dim + kKeyBlock + 4) * rows_padded; }

namespace scalar {
struct V {
  using T = float;
  static constexpr int64_t W = 1;
  static constexpr int kVectors = 4;
  static constexpr int kAcc = 8;
  static T zero() { return 0.f; }
  static T set1(float x) { return x; }
  static T load(const float* p) { return *p; }
  static void store(float* p, T x) { *p = x; }
  static T add(T a, T b) { return a + b; }
  static T sub(T a, T b) { return a - b; }
  static T mul(T a, T b) { return a * b; }
  static T fmadd(T a, T b, T c) { return std::fma(a, b, c); }
  static T fnmadd(T a, T b, T c) { return std::fma(-a, b, c); }
  static T min(T a, T b) { return std::min(a, b); }
  static T max(T a, T b) { return std::max(a, b); }
  static T round(T x) { return std::nearbyint(x); }
  static T pow2(T n) { return std::ldexp(1.f, static_cast<int>(n)); }
  static bool seen(T pos, T lo, T hi) { return pos > lo && pos <= hi; }
  static T seen_or(bool seen, T x, T otherwise) { return seen ? x : otherwise; }
};
#include "attention_tile.h"
}  // namespace scalar

#ifdef GPTOSS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct V {
  using T = __m256;
  static constexpr int64_t W = 8;
  // 16 registers: 12 accumulators (6 keys or value elements by 2 vectors of rows), the row vectors and a
  // broadcast. Tiles of 4 vectors by 2 keys (8 accumulators) ran 1.02-1.23x ATen's time at bench heads, Zen 5
  // with AVX2 forced; 2 by 6 take 0.47-0.89x.
  static constexpr int kVectors = 2;
  static constexpr int kAcc = 12;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float x) { return _mm256_set1_ps(x); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T round(T x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static T pow2(T n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static T seen(T pos, T lo, T hi) {
    return _mm256_and_ps(_mm256_cmp_ps(pos, lo, _CMP_GT_OQ), _mm256_cmp_ps(pos, hi, _CMP_LE_OQ));
  }
  static T seen_or(T seen, T x, T otherwise) { return _mm256_blendv_ps(otherwise, x, seen); }
};
#include "attention_tile.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
namespace avx512 {
struct V {
  using T = __m512;
  static constexpr int64_t W = 16;
  static constexpr int kVectors = 4;
  static constexpr int kAcc = 20;  // 32 registers: up to 20 accumulators, four row vectors and a broadcast
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float x) { return _mm512_set1_ps(x); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T round(T x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static T pow2(T n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static __mmask16 seen(T pos, T lo, T hi) {
    return _mm512_cmp_ps_mask(pos, lo, _CMP_GT_OQ) & _mm512_cmp_ps_mask(pos, hi, _CMP_LE_OQ);
  }
  static T seen_or(__mmask16 seen, T x, T otherwise) { return _mm512_mask_mov_ps(otherwise, seen, x); }
};
#include "attention_tile.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

using TileFn = void (*)(const PrefillTile&, float*);

// The tile kernel and the most rows of a tile for the instruction set in use.
std::pair<TileFn, int64_t> tile_kernel() {
  const std::string isa = active_isa();
#ifdef GPTOSS_X86
  if (isa == "avx512" || isa == "amx") return {avx512::attend_tile_any, avx512::V::kVectors * avx512::V::W};
  if (isa == "avx2") return {avx2::attend_tile_any, avx2::V::kVectors * avx2::V::W};
#endif
  return {scalar::attend_tile_any, scalar::V::kVectors * scalar::V::W};
}

}  // namespace

at::Tensor prefill_attention(const at::Tensor& q_, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& sinks_, const at::Tensor& k_pos_, const at::Tensor& q_pos_,
                             int64_t window, double scale) {
  check_attention_inputs(q_, k_cache, v_cache, sinks_, k_pos_, q_pos_);
  const int64_t batch = q_.size(0), steps = q_.size(1), q_heads = q_.size(2), dim = q_.size(3);
  const int64_t slots = k_cache.size(1), kv_heads = k_cache.size(2), group = q_heads / kv_heads;
  const at::Tensor q = q_.contiguous(), sinks = sinks_.to(at::kFloat).contiguous();
  const at::Tensor q_pos = q_pos_.to(at::kLong).contiguous();
  const int64_t n = k_pos_.size(1), blocks = (n + kKeyBlock - 1) / kKeyBlock;
  TORCH_CHECK(q_pos.numel() == 0 || q_pos.max().item<int64_t>() < (int64_t{1} << 24),
              "prefill_attention: positions must lie below 2^24, got ", q_pos.max().item<int64_t>());
  // slot positions as fp32 (exact below 2^24; every larger one is a slot no query here sees), per key block their
  // least and largest
  const at::Tensor k_pos = k_pos_.to(at::kLong).clamp_max(int64_t{1} << 24).to(at::kFloat).contiguous();
  std::vector<float> block_min(batch * blocks), block_max(batch * blocks);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const float* kp = k_pos.data_ptr<float>() + b * n + kb * kKeyBlock;
      const auto [lo, hi] = std::minmax_element(kp, kp + std::min(kKeyBlock, n - kb * kKeyBlock));
      block_min[b * blocks + kb] = *lo, block_max[b * blocks + kb] = *hi;
    }

  const auto [tile_fn, max_rows] = tile_kernel();  // a tile's rows: heads of one group times positions
  const int64_t heads = std::min(group, max_rows);
  const int64_t steps_per_tile = std::min(steps, std::max<int64_t>(1, max_rows / heads));
  const int64_t head_tiles = (group + heads - 1) / heads, step_tiles = (steps + steps_per_tile - 1) / steps_per_tile;
  const int64_t tiles = batch * kv_heads * head_tiles * step_tiles;
  at::Tensor out = at::empty_like(q);
  std::atomic<int64_t> next{0};
  // tiles handed out one at a time: a causal chunk's first tiles see fewer keys than its last
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(tile_floats(dim, max_rows));
    for (int64_t item; (item = next.fetch_add(1)) < tiles;) {
      const int64_t st = item % step_tiles, ht = item / step_tiles % head_tiles;
      const int64_t h = item / (step_tiles * head_tiles) % kv_heads, b = item / (step_tiles * head_tiles * kv_heads);
      const int64_t t0 = st * steps_per_tile, head0 = h * group + ht * heads;
      const int64_t cache0 = (b * slots * kv_heads + h) * dim, q0 = ((b * steps + t0) * q_heads + head0) * dim;
      tile_fn({q.data_ptr<float>() + q0, q_heads * dim, k_cache.data_ptr<float>() + cache0,
               v_cache.data_ptr<float>() + cache0, kv_heads * dim, k_pos.data_ptr<float>() + b * n,
               block_min.data() + b * blocks, block_max.data() + b * blocks, n, sinks.data_ptr<float>() + head0,
               q_pos.data_ptr<int64_t>() + b * steps + t0, std::min(heads, group - ht * heads),
               std::min(steps_per_tile, steps - t0), dim, window, static_cast<float>(scale),
               out.data_ptr<float>() + q0},
              scratch.data());
    }
  });
  return out;
}

}  // namespace gptoss
