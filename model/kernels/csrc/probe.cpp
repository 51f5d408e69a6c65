// How many fp32 multiply-adds one core completes per nanosecond at each vector width: the ceiling of the decode
// kernels' arithmetic on this machine, printed by the benchmarks beside their figures. Machines that report the
// same CPU differ here: on a 2-vCPU Zen 5 VM the 512-bit FMAs ran at half the 256-bit ones' rate one day (3.6
// against 7.3 operations per ns, 59 G multiply-adds either way), where an earlier day's host of the same reported
// model had done 140 G with them; that moves how an exact fp32 decode compares with an engine that multiplies
// 8-bit integers.
#include <chrono>

#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GPTOSS_PROBE_X86 1
#endif

namespace gptoss {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kChains = 12;  // independent accumulators: enough to cover a 4-5 cycle FMA latency on two pipes

template <class F>
double best_rate(F run, int64_t iterations, int lanes) {
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    const auto t0 = Clock::now();
    const float sink = run(iterations);
    const double ns = std::chrono::duration<double, std::nano>(Clock::now() - t0).count();
    if (sink == 12345.f) best -= 1;  // keeps the result alive; never true (the chains settle at 0.5)
    best = std::max(best, iterations * kChains * lanes / ns);
  }
  return best;
}

#ifdef GPTOSS_PROBE_X86
// a <- a * 0.5 + 0.25 settles at 0.5: no overflow, no subnormals to slow a round
__attribute__((target("avx2,fma"))) float chains256(int64_t iterations) {
  __m256 a[kChains];
  const __m256 half = _mm256_set1_ps(0.5f), quarter = _mm256_set1_ps(0.25f);
  for (int i = 0; i < kChains; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i));
  for (int64_t it = 0; it < iterations; ++it)
    for (int i = 0; i < kChains; ++i) a[i] = _mm256_fmadd_ps(a[i], half, quarter);
  __m256 s = a[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_ps(s, a[i]);
  return _mm_cvtss_f32(_mm256_castps256_ps128(s));
}

__attribute__((target("avx512f"))) float chains512(int64_t iterations) {
  __m512 a[kChains];
  const __m512 half = _mm512_set1_ps(0.5f), quarter = _mm512_set1_ps(0.25f);
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i));
  for (int64_t it = 0; it < iterations; ++it)
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_fmadd_ps(a[i], half, quarter);
  __m512 s = a[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, a[i]);
  return _mm512_cvtss_f32(s);
}
#endif

}  // namespace

std::vector<std::pair<std::string, double>> fma_rates() {
  std::vector<std::pair<std::string, double>> out;
#ifdef GPTOSS_PROBE_X86
  constexpr int64_t kIterations = 200000;  // ~1-2 ms a round at these rates
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    out.emplace_back("avx2", best_rate(chains256, kIterations, 8));
  if (__builtin_cpu_supports("avx512f")) out.emplace_back("avx512", best_rate(chains512, kIterations, 16));
#endif
  return out;
}

}  // namespace gptoss
