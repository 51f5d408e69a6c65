// CPU kernels for weights kept as published: MXFP4 experts and bf16 dense matrices, fp32 activations.
//
//   grouped_mm(x [N, K] fp32, W [E, M, K] (mxfp4 or bf16), ends [E] int32, bias [E, M] fp32?) -> [N, M] fp32
//       rows ends[e-1] .. ends[e] of x (sorted by expert) multiply expert e's W^T; a linear layer is E = 1.
//
// Two paths per expert, by how many rows it received:
//   few rows (decode, up to kDecodeRows; MXFP4 up to 24 where the many-rows path is the own sgemm): each weight
//   row is decoded in registers, shared by four rows at a time;
//   many rows (prefill): a tile of weight rows is decoded to fp32 and one sgemm takes all the rows; on AMX, the
//   weights are decoded to bf16 (exact) and multiplied on tiles with each activation cut into three bf16 parts.
// Both run in one parallel region per call (see grouped()).
// The weights are exact in fp32, so every path gives the dense fp32 result up to summation order.
//
// Instruction sets: each kernel exists for AVX-512 (F+BW+VL), AVX2+FMA and portable C++ (cpu_avx512.h, cpu_avx2.h,
// cpu_scalar.h; the AMX tiles in cpu_amx.h), compiled into this one translation unit with per-function target
// attributes and chosen at run time from what the CPU supports; "amx" is AVX-512 with the many-rows path on AMX
// tiles. GPTOSS_CPU_ISA (avx512 | avx2 | scalar) or set_isa() forces a lower path. This file holds what the paths
// share, the selection, the drivers (grouped_into, the fused MoE) and the ops' registration.

#include "kernels.h"

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define GPTOSS_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t kBlock = 32;       // MXFP4 values per block (one shared scale)
constexpr int64_t kBlockBytes = 16;  // two 4-bit codes per byte
// An expert with at most this many rows takes the register-decode path. Up to ~16 rows re-decoding each weight row
// per four activation rows beats decoding a tile for sgemm (Zen 4 VM, MoE layer A/B against 8: 64 tokens 0.67-0.87x
// time at both presets' widths, 128 tokens 0.78-0.97x, 256 tokens 0.94-1.02x); at 32 the 20b width lost 7-14%.
constexpr int64_t kDecodeRows = 16;
constexpr int64_t kDotRows = 128;     // output columns per work item on the register-decode path
// Weight rows the AVX2 register-decode path takes before moving to the next four activation rows (AVX-512 takes
// sixteen too, kSumRows). Going weight row by weight row, every row re-read all n activation rows, which at K = 768
// stop fitting a 32 KiB L1 beyond eight (inferred). One expert's 1536 x 768 against 12 rows, one thread, in cache:
// 822 -> 505 us in two separate runs (Zen 4 VM, AVX2); the MoE layer at 64 tokens alternated: 0.92-0.96x the time.
constexpr int64_t kDotRowBlock = 16;
// How far ahead (bytes) the gemv loops ask for weights, beyond the hardware prefetcher. Machines differ a lot: on a
// 2-core Xeon VM (family 6 model 207) 8 KiB gave the AVX-512 gemvs +20-40% read bandwidth; on a 2-core Zen 4 VM
// (family 25 model 17) no prefetch at all made the bf16 gemv 22 -> 42 GB/s while the MXFP4 one wanted 2-4 KiB; on
// Zen 3 AVX2, 1 KiB (the AVX2 bf16 tiles now ask for the next tile instead). So these are starting values, set per
// instruction set when it is chosen, and kernels/__init__.py measures the candidates on the machine at hand
// (tune_prefetch) and sets the best.
struct Prefetch {
  int64_t mxfp4, bf16;
};
Prefetch g_prefetch{8192, 8192};
// fp32 weights per decoded tile on the sgemm path (1.5 MiB: past a Zen 4's L2, which a tile of 384 KiB fit): the
// tile is the sgemm's output width, and MKL's rate grows with it (one thread: 32 rows x 2880 by 32 outputs 9.5
// MAC/cycle, 40 rows x 2880 by 64 outputs 12.4). Zen 4 VM, AVX2, kernel_ab against 384 KiB: gpt-oss-20b MoE layer
// at 256 tokens 0.84-0.90x the time, its fused qkv at 256 rows 0.85-1.01x, bench widths' MoE 0.92-1.10x (median
// 0.97).
constexpr int64_t kTileFloats = 384 * 1024;

// fp4 e2m1 code -> 2 * value (an integer, so the table fits int8 for pshufb); scales carry the factor 1/2.
constexpr int8_t kTwiceFp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// The same values as bf16 bit patterns, split into their top and second bytes: every 2 x fp4 value is exact in bf16,
// so two byte lookups per code and a byte interleave build its bf16 word, and a bf16 word in the top half of a
// 32-bit lane is the fp32 value: no int -> float conversion (the AVX2 decoder builds fp32 this way).
constexpr uint8_t kTwiceFp4Bf16Hi[16] = {0x00, 0x3f, 0x40, 0x40, 0x40, 0x40, 0x41, 0x41,
                                         0x00, 0xbf, 0xc0, 0xc0, 0xc0, 0xc0, 0xc1, 0xc1};
constexpr uint8_t kTwiceFp4Bf16Lo[16] = {0x00, 0x80, 0x00, 0x40, 0x80, 0xc0, 0x00, 0x40,
                                         0x00, 0x80, 0x00, 0x40, 0x80, 0xc0, 0x00, 0x40};

// e8m0 scale byte s -> 2^(s - 127) / 2 (the 1/2 undoes kTwiceFp4's doubling). Every entry is exact in fp32.
struct HalfScales {
  float v[256];
  HalfScales() {
    for (int s = 0; s < 256; ++s) v[s] = std::ldexp(1.0f, s - 128);
  }
};
const HalfScales kHalfScale;

inline float bf16_to_float(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// bf16 weights are widened by interleaving each word with a zero word below it (a bf16 value is the top half of its
// fp32): unpacklo/unpackhi(zero, w) on a register of Step bf16 words leave, per 128-bit lane (four values each), the
// lane's low four words in the low vector and its high four in the high one. The activations are reordered once per
// call into that order (a tail of fewer than Step stays in natural order), so the FMAs pair them up unchanged.
template <int64_t Step>
void unpacked_bf16_layout(const float* x, int64_t k, float* dst) {
  constexpr int kLanes = Step / 8;
  const int64_t whole = k - k % Step;
  for (int64_t c = 0; c < whole; c += Step, x += Step, dst += Step)
    for (int half = 0; half < 2; ++half)
      for (int lane = 0; lane < kLanes; ++lane)
        for (int j = 0; j < 4; ++j) dst[Step / 2 * half + 4 * lane + j] = x[8 * lane + 4 * half + j];
  std::memcpy(dst, x, (k - whole) * sizeof(float));
}

// -- the per-ISA kernels -------------------------------------------------------------------------------------------
// dot:    out[r * ldo + m] = sum_k x[r * ldx + k] * W[m, k]  for r < n, m in [m0, m1)
// decode: dst[(m - m0) * K + k] = W[m, k]                    for m in [m0, m1)
struct Mxfp4 {
  const uint8_t* blocks;  // [M, G, 16]
  const uint8_t* scales;  // [M, G]
  int64_t groups;         // G = K / 32
};
struct Bf16 {
  const uint16_t* w;  // [M, K]
  int64_t k;
};

using Mxfp4Dot = void (*)(const Mxfp4&, int64_t m0, int64_t m1, const float* x, int64_t ldx, int64_t n, float* out,
                          int64_t ldo);
using Mxfp4Decode = void (*)(const Mxfp4&, int64_t m0, int64_t m1, float* dst);
using Bf16Dot = void (*)(const Bf16&, int64_t m0, int64_t m1, const float* x, int64_t ldx, int64_t n, float* out,
                         int64_t ldo);
using Bf16Decode = void (*)(const Bf16&, int64_t m0, int64_t m1, float* dst);

// Reorders one activation row of K values into the order a dot kernel reads them in (nullptr: natural order).
using DotLayout = void (*)(const float* x, int64_t k, float* dst);
// out[r * ldo + i] = x[r] . t[i] for r < n, i < mt: the activations packed by the same path's PackRows (rows padded
// to kPackRows), t mt rows of k fp32 followed by zero rows up to a multiple of kGemmCols; acc: scratch of
// round_up(mt, kGemmCols) * padded_rows(n) floats. The AVX-512 path reads the zero rows and acc; the AVX2 one
// neither (its blocks of six weight rows repeat the last row instead, its sums stay in registers and a small buffer).
using GemmNt = void (*)(const float* xt, int64_t n, const float* t, int64_t mt, int64_t k, float* out, int64_t ldo,
                        float* acc);
// x [n, k] (rows ldx apart) -> dst: padded_rows(n) * k floats in the order the path's gemm_nt reads them.
using PackRows = void (*)(const float* x, int64_t ldx, int64_t n, int64_t k, float* dst);
constexpr int64_t kPackRows = 16;  // activation rows per vector of the own sgemm
constexpr int64_t kGemmCols = 8;   // weight rows (output columns) per block of the own sgemm
inline int64_t padded_rows(int64_t n) { return (n + kPackRows - 1) / kPackRows * kPackRows; }

// x [n, k] (rows ldx apart) -> dst [k, padded_rows(n)]: each step of k holds the n rows' values, then zeros.
void pack_rows_k_major(const float* x, int64_t ldx, int64_t n, int64_t k, float* dst) {
  const int64_t np = padded_rows(n);
  for (int64_t c = 0; c < k; ++c, dst += np) {
    for (int64_t r = 0; r < n; ++r) dst[r] = x[r * ldx + c];
    for (int64_t r = n; r < np; ++r) dst[r] = 0.f;
  }
}

// Decode attention for one (row, kv head) over some of its visible slots (one chunk): the `group` query heads that
// share the kv head, over `count` slots. Without the sink: the chunk's part, merged with the others' and the sink
// by decode_attention.
//   out[g] = sum_i p[g, i] v[slots[i]] / total[g],  p[g, i] = e^(s[g, i] - max[g]),  s[g, i] = q[g] . k[slots[i]] * scale
// q and out [group, dim]; k and v rows `slot_stride` floats apart; scores: scratch of group * count floats.
struct Attend {
  const float* q;
  const float* k;
  const float* v;
  int64_t slot_stride;
  const int64_t* slots;
  int64_t count;
  float scale;
  int64_t group, dim;
  float* out;
  float* maxima;  // [group]
  float* totals;  // [group]
  float* scores;
};
using AttendFn = void (*)(const Attend&);

// GPT-OSS's clamped SwiGLU on n interleaved (gate, up) pairs: out[j] = (up_j + 1) * gate_j * sigmoid(alpha gate_j),
// gate clamped above at `limit`, up to [-limit, limit].
using SwigluFn = void (*)(const float* gate_up, int64_t n, float alpha, float limit, float* out);

// One kv head's rows lie a whole cache row (all the kv heads) apart, a stride the hardware prefetcher did not
// follow: from memory, a slot of one head took ~90 ns a thread against ~25 in cache (Zen 5 VM, 20b heads: 8 kv
// heads of 64, group 8; 11 GB/s of cache read on 2 threads). So the score loop asks for the key and value rows of
// the slot kAttendAhead ahead (the values are read by the next phase, from L1/L2): 4,096 slots, one row, 2 threads,
// from memory: 1.51 -> 0.73-0.75 ms (22-24 GB/s); 8 rows 12.0 -> 5.5-5.8 ms; 4 or 32 slots ahead were slower, 16
// the same.
constexpr int64_t kAttendAhead = 8;
// (Callers test the bounds themselves, against their local n, in each of the three score loops: with the test
// inside this function, or in a helper reading a.count, GCC 12 -O3 dropped the prefetches altogether. Check the
// disassembly for prefetcht0 after an edit.)
inline void prefetch_slot(const Attend& a, int64_t i) {
  const char* kr = reinterpret_cast<const char*>(a.k + a.slots[i] * a.slot_stride);
  const char* vr = reinterpret_cast<const char*>(a.v + a.slots[i] * a.slot_stride);
  for (int64_t b = 0; b < a.dim * static_cast<int64_t>(sizeof(float)); b += 64) {
    __builtin_prefetch(kr + b, 0, 3);
    __builtin_prefetch(vr + b, 0, 3);
  }
}

// The portable path (and AVX2's for head sizes not a multiple of 8); `omp simd` lets the compiler vectorise the
// loops over `dim`, reordering the dot's sum. Each key and value row is read once for all the group's heads.
inline void attend_body(const Attend& a) {
  const int64_t n = a.count, dim = a.dim;
  for (int64_t i = 0; i < std::min(kAttendAhead, n); ++i) prefetch_slot(a, i);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAttendAhead < n) prefetch_slot(a, i + kAttendAhead);
    const float* kr = a.k + a.slots[i] * a.slot_stride;
    for (int64_t g = 0; g < a.group; ++g) {
      const float* qg = a.q + g * dim;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < dim; ++d) s += qg[d] * kr[d];
      a.scores[g * n + i] = s * a.scale;
    }
  }
  for (int64_t g = 0; g < a.group; ++g) {
    float* sg = a.scores + g * n;
    float top = -INFINITY;
    for (int64_t i = 0; i < n; ++i) top = std::max(top, sg[i]);
    float total = 0.f;
    for (int64_t i = 0; i < n; ++i) total += (sg[i] = std::exp(sg[i] - top));
    for (int64_t i = 0; i < n; ++i) sg[i] /= total;
    a.maxima[g] = top, a.totals[g] = total;
  }
  std::fill(a.out, a.out + a.group * dim, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const float* vr = a.v + a.slots[i] * a.slot_stride;
    for (int64_t g = 0; g < a.group; ++g) {
      const float p = a.scores[g * n + i];
      float* og = a.out + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) og[d] += p * vr[d];
    }
  }
}

// The many-rows path on matrix tiles: weights as bf16 rows (exact), activations cut into kTileParts bf16 parts
// (split), C += A B on 16 x 16 fp32 tiles (see amx:: for the layouts and why the result is the fp32 one).
constexpr int64_t kTileRows = 16;  // weight rows a tile multiplies at once; activation rows per split block
constexpr int64_t kTileStep = 32;  // K values a tile row holds; K must be a multiple of it
constexpr int64_t kTileParts = 3;  // bf16 parts an fp32 activation is cut into
struct TileKernels {
  void (*configure)();  // before the first tile instruction of a thread's work, per call
  void (*release)();
  // up to kTileRows activation rows -> their split block (split_words(rows, k) words per kTileRows rows); `quads`:
  // in mxfp4_decode's order
  void (*split)(const float* x, int64_t ldx, int64_t rows, int64_t k, bool quads, uint16_t* dst);
  // MXFP4 weight rows [m0, m1) -> bf16 rows of K in the MXFP4 dot_layout's order, zero rows up to the next
  // multiple of kTileRows
  void (*mxfp4_decode)(const Mxfp4& w, int64_t m0, int64_t m1, uint16_t* dst);
  // out[r * ldo + i] = x[r] . a[i] for r < n, i < mt (a's rows padded to a multiple of kTileRows, lda apart)
  void (*gemm)(const uint16_t* a, int64_t lda, int64_t mt, const uint16_t* xs, int64_t n, int64_t k, float* out,
               int64_t ldo);
};

inline int64_t split_words(int64_t rows, int64_t k) {
  return (rows + kTileRows - 1) / kTileRows * (k / kTileStep) * kTileParts * kTileRows * kTileStep;
}

struct Kernels {
  const char* name;
  DotLayout mxfp4_dot_layout;
  Mxfp4Dot mxfp4_dot;
  Mxfp4Decode mxfp4_decode;
  DotLayout bf16_dot_layout;
  Bf16Dot bf16_dot;
  Bf16Decode bf16_decode;
  AttendFn attend;
  SwigluFn swiglu;
  Prefetch prefetch;  // starting distances for this path (see g_prefetch)
  bool prefetches_mxfp4, prefetches_bf16;  // whether this path's loops read those distances at all
  const TileKernels* tiles;  // the many-rows path on matrix tiles (AMX), or nullptr: decode fp32 for sgemm
  GemmNt gemm_nt;            // this path's own sgemm for the fp32 tiles, or nullptr: MKL's (see own_gemm)
  PackRows pack_rows;        // the activations' layout for gemm_nt
  // Where gemm_nt takes the many rows: the rows bf16 weights with K <= 1024 keep on this path's register tiles
  // (bf16 read in place, no decode, no padding). Zen 5 VM, AVX-512, 2 threads, register / own time at 256 rows:
  // 1280 x 768 0.83-0.92x, 768 x 1024 0.68-0.84x (512 rows 1280 x 768 1.09-1.18x): 256. Zen 3, AVX2 (three
  // activation rows of 8-float vectors a pass), kernel_ab, 16384 x 768 at 256 rows on the register tiles:
  // 1.28-1.48x MKL's time: kDecodeRows.
  int64_t own_gemm_bf16_rows;
};

#include "cpu_scalar.h"

#ifdef GPTOSS_X86
#include "cpu_avx2.h"

#include "cpu_avx512.h"

#include "cpu_amx.h"
#endif  // GPTOSS_X86

// -- instruction-set selection -------------------------------------------------------------------------------------
const Kernels kScalar{"scalar", nullptr, scalar::mxfp4_dot, scalar::mxfp4_decode, nullptr, scalar::bf16_dot,
                      scalar::bf16_decode, scalar::attend, scalar::swiglu, {0, 0}, false, false, nullptr, nullptr,
                      nullptr, kDecodeRows};
#ifdef GPTOSS_X86
const Kernels kAvx2{"avx2", avx2::mxfp4_dot_layout, avx2::mxfp4_dot, avx2::mxfp4_decode, avx2::bf16_dot_layout,
                    avx2::bf16_dot, avx2::bf16_decode, avx2::attend, avx2::swiglu, {1024, 1024}, true, false, nullptr,
                    avx2::gemm_nt, avx2::pack_panels, kDecodeRows};
const Kernels kAvx512{"avx512", avx512::mxfp4_dot_layout, avx512::mxfp4_dot, avx512::mxfp4_decode,
                      avx512::bf16_dot_layout, avx512::bf16_dot, avx512::bf16_decode, avx512::attend, avx2::swiglu,
                      {8192, 8192}, true, true, nullptr, avx512::gemm_nt, pack_rows_k_major, 256};
// AVX-512 with the many-rows path on AMX tiles.
Kernels with_tiles(Kernels ks, const char* name, const TileKernels* tiles) {
  ks.name = name;
  ks.tiles = tiles;
  return ks;
}
const Kernels kAmx = with_tiles(kAvx512, "amx", &amx::kTiles);
#endif

// The instruction sets this CPU runs, best first.
std::vector<const Kernels*> supported() {
  std::vector<const Kernels*> out;
#ifdef GPTOSS_X86
  __builtin_cpu_init();
  if (amx::usable()) out.push_back(&kAmx);
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    out.push_back(&kAvx512);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(&kAvx2);
#endif
  out.push_back(&kScalar);
  return out;
}

const Kernels* choose(const std::string& name) {
  const auto available = supported();
  if (name.empty() || name == "best") return available.front();
  for (const Kernels* k : available)
    if (name == k->name) return k;
  std::string names;
  for (const Kernels* k : available) names += std::string(names.empty() ? "" : ", ") + k->name;
  TORCH_CHECK(false, "GPTOSS_CPU_ISA='", name, "' is not available on this CPU (available: ", names, ")");
}

const Kernels* g_kernels = nullptr;

// Whether the fp32 tiles of the many-rows path go through the instruction set's own sgemm (gemm_nt) instead of
// MKL's. MKL dispatches on the vendor: on Intel CPUs it runs its AVX-512 code (and there is the one to beat), on
// others its AVX2 code, at half the AVX-512 FMA rate where the core has full-width units (Zen 5), and on AVX2 it
// copies each freshly decoded tile into its own layout again (13.6% of a 256-token chunk on a Zen 3). So: own by
// default where the CPU is not Intel's; GPTOSS_SGEMM=own|mkl or set_sgemm() choose either on any CPU.
bool cpu_is_intel() {
#ifdef GPTOSS_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4), std::memcpy(vendor + 4, &d, 4), std::memcpy(vendor + 8, &c, 4);
  return std::string(vendor) == "GenuineIntel";
#else
  return false;
#endif
}

std::string g_sgemm = "auto";  // "auto", "own" or "mkl"

bool own_gemm(const Kernels& ks) {
  static const bool intel = cpu_is_intel();  // once: CPUID leaves a VM for its hypervisor
  if (!ks.gemm_nt) return false;
  return g_sgemm == "own" || (g_sgemm == "auto" && !intel);
}

const Kernels& kernels() {
  if (!g_kernels) {
    const char* env = std::getenv("GPTOSS_CPU_ISA");
    g_kernels = choose(env ? env : "");
    const char* sgemm = std::getenv("GPTOSS_SGEMM");
    if (sgemm && *sgemm) {
      const std::string name(sgemm);
      TORCH_CHECK(name == "own" || name == "mkl" || name == "auto", "GPTOSS_SGEMM='", name,
                  "': expected own, mkl or auto");
      g_sgemm = name;
    }
    g_prefetch = g_kernels->prefetch;
  }
  return *g_kernels;
}

// -- drivers -----------------------------------------------------------------------------------------------------
struct Mxfp4Experts {
  const uint8_t* blocks;
  const uint8_t* scales;
  int64_t m, groups;
  int64_t k() const { return groups * kBlock; }
  Mxfp4 expert(int64_t e) const {
    return {blocks + e * m * groups * kBlockBytes, scales + e * m * groups, groups};
  }
  static DotLayout dot_layout(const Kernels& ks) { return ks.mxfp4_dot_layout; }
  static void dot(const Kernels& ks, const Mxfp4& w, int64_t m0, int64_t m1, const float* x, int64_t ldx,
                  int64_t n, float* out, int64_t ldo) {
    ks.mxfp4_dot(w, m0, m1, x, ldx, n, out, ldo);
  }
  static void decode(const Kernels& ks, const Mxfp4& w, int64_t m0, int64_t m1, float* dst) {
    ks.mxfp4_decode(w, m0, m1, dst);
  }
  // Where the many-rows path is the own sgemm, the register path keeps up to 24 rows where K <= 1024: the sgemm
  // pads rows to 16 (17-24 rows: a third to a half of its products on zeros), and the register decode measured
  // faster up to 24 (Zen 5 VM, 32 experts 1536 x 768 from memory, 2 threads: 17 rows 0.70-0.85x the time, 20
  // 0.77-0.96x, 24 0.86-0.97x; 28 rows 1.01-1.27x). At gpt-oss-20b's K = 2880 the sgemm takes them (its MoE layer
  // at 256 tokens, ~32 rows an expert: 16 against 24, 0.96-0.99x the time).
  static int64_t own_gemm_few_rows(const Kernels&, int64_t k) { return k <= 1024 ? 24 : 16; }
  static constexpr bool kTileQuads = true;  // tile_rows() decodes in quad order
  // Weight rows [m0, m1) as bf16 rows `ld` apart, padded to a multiple of kTileRows: decoded into buf.
  static const uint16_t* tile_rows(const Kernels& ks, const Mxfp4& w, int64_t m0, int64_t m1, uint16_t* buf,
                                   int64_t& ld) {
    ks.tiles->mxfp4_decode(w, m0, m1, buf);
    ld = w.groups * kBlock;
    return buf;
  }
};

struct Bf16Experts {
  const uint16_t* w;
  int64_t m, kk;
  int64_t k() const { return kk; }
  Bf16 expert(int64_t e) const { return {w + e * m * kk, kk}; }
  static DotLayout dot_layout(const Kernels& ks) { return ks.bf16_dot_layout; }
  static void dot(const Kernels& ks, const Bf16& w, int64_t m0, int64_t m1, const float* x, int64_t ldx, int64_t n,
                  float* out, int64_t ldo) {
    ks.bf16_dot(w, m0, m1, x, ldx, n, out, ldo);
  }
  static void decode(const Kernels& ks, const Bf16& w, int64_t m0, int64_t m1, float* dst) {
    ks.bf16_decode(w, m0, m1, dst);
  }
  // bf16 weights against the own sgemm: the register tiles keep the path's own_gemm_bf16_rows where K <= 1024,
  // and kDecodeRows beyond (Zen 5 VM, AVX-512, 2 threads, register / own time at 256 rows: 1280 x 1536
  // 1.10-1.15x, 2048 x 2048 1.16-1.45x).
  static int64_t own_gemm_few_rows(const Kernels& ks, int64_t k) {
    return k <= 1024 ? ks.own_gemm_bf16_rows : kDecodeRows;
  }
  static constexpr bool kTileQuads = false;  // natural order
  // The weights themselves when the rows fill whole tiles; a last partial tile is copied into buf and zero-padded.
  static const uint16_t* tile_rows(const Kernels&, const Bf16& w, int64_t m0, int64_t m1, uint16_t* buf,
                                   int64_t& ld) {
    ld = w.k;
    if ((m1 - m0) % kTileRows == 0) return w.w + m0 * w.k;
    const int64_t padded = (m1 - m0 + kTileRows - 1) / kTileRows * kTileRows;
    std::memcpy(buf, w.w + m0 * w.k, (m1 - m0) * w.k * sizeof(uint16_t));
    std::memset(buf + (m1 - m0) * w.k, 0, (padded - (m1 - m0)) * w.k * sizeof(uint16_t));
    return buf;
  }
};

// The many-rows path's decoded tile: one buffer per thread, kept between calls (a fresh allocation each call would
// pay page faults).
// `slot` 0: a worker's weight tile; 1: its sums (own sgemm); 2: the calling thread's packed activations.
float* scratch(int64_t floats, int slot = 0) {
  thread_local std::vector<float> buffers[3];
  std::vector<float>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

// The same for bf16 words: `slot` 0 holds a worker's weight tile, slot 1 the calling thread's split activations.
uint16_t* scratch_words(int64_t words, int slot) {
  thread_local std::vector<uint16_t> buffers[2];
  std::vector<uint16_t>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < words) buffer.resize(words);
  return buffer.data();
}

struct Group {
  int64_t expert, start, rows;
};

// One unit of work: output columns [m0, m1) of one group's rows.
struct Item {
  int64_t group, m0, m1;
};

// A thread's contiguous share of a call's work items: the next one not yet taken, and the end.
struct Share {
  alignas(64) std::atomic<int64_t> next{0};
  int64_t end = 0;
};

// The next item for thread `self`: from its own share, else from the others' in turn; -1 when all are taken.
inline int64_t take(std::vector<Share>& shares, int64_t self) {
  const int64_t n = static_cast<int64_t>(shares.size());
  for (int64_t j = 0; j < n; ++j) {
    Share& s = shares[(self + j) % n];
    if (s.next.load(std::memory_order_relaxed) >= s.end) continue;
    const int64_t i = s.next.fetch_add(1, std::memory_order_relaxed);
    if (i < s.end) return i;
  }
  return -1;
}

// x [N, K] fp32 contiguous, rows sorted by expert with cumulative row ends `ends`; bias [E, M] fp32 or undefined.
//
// The whole call is one parallel region: items are (group, block of output columns); each thread takes its own
// contiguous share of them in order, then what is left of the others' (take), so an expert's rows, a big and a small
// expert, and a thread the OS preempted all balance without a barrier per expert. Few rows: the register-decode dot.
// Many rows: the block's weights are decoded into the thread's fp32 tile and one sgemm (single-threaded: we are inside
// the parallel region) takes all of the expert's rows; with tile kernels (AMX), the rows are split once before the
// region and each block's weights are decoded to bf16 (or read in place) for the tile product. `finished(group, m0,
// m1)` runs on an item's thread once its block (bias included) is written, while the block is still in that core's
// cache.
struct NoEpilogue {
  void operator()(const Group&, int64_t, int64_t) const {}
};

template <class W, class Epilogue = NoEpilogue>
void grouped_into(const at::Tensor& x, const W& w, const std::vector<int64_t>& ends,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& out, const Epilogue& finished = {}) {
  const int64_t k = w.k(), m = w.m;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const Kernels& ks = kernels();

  std::vector<Group> groups;
  int64_t start = 0;
  for (int64_t e = 0; e < static_cast<int64_t>(ends.size()); ++e) {
    if (ends[e] > start) groups.push_back({e, start, ends[e] - start});
    start = ends[e];
  }
  const TileKernels* tk = k % kTileStep == 0 ? ks.tiles : nullptr;
  const bool own = !tk && own_gemm(ks);  // the many-rows path on this instruction set's own sgemm
  const int64_t few = own ? W::own_gemm_few_rows(ks, k) : kDecodeRows;  // rows an expert takes on the register path
  const int64_t tile_rows = std::max<int64_t>(16, std::min<int64_t>(256, kTileFloats / k) / 16 * 16);
  // A layer with few many-rows items (a linear layer: M / tile_rows of them) would leave a thread idle while the
  // last ones run (1280 outputs: 5 items for 2 threads): tiles get narrower until each thread has four, or 16 rows.
  int64_t many_step = tile_rows;
  const auto many_items = [&](int64_t step) {
    int64_t count = 0;
    for (const Group& g : groups) count += g.rows > few ? (m + step - 1) / step : 0;
    return count;
  };
  while (many_step > 16 && many_items(many_step) < 4 * at::get_num_threads())
    many_step = std::max<int64_t>(16, many_step / 2 / 16 * 16);
  std::vector<Item> items;
  for (int pass = 0; pass < 2; ++pass)  // the many-rows items first: the small dot items then fill the tail
    for (int64_t gi = 0; gi < static_cast<int64_t>(groups.size()); ++gi) {
      const bool many = groups[gi].rows > few;
      if (many != (pass == 0)) continue;
      const int64_t step = many ? many_step : kDotRows;
      for (int64_t m0 = 0; m0 < m; m0 += step) items.push_back({gi, m0, std::min(m, m0 + step)});
    }
  if (items.empty()) return;

  // The many-rows path on tiles (K a whole number of tile steps): each such group's rows split once, here.
  std::vector<int64_t> split_at(groups.size(), -1);
  uint16_t* xs = nullptr;
  if (tk) {
    std::vector<std::pair<int64_t, int64_t>> blocks;  // (group, first row) of each kTileRows rows to split
    int64_t words = 0;
    for (size_t gi = 0; gi < groups.size(); ++gi)
      if (groups[gi].rows > few) {
        split_at[gi] = words;
        words += split_words(groups[gi].rows, k);
        for (int64_t r = 0; r < groups[gi].rows; r += kTileRows) blocks.push_back({gi, r});
      }
    xs = scratch_words(words, 1);
    const int64_t block_words = split_words(kTileRows, k);
    at::parallel_for(0, static_cast<int64_t>(blocks.size()), 8, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const Group& g = groups[blocks[b].first];
        const int64_t r = blocks[b].second;
        tk->split(xp + (g.start + r) * k, k, std::min(kTileRows, g.rows - r), k, W::kTileQuads,
                  xs + split_at[blocks[b].first] + r / kTileRows * block_words);
      }
    });
  }

  // The many-rows path on the instruction set's own sgemm: each such group's rows packed once, here. The sgemm
  // pads rows to 16; up to kSgemmTail rows past a multiple of 16 go to the register path instead, which costs a
  // decode of the weights per four rows and their products, where padding would cost 8 or more rows of products
  // (Zen 5 VM, MoE layer at 256 tokens: 4 rows 0.90-0.97x the time of padding all, 8 rows a further 0.96-1.01x).
  constexpr int64_t kSgemmTail = 8;
  const auto sgemm_rows = [&](const Group& g) {
    const int64_t tail = g.rows % kPackRows;
    return own && g.rows > few && tail <= kSgemmTail ? g.rows - tail : g.rows;
  };
  std::vector<int64_t> packed_at(groups.size(), -1);
  float* xt = nullptr;
  int64_t widest = 0;  // padded rows of the biggest such group
  if (own) {
    int64_t floats = 0;
    for (size_t gi = 0; gi < groups.size(); ++gi)
      if (groups[gi].rows > few) {
        packed_at[gi] = floats;
        floats += padded_rows(sgemm_rows(groups[gi])) * k;
        widest = std::max(widest, padded_rows(sgemm_rows(groups[gi])));
      }
    xt = scratch(floats, 2);
    at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t g0, int64_t g1) {
      for (int64_t gi = g0; gi < g1; ++gi)
        if (packed_at[gi] >= 0)
          ks.pack_rows(xp + groups[gi].start * k, k, sgemm_rows(groups[gi]), k, xt + packed_at[gi]);
    });
  }

  // The rows the dot kernel reads, in its activation order where it has one (reordered once, not per item).
  const float* xdot = xp;
  at::Tensor reordered;
  if (const auto layout = W::dot_layout(ks)) {
    reordered = at::empty_like(x);
    float* rp = reordered.data_ptr<float>();
    for (const Group& g : groups) {
      const int64_t first = g.rows <= few ? 0 : sgemm_rows(g);  // the rows the register path takes
      for (int64_t r = g.start + first; r < g.start + g.rows; ++r) layout(xp + r * k, k, rp + r * k);
    }
    xdot = rp;
  }

  // Each thread starts on its own contiguous share of the items and takes them in order, so its weight rows are
  // one stream (the prefetches run into its next item, not another thread's); a thread whose share is done takes
  // the next items of the others' shares. An atomic counter per share hands out each item once. Against one
  // counter for all (items alternating between threads), Zen 5 VM, 2 threads, weights from memory (kernel_ab):
  // MoE layer at 1 token 0.73-0.94x the time at bench widths, 0.81-0.86x at gpt-oss-20b's, 8 tokens 0.69-0.76x;
  // the bench lm_head at 1 token 0.90-0.98x; 256 tokens (compute-bound) 1.00-1.03x.
  const int64_t count = static_cast<int64_t>(items.size());
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  std::vector<Share> shares(threads);
  for (int64_t t = 0; t < threads; ++t) {
    shares[t].next.store(count * t / threads, std::memory_order_relaxed);
    shares[t].end = count * (t + 1) / threads;
  }
  at::parallel_for(0, threads, 1, [&](int64_t self, int64_t) {
    float* tile = nullptr;
    uint16_t* words = nullptr;
    for (int64_t i; (i = take(shares, self)) >= 0;) {
      const Item& it = items[i];
      const Group& g = groups[it.group];
      const auto ex = w.expert(g.expert);
      const int64_t mt = it.m1 - it.m0;
      float* o = op + g.start * m + it.m0;
      if (g.rows <= few) {
        W::dot(ks, ex, it.m0, it.m1, xdot + g.start * k, k, g.rows, op + g.start * m, m);
      } else if (tk) {
        if (!words) {
          words = scratch_words((tile_rows + kTileRows) * k, 0);
          tk->configure();
        }
        int64_t ld = 0;
        const uint16_t* a = W::tile_rows(ks, ex, it.m0, it.m1, words, ld);
        tk->gemm(a, ld, mt, xs + split_at[it.group], g.rows, k, o, m);
      } else if (own) {
        if (!tile) tile = scratch(tile_rows * k);
        W::decode(ks, ex, it.m0, it.m1, tile);
        const int64_t cols = (mt + kGemmCols - 1) / kGemmCols * kGemmCols;  // zero rows up to a whole block
        std::fill(tile + mt * k, tile + cols * k, 0.f);
        const int64_t main = sgemm_rows(g);
        ks.gemm_nt(xt + packed_at[it.group], main, tile, mt, k, o, m, scratch(tile_rows * widest, 1));
        if (main < g.rows)
          W::dot(ks, ex, it.m0, it.m1, xdot + (g.start + main) * k, k, g.rows - main, op + (g.start + main) * m, m);
      } else {
        if (!tile) tile = scratch(tile_rows * k);
        W::decode(ks, ex, it.m0, it.m1, tile);
        // out[rows, m0:m1] (row stride m) = x[rows] tile^T: torch's sgemm writes the strided block in place
        at::Tensor dst = at::from_blob(o, {g.rows, mt}, {m, 1}, x.options());
        at::mm_out(dst, x.narrow(0, g.start, g.rows), at::from_blob(tile, {mt, k}, x.options()).t());
      }
      if (bp) {
        const float* be = bp + g.expert * m + it.m0;
        for (int64_t r = 0; r < g.rows; ++r)
          for (int64_t j = 0; j < mt; ++j) o[r * m + j] += be[j];
      }
      finished(g, it.m0, it.m1);
    }
    if (words) tk->release();
  });
}

template <class W>
at::Tensor grouped(const at::Tensor& x, const W& w, const std::vector<int64_t>& ends,
                   const c10::optional<at::Tensor>& bias) {
  at::Tensor out = at::empty({x.size(0), w.m}, x.options());
  grouped_into(x, w, ends, bias, out);
  return out;
}

// Every tensor these kernels read must be in host memory: the ops dispatch on the CPU key only when all their
// tensors are CPU ones, and a caller of this module's functions may pass anything.
void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

std::vector<int64_t> row_ends(const at::Tensor& offs, int64_t experts, int64_t rows) {
  check_cpu(offs, "offs");
  TORCH_CHECK(offs.dim() == 1 && offs.size(0) == experts, "offs must be [", experts, "] (one row end per expert), got ",
              offs.sizes());
  const at::Tensor o = offs.to(at::kLong).contiguous();
  std::vector<int64_t> ends(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + experts);
  int64_t prev = 0;
  for (int64_t e : ends) {
    TORCH_CHECK(e >= prev && e <= rows, "offs must be non-decreasing row ends within [0, ", rows, "]");
    prev = e;
  }
  return ends;
}

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "x must be a 2-d float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weights take ", k);
}

void check_bias(const c10::optional<at::Tensor>& bias, int64_t experts, int64_t m) {
  if (!bias.has_value()) return;
  check_cpu(*bias, "bias");
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == experts * m,
              "bias must be contiguous float32 with ", experts * m, " values, got ", bias->scalar_type(), " ",
              bias->sizes());
}

Mxfp4Experts mxfp4_experts(const at::Tensor& blocks, const at::Tensor& scales, const char* name) {
  check_cpu(blocks, "blocks");
  check_cpu(scales, "scales");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 4 && blocks.size(3) == kBlockBytes &&
                  blocks.is_contiguous(),
              name, "blocks must be contiguous uint8 [E, M, K/32, 16], got ", blocks.scalar_type(), " ",
              blocks.sizes());
  const int64_t experts = blocks.size(0), m = blocks.size(1), groups = blocks.size(2);
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({experts, m, groups}),
              name, "scales must be contiguous uint8 [E, M, K/32] = ", at::IntArrayRef({experts, m, groups}),
              ", got ", scales.sizes());
  return {blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), m, groups};
}

at::Tensor mxfp4_grouped_mm(const at::Tensor& x_, const at::Tensor& blocks, const at::Tensor& scales,
                            const at::Tensor& offs, const c10::optional<at::Tensor>& bias) {
  const Mxfp4Experts w = mxfp4_experts(blocks, scales, "");
  check_x(x_, w.k());
  check_bias(bias, blocks.size(0), w.m);
  const at::Tensor x = x_.contiguous();
  return grouped(x, w, row_ends(offs, blocks.size(0), x.size(0)), bias);
}

at::Tensor bf16_grouped_mm(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& offs,
                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 3 && weight.is_contiguous(),
              "weight must be contiguous bfloat16 [E, M, K], got ", weight.scalar_type(), " ", weight.sizes());
  check_cpu(weight, "weight");
  const int64_t experts = weight.size(0), m = weight.size(1);
  check_x(x_, weight.size(2));
  check_bias(bias, experts, m);
  const at::Tensor x = x_.contiguous();
  const Bf16Experts w{reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), m, weight.size(2)};
  return grouped(x, w, row_ends(offs, experts, x.size(0)), bias);
}

at::Tensor bf16_linear(const at::Tensor& x_, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be contiguous bfloat16 [M, K], got ", weight.scalar_type(), " ", weight.sizes());
  check_cpu(weight, "weight");
  const int64_t m = weight.size(0);
  check_x(x_, weight.size(1));
  check_bias(bias, 1, m);
  const at::Tensor x = x_.contiguous();
  const Bf16Experts w{reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), m, weight.size(1)};
  return grouped(x, w, {x.size(0)}, bias);
}

// mxfp4_moe's intermediates (`slot` 0-3), in per-thread buffers kept between calls: at prefill sizes they are tens
// to hundreds of MB, and glibc maps a block above 32 MiB afresh on every call even when told to keep freed memory
// (model/host_memory.py); faulting in and clearing those pages took ~20% of a 2,048-token MoE call at bench
// widths (perf, the op alone). Each thread that calls the op holds its largest call's intermediates (gpt-oss-20b,
// a batch-8 x 256-token prefill chunk: ~470 MB, memory that call needed anyway).
at::Tensor kept(int slot, int64_t rows, int64_t cols) {
  thread_local std::vector<float> buffers[4];
  std::vector<float>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < rows * cols) buffer.resize(rows * cols);
  return at::from_blob(buffer.data(), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// The routed experts of one MoE layer in one call, published weights: y[t] = sum_j weights[t, j] *
// down_e(swiglu(gate_up_e(x[t]))) with e = experts[t, j]. The (token, expert) pairs are counting-sorted by expert
// (stable), gathered, multiplied by gate_up, activated (clamped SwiGLU on interleaved gate/up columns, applied to
// each gate_up block as it finishes, written onto down's block grid: `down_pad` zero columns before, the rest
// after), multiplied by down, and summed back per token in the order of the token's choices. The op-by-op graph's
// arithmetic except the sigmoid's e^x (the instruction set's own, within 1 ulp); one node instead of nine.
at::Tensor mxfp4_moe(const at::Tensor& x_, const at::Tensor& weights_, const at::Tensor& experts_,
                     const at::Tensor& gu_blocks, const at::Tensor& gu_scales, const at::Tensor& gu_bias,
                     const at::Tensor& dn_blocks, const at::Tensor& dn_scales, const at::Tensor& dn_bias,
                     int64_t down_pad, double alpha, double limit) {
  const Mxfp4Experts gate_up = mxfp4_experts(gu_blocks, gu_scales, "gate_up ");
  const Mxfp4Experts down = mxfp4_experts(dn_blocks, dn_scales, "down ");
  const int64_t num_experts = gu_blocks.size(0), inter = gate_up.m / 2, down_k = down.k();
  check_x(x_, gate_up.k());
  TORCH_CHECK(dn_blocks.size(0) == num_experts && down.m == gate_up.k() && gate_up.m % 2 == 0,
              "gate_up [E, 2I, H/32, 16] and down [E, H, I'/32, 16] disagree: ", gu_blocks.sizes(), " vs ",
              dn_blocks.sizes());
  check_bias(gu_bias, num_experts, gate_up.m);
  check_bias(dn_bias, num_experts, down.m);
  const at::Tensor x = x_.contiguous();
  const int64_t n = x.size(0), h = x.size(1);
  TORCH_CHECK(experts_.dim() == 2 && experts_.size(0) == n && weights_.sizes() == experts_.sizes(),
              "weights and experts must both be [", n, ", k], got ", weights_.sizes(), " and ", experts_.sizes());
  check_cpu(weights_, "weights");
  check_cpu(experts_, "experts");
  const at::Tensor experts = experts_.to(at::kLong).contiguous();
  const at::Tensor weights = weights_.to(at::kFloat).contiguous();
  const int64_t k = experts.size(1), pairs = n * k;
  TORCH_CHECK(down_pad >= 0 && down_pad + inter <= down_k, "down_pad ", down_pad, " puts ", inter,
              " columns outside down's ", down_k, " block-grid columns");

  // counting sort of the pairs by expert; row r of the sorted list is pair order[r]
  const int64_t* ep = experts.data_ptr<int64_t>();
  std::vector<int64_t> ends(num_experts, 0), order(pairs), row_of_pair(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK(ep[p] >= 0 && ep[p] < num_experts, "expert id ", ep[p], " outside [0, ", num_experts, ")");
    ++ends[ep[p]];
  }
  std::vector<int64_t> next(num_experts, 0);
  for (int64_t e = 0, total = 0; e < num_experts; ++e) next[e] = total, total += ends[e], ends[e] = total;
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t r = next[ep[p]]++;
    order[r] = p;
    row_of_pair[p] = r;
  }

  const float* xp = x.data_ptr<float>();
  at::Tensor rows = kept(0, pairs, h);
  float* rp = rows.data_ptr<float>();
  at::parallel_for(0, pairs, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memcpy(rp + r * h, xp + (order[r] / k) * h, h * sizeof(float));
  });
  // The activation of each finished gate_up block (an even column range: whole gate/up pairs), written onto down's
  // block grid: `down_pad` zero columns before the slice, the rest after.
  at::Tensor act = kept(1, pairs, down_k);
  float* ap = act.data_ptr<float>();
  const float a = static_cast<float>(alpha), lim = static_cast<float>(limit);
  const SwigluFn swiglu = kernels().swiglu;
  const at::Tensor gu = kept(2, pairs, 2 * inter);
  const float* gp = gu.data_ptr<float>();
  const auto activate = [&](const Group& g, int64_t m0, int64_t m1) {
    for (int64_t r = g.start; r < g.start + g.rows; ++r) {
      float* o = ap + r * down_k;
      if (m0 == 0) std::fill(o, o + down_pad, 0.f);
      swiglu(gp + r * 2 * inter + m0, (m1 - m0) / 2, a, lim, o + down_pad + m0 / 2);
      if (m1 == 2 * inter) std::fill(o + down_pad + inter, o + down_k, 0.f);
    }
  };
  grouped_into(rows, gate_up, ends, gu_bias, gu, activate);
  const at::Tensor y = kept(3, pairs, h);
  grouped_into(act, down, ends, dn_bias, y);

  at::Tensor out = at::empty({n, h}, x.options());
  const float* yp = y.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = op + t * h;
      std::fill(o, o + h, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float wj = wp[t * k + j];
        const float* yr = yp + row_of_pair[t * k + j] * h;
        for (int64_t c = 0; c < h; ++c) o[c] += wj * yr[c];
      }
    }
  });
  return out;
}

// The router and the routed experts of one MoE layer in one call: logits = x router_weight^T + router_bias (the
// bf16 linear's arithmetic: the same logits as bf16_linear), each token's top_k logits (largest first; a tie goes
// to the lower expert), a softmax over those, then mxfp4_moe. One node instead of the router's three.
at::Tensor mxfp4_moe_routed(const at::Tensor& x_, const at::Tensor& router_weight,
                            const c10::optional<at::Tensor>& router_bias, int64_t top_k, const at::Tensor& gu_blocks,
                            const at::Tensor& gu_scales, const at::Tensor& gu_bias, const at::Tensor& dn_blocks,
                            const at::Tensor& dn_scales, const at::Tensor& dn_bias, int64_t down_pad, double alpha,
                            double limit) {
  const int64_t num_experts = gu_blocks.size(0);
  TORCH_CHECK(router_weight.dim() == 2 && router_weight.size(0) == num_experts,
              "router_weight must be [", num_experts, ", H] (one row per expert), got ", router_weight.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "top_k ", top_k, " outside [1, ", num_experts, "]");
  const at::Tensor x = x_.contiguous();
  const at::Tensor logits = bf16_linear(x, router_weight, router_bias);
  const int64_t n = x.size(0);
  at::Tensor experts = at::empty({n, top_k}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({n, top_k}, x.options());
  const float* lp = logits.data_ptr<float>();
  int64_t* ep = experts.data_ptr<int64_t>();
  float* wp = weights.data_ptr<float>();
  std::vector<int64_t> ids(num_experts);
  for (int64_t t = 0; t < n; ++t) {
    const float* l = lp + t * num_experts;
    for (int64_t e = 0; e < num_experts; ++e) ids[e] = e;
    std::partial_sort(ids.begin(), ids.begin() + top_k, ids.end(),
                      [l](int64_t a, int64_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    const float top = l[ids[0]];
    float total = 0.f;
    for (int64_t j = 0; j < top_k; ++j) {
      ep[t * top_k + j] = ids[j];
      total += (wp[t * top_k + j] = std::exp(l[ids[j]] - top));
    }
    for (int64_t j = 0; j < top_k; ++j) wp[t * top_k + j] /= total;
  }
  return mxfp4_moe(x, weights, experts, gu_blocks, gu_scales, gu_bias, dn_blocks, dn_scales, dn_bias, down_pad,
                   alpha, limit);
}

// Attention of single-token steps over the cache: q [B, T, Hq, D] at positions q_pos [B, T]; the caches
// [B, S, Hkv, D] hold at slot j the position k_pos[b, j] (negative: never written) for j < n = k_pos.size(1). A
// slot is visible to a query at position p when 0 <= k_pos <= p and, with a window, k_pos > p - window (the
// portable op's mask, model/ops/torch_ops.py). Slots that are not visible are skipped, not masked.
//
// A row's visible slots are cut into chunks of kChunk; a work item is one chunk of one row for some of its kv
// heads (the heads split only as far as the threads need work): a chunk's key and value rows for all the kv heads
// lie together in the cache, and a head's rows, a stride apart, come from L2 for the next head (one head over a
// long cache at a time ran at 2-3 GB/s: 20b shapes, 4k slots). The chunks' parts and the sink logit are then
// merged per head (the softmax's running maximum and total). Chunks and merge depend on the row alone: its result
// is the same whatever the batch, the cache length the step was given, or the thread count.
constexpr int64_t kChunk = 128;

at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& sinks_, const at::Tensor& k_pos_, const at::Tensor& q_pos_,
                            int64_t window, double scale) {
  gptoss::check_attention_inputs(q_, k_cache, v_cache, sinks_, k_pos_, q_pos_);
  const int64_t batch = q_.size(0), steps = q_.size(1), q_heads = q_.size(2), dim = q_.size(3);
  const int64_t slots = k_cache.size(1), kv_heads = k_cache.size(2);
  const at::Tensor k_pos = k_pos_.to(at::kLong).contiguous(), q_pos = q_pos_.to(at::kLong).contiguous();
  const at::Tensor sinks = sinks_.to(at::kFloat).contiguous(), q = q_.contiguous();
  const int64_t n = k_pos.size(1);
  const int64_t group = q_heads / kv_heads, rows = batch * steps;

  // each row's visible slots (lo < k_pos <= p), and its chunks' places in the partial results. A run of 64 slots
  // none of which is visible is passed over after one branch-free test: a step may read the whole cache
  // (kv_buckets=False), most of it slots a short context has not reached (8 rows of 4,096 slots cost 51 us a call
  // more than of 128 slot by slot, 23 us so: BENCHMARKS.md, session 40). A negative position sees nothing.
  std::vector<std::vector<int64_t>> visible(rows);
  std::vector<int64_t> first_chunk(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* kp = k_pos.data_ptr<int64_t>() + (r / steps) * n;
    const int64_t p = q_pos.data_ptr<int64_t>()[r];
    const int64_t lo = window > 0 ? std::max<int64_t>(p - window, -1) : -1;
    const auto seen = [&](int64_t j) {
      return static_cast<uint64_t>(kp[j] - lo - 1) < static_cast<uint64_t>(p - lo);
    };
    for (int64_t j0 = 0; p >= 0 && j0 < n; j0 += 64) {
      const int64_t j1 = std::min<int64_t>(n, j0 + 64);
      bool any = false;
      for (int64_t j = j0; j < j1; ++j) any |= seen(j);
      if (any)
        for (int64_t j = j0; j < j1; ++j)
          if (seen(j)) visible[r].push_back(j);
    }
    first_chunk[r + 1] = first_chunk[r] + (static_cast<int64_t>(visible[r].size()) + kChunk - 1) / kChunk;
  }
  const int64_t chunks = first_chunk[rows];
  const int64_t splits = std::clamp<int64_t>((at::get_num_threads() + chunks - 1) / std::max<int64_t>(chunks, 1), 1,
                                             kv_heads);
  // partial results per chunk: out [Hq, D], maxima [Hq], totals [Hq]
  std::vector<float> part_out(chunks * q_heads * dim), part_max(chunks * q_heads), part_total(chunks * q_heads);
  const Kernels& ks = kernels();
  at::parallel_for(0, chunks * splits, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(group * kChunk);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t c = item / splits, split = item % splits;
      const int64_t r = std::upper_bound(first_chunk.begin(), first_chunk.end(), c) - first_chunk.begin() - 1;
      const int64_t b = r / steps, start = (c - first_chunk[r]) * kChunk;
      const int64_t count = std::min<int64_t>(kChunk, static_cast<int64_t>(visible[r].size()) - start);
      for (int64_t h = split * kv_heads / splits; h < (split + 1) * kv_heads / splits; ++h) {
        const int64_t head0 = h * group, cache0 = (b * slots * kv_heads + h) * dim;
        ks.attend({q.data_ptr<float>() + (r * q_heads + head0) * dim, k_cache.data_ptr<float>() + cache0,
                   v_cache.data_ptr<float>() + cache0, kv_heads * dim, visible[r].data() + start, count,
                   static_cast<float>(scale), group, dim, part_out.data() + (c * q_heads + head0) * dim,
                   part_max.data() + c * q_heads + head0, part_total.data() + c * q_heads + head0, scores.data()});
      }
    }
  });

  // merge: out = sum_c out_c * total_c e^(max_c - M) / (e^(sink - M) + sum_c total_c e^(max_c - M))
  at::Tensor out = at::empty_like(q);
  float* op = out.data_ptr<float>();
  const float* sp = sinks.data_ptr<float>();
  at::parallel_for(0, rows * q_heads, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t r = item / q_heads, head = item % q_heads;
      float* o = op + item * dim;
      float top = sp[head];
      for (int64_t c = first_chunk[r]; c < first_chunk[r + 1]; ++c) top = std::max(top, part_max[c * q_heads + head]);
      float total = std::exp(sp[head] - top);
      std::fill(o, o + dim, 0.f);
      for (int64_t c = first_chunk[r]; c < first_chunk[r + 1]; ++c) {
        const float w = part_total[c * q_heads + head] * std::exp(part_max[c * q_heads + head] - top);
        total += w;
        const float* oc = part_out.data() + (c * q_heads + head) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] += w * oc[d];
      }
      for (int64_t d = 0; d < dim; ++d) o[d] /= total;
    }
  });
  return out;
}

std::string isa() { return kernels().name; }

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const Kernels* k : supported()) out.push_back(k->name);
  return out;
}

void set_isa(const std::string& name) {
  g_kernels = choose(name);
  g_prefetch = g_kernels->prefetch;
}

// The many-rows path's sgemm now: "own" (this instruction set's gemm_nt) or "mkl".
std::string sgemm() { return own_gemm(kernels()) ? "own" : "mkl"; }

void set_sgemm(const std::string& name) {
  TORCH_CHECK(name == "own" || name == "mkl" || name == "auto", "sgemm '", name, "': expected own, mkl or auto");
  TORCH_CHECK(name != "own" || kernels().gemm_nt, "sgemm 'own': the ", kernels().name,
              " path has none (only the AVX-512 and AVX2 paths have their own)");
  g_sgemm = name;
}

std::vector<int64_t> prefetch() {
  kernels();
  return {g_prefetch.mxfp4, g_prefetch.bf16};
}

std::vector<std::string> prefetched() {
  const Kernels& ks = kernels();
  std::vector<std::string> out;
  if (ks.prefetches_mxfp4) out.push_back("mxfp4");
  if (ks.prefetches_bf16) out.push_back("bf16");
  return out;
}

void set_prefetch(int64_t mxfp4, int64_t bf16) {
  TORCH_CHECK(mxfp4 >= 0 && bf16 >= 0 && mxfp4 <= (1 << 20) && bf16 <= (1 << 20),
              "prefetch distances must lie in [0, 1 MiB], got ", mxfp4, " and ", bf16);
  kernels();
  g_prefetch = {mxfp4, bf16};
}

// The gptoss:: ops' CPU kernels, registered with the dispatcher directly: a call from Python then costs 3-6 us on
// tiny shapes (the bare pybind call 1.5-3.4 us), where it cost ~12 us through the Python implementation that loads
// this library (~17 calls a decode step). Registered on request, not at load, so that a second build of these
// sources in the same process (kernel_ab's base revision) does not take the ops over. The library object lives as
// long as the process.
void register_cpu_impls() {
  static torch::Library* native = nullptr;
  if (native != nullptr) return;
  native = new torch::Library(torch::Library::IMPL, "gptoss", c10::DispatchKey::CPU, __FILE__, __LINE__);
  native->impl("mxfp4_grouped_mm", TORCH_FN(mxfp4_grouped_mm));
  native->impl("bf16_grouped_mm", TORCH_FN(bf16_grouped_mm));
  native->impl("bf16_linear", TORCH_FN(bf16_linear));
  native->impl("mxfp4_moe", TORCH_FN(mxfp4_moe));
  native->impl("mxfp4_moe_routed", TORCH_FN(mxfp4_moe_routed));
  native->impl("decode_attention", TORCH_FN(decode_attention));
  native->impl("prefill_attention", TORCH_FN(gptoss::prefill_attention));
  native->impl("rms_norm", TORCH_FN(gptoss::rms_norm));
  native->impl("add_rms_norm", TORCH_FN(gptoss::add_rms_norm));
  native->impl("rope", TORCH_FN(gptoss::rope));
  native->impl("cache_write", TORCH_FN(gptoss::cache_write));
}

}  // namespace

namespace gptoss {

const char* active_isa() { return kernels().name; }

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& sinks, const at::Tensor& k_pos, const at::Tensor& q_pos) {
  for (const auto* t : {&q, &k_cache, &v_cache, &sinks, &k_pos, &q_pos}) check_cpu(*t, "attention inputs");
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && q.scalar_type() == at::kFloat &&
                  k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "q [B, T, Hq, D] and caches [B, S, Hkv, D] must be float32, got ", q.sizes(), " and ", k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "key and value caches must be contiguous and of one shape, got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t batch = q.size(0), steps = q.size(1), q_heads = q.size(2), dim = q.size(3);
  const int64_t slots = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == batch && k_cache.size(3) == dim && kv_heads > 0 && q_heads % kv_heads == 0,
              "q ", q.sizes(), " does not match the caches ", k_cache.sizes());
  TORCH_CHECK(k_pos.dim() == 2 && k_pos.size(0) == batch && k_pos.size(1) <= slots, "k_pos must be [", batch,
              ", n <= ", slots, "], got ", k_pos.sizes());
  TORCH_CHECK(q_pos.sizes() == at::IntArrayRef({batch, steps}) && sinks.numel() == q_heads,
              "q_pos must be [", batch, ", ", steps, "] and sinks [", q_heads, "], got ", q_pos.sizes(), " and ",
              sinks.sizes());
}

}  // namespace gptoss

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mxfp4_grouped_mm", &mxfp4_grouped_mm, "grouped x @ W^T with MXFP4 W [E, M, K/32, 16] (+ bias [E, M])");
  m.def("bf16_grouped_mm", &bf16_grouped_mm, "grouped x @ W^T with bfloat16 W [E, M, K] (+ bias [E, M])");
  m.def("mxfp4_moe", &mxfp4_moe, "the routed experts of one MoE layer (MXFP4 gate_up and down) in one call");
  m.def("mxfp4_moe_routed", &mxfp4_moe_routed, "mxfp4_moe with its router (bf16 linear, top k, softmax) in the call");
  m.def("bf16_linear", &bf16_linear, "x @ W^T + bias with bfloat16 W [M, K], fp32 x");
  m.def("decode_attention", &decode_attention, "attention of single-token steps over the KV cache (sinks, window)");
  m.def("prefill_attention", &gptoss::prefill_attention, "attention of several-token chunks over the KV cache (sinks, "
        "window)");
  m.def("rms_norm", &gptoss::rms_norm, "RMSNorm of each row (float32)");
  m.def("add_rms_norm", &gptoss::add_rms_norm, "(RMSNorm(x + residual), x + residual) (float32)");
  m.def("rope", &gptoss::rope, "half-split rotary embedding of x [B, T, H, D] by cos/sin [B, T, D/2]");
  m.def("cache_write", &gptoss::cache_write, "in place: cache[b, (start[b] + t) mod S] = values[b, t]");
  m.def("isa", &isa, "the instruction set the kernels use now");
  m.def("fma_rates", &gptoss::fma_rates, "fp32 multiply-adds per ns on one core at each vector width this CPU runs");
  m.def("available_isas", &available_isas, "instruction sets this CPU runs, best first");
  m.def("set_isa", &set_isa, "use this instruction set from now on (one of available_isas(), or 'best'); resets the "
        "prefetch distances to its starting values");
  m.def("sgemm", &sgemm, "the many-rows path's fp32 product now: own (this instruction set's) or mkl");
  m.def("set_sgemm", &set_sgemm, "own, mkl or auto (own where the CPU is not Intel's and the instruction set has one)");
  m.def("prefetch", &prefetch, "the gemv prefetch distances in bytes now: [mxfp4, bf16]");
  m.def("prefetched", &prefetched, "the kernels whose loops read a prefetch distance on this instruction set");
  m.def("set_prefetch", &set_prefetch, "set the gemv prefetch distances in bytes (mxfp4, bf16)");
  m.def("register_cpu_impls", &register_cpu_impls, "make these kernels the gptoss:: ops' CPU implementations");
}
