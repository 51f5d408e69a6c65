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
// Instruction sets: each kernel exists for AVX-512 (F+BW+VL), AVX2+FMA and portable C++, compiled into this one
// file with per-function target attributes and chosen at run time from what the CPU supports; "amx" is AVX-512
// with the many-rows path on AMX tiles. GPTOSS_CPU_ISA (avx512 | avx2 | scalar) or set_isa() forces a lower path.

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
// out[r * ldo + i] = x[r] . t[i] for r < n, i < mt: the activations packed by pack_rows (k-major, rows padded to
// kPackRows), t mt rows of k fp32 followed by zero rows up to a multiple of kGemmCols; acc: scratch of
// round_up(mt, kGemmCols) * padded_rows(n) floats.
using GemmNt = void (*)(const float* xt, int64_t n, const float* t, int64_t mt, int64_t k, float* out, int64_t ldo,
                        float* acc);
constexpr int64_t kPackRows = 16;  // activation rows per vector of the own sgemm
constexpr int64_t kGemmCols = 8;   // weight rows (output columns) per block of the own sgemm
inline int64_t padded_rows(int64_t n) { return (n + kPackRows - 1) / kPackRows * kPackRows; }

// x [n, k] (rows ldx apart) -> dst [k, padded_rows(n)]: each step of k holds the n rows' values, then zeros.
inline void pack_rows(const float* x, int64_t ldx, int64_t n, int64_t k, float* dst) {
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
};

// ---- portable ----
namespace scalar {

void mxfp4_decode(const Mxfp4& w, int64_t m0, int64_t m1, float* dst) {
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* b = w.blocks + m * w.groups * kBlockBytes;
    const uint8_t* s = w.scales + m * w.groups;
    for (int64_t g = 0; g < w.groups; ++g) {
      const float scale = kHalfScale.v[s[g]];
      for (int j = 0; j < kBlockBytes; ++j) {
        const uint8_t byte = b[g * kBlockBytes + j];
        dst[g * kBlock + 2 * j] = kTwiceFp4[byte & 0x0F] * scale;
        dst[g * kBlock + 2 * j + 1] = kTwiceFp4[byte >> 4] * scale;
      }
    }
    dst += w.groups * kBlock;
  }
}

void mxfp4_dot(const Mxfp4& w, int64_t m0, int64_t m1, const float* x, int64_t ldx, int64_t n, float* out,
               int64_t ldo) {
  std::vector<float> row(w.groups * kBlock);
  for (int64_t m = m0; m < m1; ++m) {
    mxfp4_decode(w, m, m + 1, row.data());
    for (int64_t r = 0; r < n; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < w.groups * kBlock; ++k) acc += x[r * ldx + k] * row[k];
      out[r * ldo + m] = acc;
    }
  }
}

void bf16_decode(const Bf16& w, int64_t m0, int64_t m1, float* dst) {
  for (int64_t i = m0 * w.k; i < m1 * w.k; ++i) *dst++ = bf16_to_float(w.w[i]);
}

void bf16_dot(const Bf16& w, int64_t m0, int64_t m1, const float* x, int64_t ldx, int64_t n, float* out,
              int64_t ldo) {
  for (int64_t m = m0; m < m1; ++m) {
    const uint16_t* row = w.w + m * w.k;
    for (int64_t r = 0; r < n; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < w.k; ++k) acc += x[r * ldx + k] * bf16_to_float(row[k]);
      out[r * ldo + m] = acc;
    }
  }
}

void attend(const Attend& a) { attend_body(a); }

void swiglu(const float* g, int64_t n, float alpha, float limit, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const float gate = std::min(g[2 * j], limit);
    const float up = std::min(std::max(g[2 * j + 1], -limit), limit);
    out[j] = (up + 1.f) * (gate / (1.f + std::exp(-gate * alpha)));
  }
}

}  // namespace scalar

#ifdef GPTOSS_X86
// ---- AVX2 + FMA ----
#define GPTOSS_AVX2 __attribute__((target("avx2,fma")))
namespace avx2 {

GPTOSS_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 bytes -> the block's 32 values (times 2, as integers in fp32), in order: a 16-entry table lookup per nibble.
GPTOSS_AVX2 inline void decode_block(const uint8_t* b, __m256 w[4]) {
  const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kTwiceFp4));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(bytes, nibble));
  const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
  const __m128i first = _mm_unpacklo_epi8(lo, hi);  // values 0..15 (low nibble = even index)
  const __m128i second = _mm_unpackhi_epi8(lo, hi);  // values 16..31
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(first));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(first, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(second));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(second, 8)));
}

// Two blocks (32 bytes, 64 values) -> eight vectors of the values times 2 as fp32, built from bf16 bit patterns
// (kTwiceFp4Bf16*): a word becomes fp32 by sitting in the top half of a 32-bit lane (shift or mask). The values come
// out in kPairOrder's order, so the activations are read in that order (dot_layout).
GPTOSS_AVX2 inline void decode_pair(const uint8_t* b, __m256 w[8]) {
  const __m256i top = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kTwiceFp4Bf16Hi)));
  const __m256i second = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kTwiceFp4Bf16Lo)));
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  const __m256i codes[2] = {_mm256_and_si256(bytes, nibble), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble)};
  for (int h = 0; h < 2; ++h) {
    const __m256i hi = _mm256_shuffle_epi8(top, codes[h]), lo = _mm256_shuffle_epi8(second, codes[h]);
    const __m256i first8 = _mm256_unpacklo_epi8(lo, hi), last8 = _mm256_unpackhi_epi8(lo, hi);  // bf16 words
    w[4 * h + 0] = _mm256_castsi256_ps(_mm256_slli_epi32(first8, 16));
    w[4 * h + 1] = _mm256_castsi256_ps(_mm256_and_si256(first8, high_half));
    w[4 * h + 2] = _mm256_castsi256_ps(_mm256_slli_epi32(last8, 16));
    w[4 * h + 3] = _mm256_castsi256_ps(_mm256_and_si256(last8, high_half));
  }
}

// Which of the pair's 64 values lane i of vector v holds (v = 4 h + 2 c + s): h: low/high nibble; c: the first or
// last 8 bytes of each 128-bit half (unpacklo/hi); s: the low or high word of the lane; i < 4: bytes 0..15, else
// 16..31 (the second block).
struct PairOrder {
  int index[64];
  constexpr PairOrder() : index() {
    for (int v = 0; v < 8; ++v)
      for (int i = 0; i < 8; ++i) {
        const int h = v / 4, c = (v / 2) % 2, s = v % 2;
        const int byte = (i < 4 ? 0 : 16) + 8 * c + 2 * (i % 4) + s;
        index[v * 8 + i] = 2 * byte + h;
      }
  }
};
constexpr PairOrder kPairOrder;

// The activation order decode_pair's weights come in; a last odd block stays in natural order.
void mxfp4_dot_layout(const float* x, int64_t k, float* dst) {
  const int64_t pairs = k / (2 * kBlock);
  for (int64_t p = 0; p < pairs; ++p, x += 2 * kBlock, dst += 2 * kBlock)
    for (int j = 0; j < 2 * kBlock; ++j) dst[j] = x[kPairOrder.index[j]];
  std::memcpy(dst, x, (k - pairs * 2 * kBlock) * sizeof(float));
}

// R activation rows (in dot_layout order) against one weight row: each pair of blocks is decoded once and
// shared by the R rows; the block scales multiply each row's partial sum, not the weights. Every row takes the
// same operations in the same order whatever R is (two product chains a pair of blocks), so a row's result does
// not depend on the other rows of its batch.
template <int R>
GPTOSS_AVX2 __attribute__((always_inline)) inline void mxfp4_rows(const uint8_t* b, const uint8_t* s,
                                                                  int64_t groups, const float* x, int64_t ldx,
                                                                  float* out, int64_t ldo) {
  constexpr int P = 2;  // independent product chains per row
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(b + g * kBlockBytes) + g_prefetch.mxfp4, _MM_HINT_T0);
    __m256 w[8];
    decode_pair(b + g * kBlockBytes, w);
    const __m256 scale = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(kHalfScale.v[s[g]])),
                                              _mm_set1_ps(kHalfScale.v[s[g + 1]]), 1);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + g * kBlock;
      __m256 p[P];
      for (int j = 0; j < P; ++j) p[j] = _mm256_mul_ps(w[j], _mm256_loadu_ps(xr + 8 * j));
      for (int j = P; j < 8; ++j) p[j % P] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xr + 8 * j), p[j % P]);
      acc[r] = _mm256_fmadd_ps(_mm256_add_ps(p[0], p[1]), scale, acc[r]);
    }
  }
  if (g < groups) {  // an odd last block, natural order
    __m256 w[4];
    decode_block(b + g * kBlockBytes, w);
    const __m256 scale = _mm256_set1_ps(kHalfScale.v[s[g]]);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + g * kBlock;
      __m256 p = _mm256_mul_ps(w[0], _mm256_loadu_ps(xr));
      __m256 q = _mm256_mul_ps(w[1], _mm256_loadu_ps(xr + 8));
      p = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr + 16), p);
      q = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr + 24), q);
      acc[r] = _mm256_fmadd_ps(_mm256_add_ps(p, q), scale, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]);
}

GPTOSS_AVX2 void mxfp4_dot(const Mxfp4& w, int64_t m0, int64_t m1, const float* x, int64_t ldx, int64_t n,
                           float* out, int64_t ldo) {
  for (int64_t mb = m0; mb < m1; mb += kDotRowBlock) {
    const int64_t mb_end = std::min(m1, mb + kDotRowBlock);
    for (int64_t r = 0; r < n; r += 4) {
      const float* xr = x + r * ldx;
      const int64_t rows = std::min<int64_t>(4, n - r);
      for (int64_t m = mb; m < mb_end; ++m) {
        const uint8_t* b = w.blocks + m * w.groups * kBlockBytes;
        const uint8_t* s = w.scales + m * w.groups;
        float* o = out + r * ldo + m;
        switch (rows) {
          case 4: mxfp4_rows<4>(b, s, w.groups, xr, ldx, o, ldo); break;
          case 3: mxfp4_rows<3>(b, s, w.groups, xr, ldx, o, ldo); break;
          case 2: mxfp4_rows<2>(b, s, w.groups, xr, ldx, o, ldo); break;
          default: mxfp4_rows<1>(b, s, w.groups, xr, ldx, o, ldo); break;
        }
      }
    }
  }
}

GPTOSS_AVX2 void mxfp4_decode(const Mxfp4& w, int64_t m0, int64_t m1, float* dst) {
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* b = w.blocks + m * w.groups * kBlockBytes;
    const uint8_t* s = w.scales + m * w.groups;
    for (int64_t g = 0; g < w.groups; ++g, dst += kBlock) {
      __m256 v[4];
      decode_block(b + g * kBlockBytes, v);
      const __m256 scale = _mm256_set1_ps(kHalfScale.v[s[g]]);
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + 8 * i, _mm256_mul_ps(v[i], scale));
    }
  }
}

GPTOSS_AVX2 inline __m256 load_bf16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// bf16 weights widen by one unpack per 8 (unpacked_bf16_layout): of 16 weights (one ymm of bf16), the low vector
// holds 0-3 and 8-11, the high one 4-7 and 12-15.
constexpr int64_t kBf16Step = 16;

void bf16_dot_layout(const float* x, int64_t k, float* dst) { unpacked_bf16_layout<kBf16Step>(x, k, dst); }

// The horizontal sums of eight vectors as one vector (lane i: the sum of v[i]'s lanes); each lane is summed in the
// same order whichever slot it came in.
GPTOSS_AVX2 inline __m256 sum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// The arithmetic of one (weight row, activation row) pair, whichever path takes it: two accumulators, one over the
// low and one over the high words of each 16 weights (bf16_dot_layout order), in order of k, added at the end. Two
// chains, not one: a one-row gemv is one pair, and one chain of 2 K / 16 dependent FMAs allows ~8 bytes of weights
// per FMA latency, ~33 GB/s on two threads at 4.15 GHz (Zen 5 VM, AVX2: the bench step's bf16 linears took 0.98 ms
// against 0.665 on the AVX-512 path, whose chain is half as long). Splitting the row into halves side by side
// instead (two streams) measured 1.8-2.1x the time (inferred: these machines stream one forward run of addresses
// per thread far better than two). Every pair takes the same operations in the same order whatever else is in the
// call, so a row's result does not depend on the other rows of its batch.
//
// A tile of four weight rows (adjacent in memory: one stream) against R (1..3) activation rows: twelve pairs at
// R = 3, so twelve chains keep the FMA units busy, but 24 accumulators would not fit sixteen registers. So the tile
// runs in blocks of kBf16Block weights, each block twice, the low words then the high (the block is in L1 for its
// second pass), with the twelve accumulators of one pass in registers and the other pass's parked in memory. Two
// accumulators per pair in registers (tiles of two weight rows) measured 1.2x the time at 8 rows, 2880 wide.
// Pair (r, i) goes to sums[r * 4 + i].
constexpr int kBf16TileRows = 4;
constexpr int64_t kBf16Block = 256;

// One pass of a tile's block: the low (Part 0) or high (Part 1) words of weights [c0, c1) of each row into acc.
template <int R, int W, int Part>
GPTOSS_AVX2 __attribute__((always_inline)) inline void bf16_tile_pass(const uint16_t* const* rows, int64_t c0,
                                                                      int64_t c1, const float* x, int64_t ldx,
                                                                      const char* next_tile, __m256 (&acc)[R][W]) {
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t c = c0; c < c1; c += kBf16Step) {
    if (Part == 0) {  // the next tile, as one linear stream: two lines a step (the tile reads 128 bytes a step)
      _mm_prefetch(next_tile + W * 2 * c, _MM_HINT_T0);
      _mm_prefetch(next_tile + W * 2 * c + 64, _MM_HINT_T0);
    }
    for (int i = 0; i < W; ++i) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i] + c));
      const __m256 v = _mm256_castsi256_ps(Part ? _mm256_unpackhi_epi16(zero, w) : _mm256_unpacklo_epi16(zero, w));
      for (int r = 0; r < R; ++r)
        acc[r][i] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + r * ldx + c + 8 * Part), acc[r][i]);
    }
  }
}

template <int R>
GPTOSS_AVX2 __attribute__((always_inline)) inline void bf16_tile(const uint16_t* const* rows, int64_t k,
                                                                 const float* x, int64_t ldx, __m256* sums) {
  constexpr int W = kBf16TileRows;
  __m256 lo[R][W], hi[R][W];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < W; ++i) lo[r][i] = hi[r][i] = _mm256_setzero_ps();
  const char* next_tile = reinterpret_cast<const char*>(rows[0]) + W * 2 * k;
  const int64_t end = k - k % kBf16Step;
  for (int64_t block = 0; block < end; block += kBf16Block) {
    const int64_t block_end = std::min(end, block + kBf16Block);
    bf16_tile_pass<R, W, 0>(rows, block, block_end, x, ldx, next_tile, lo);
    bf16_tile_pass<R, W, 1>(rows, block, block_end, x, ldx, next_tile, hi);
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < W; ++i) sums[r * W + i] = _mm256_add_ps(lo[r][i], hi[r][i]);
}

// One weight row against one activation row, the tile's arithmetic (both chains in registers), into *sum.
GPTOSS_AVX2 inline void bf16_row(const uint16_t* row, int64_t k, const float* x, __m256* sum) {
  __m256 lo_acc = _mm256_setzero_ps(), hi_acc = _mm256_setzero_ps();
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t c = 0; c + kBf16Step <= k; c += kBf16Step) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
    lo_acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w)), _mm256_loadu_ps(x + c), lo_acc);
    hi_acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w)), _mm256_loadu_ps(x + c + 8), hi_acc);
  }
  *sum = _mm256_add_ps(lo_acc, hi_acc);
}

// (weight row, activation row) accumulators waiting to be reduced eight at a time (sum8) and stored, each output
// plus its last k % 16 products in natural order.
struct Bf16Sums {
  static constexpr int kSlots = 24;  // two tiles of three activation rows
  __m256 sums[kSlots];
  float* dst[kSlots];  // nullptr: a repeated weight row, not stored
  const uint16_t* wrow[kSlots];
  const float* xrow[kSlots];
  int slots = 0;

  void add(float* d, const uint16_t* w, const float* x) {
    dst[slots] = d, wrow[slots] = w, xrow[slots] = x, ++slots;
  }
  GPTOSS_AVX2 void flush(int64_t k) {
    const int used = (slots + 7) / 8 * 8;
    for (int j = slots; j < used; ++j) sums[j] = _mm256_setzero_ps();
    alignas(32) float total[kSlots];
    for (int j = 0; j < used; j += 8) _mm256_store_ps(total + j, sum8(sums + j));
    for (int j = 0; j < slots; ++j) {
      if (!dst[j]) continue;
      float sum = total[j];
      for (int64_t t = k - k % kBf16Step; t < k; ++t) sum += xrow[j][t] * bf16_to_float(wrow[j][t]);
      *dst[j] = sum;
    }
    slots = 0;
  }
};

// One activation row (memory-bound): weight rows one at a time, so the weights are one linear stream; the row's two
// chains (bf16_row) let it run at any K. Zen 5 VM, two threads, weights from memory, against one chain a row (and
// eight rows side by side past K = 1536): bench lm_head 0.88-1.05x the time (median 0.91), gpt-oss-20b's qkv
// (5120 x 2880) 0.85-0.88x; several rows side by side, each with two chains, measured 1.2-1.9x (each row is its own
// stream). More activation rows take tiles of four weight rows by up to three activation rows (bf16_tile), 0.90-0.99x
// the time of the one-chain tiles at 8 rows x 768 but 1.11-1.14x at 8 x 2880 and 1.06-1.09x at 3 x 2880 (the price
// of the second chain in a tile; not understood further without counters). A weight row past m1 repeats the last one
// and is not stored. Both give each (weight row, activation row) pair the same arithmetic, so a row's result does not
// depend on its batch.
GPTOSS_AVX2 void bf16_dot(const Bf16& w, int64_t m0, int64_t m1, const float* x, int64_t ldx, int64_t n, float* out,
                          int64_t ldo) {
  constexpr int W = kBf16TileRows;
  const int64_t k = w.k;
  Bf16Sums p;
  if (n == 1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (p.slots == Bf16Sums::kSlots) p.flush(k);
      const uint16_t* row = w.w + m * k;
      bf16_row(row, k, x, p.sums + p.slots);
      p.add(out + m, row, x);
    }
    if (p.slots) p.flush(k);
    return;
  }
  for (int64_t m = m0; m < m1; m += W) {
    const int64_t count = std::min<int64_t>(W, m1 - m);
    const uint16_t* rows[W];
    for (int64_t i = 0; i < W; ++i) rows[i] = w.w + (m + std::min(i, count - 1)) * k;
    for (int64_t r = 0; r < n; r += 3) {
      const int64_t R = std::min<int64_t>(3, n - r);
      if (p.slots + R * W > Bf16Sums::kSlots) p.flush(k);
      const float* xr = x + r * ldx;
      __m256* sums = p.sums + p.slots;
      switch (R) {
        case 3: bf16_tile<3>(rows, k, xr, ldx, sums); break;
        case 2: bf16_tile<2>(rows, k, xr, ldx, sums); break;
        default: bf16_tile<1>(rows, k, xr, ldx, sums); break;
      }
      for (int j = 0; j < R; ++j)
        for (int i = 0; i < W; ++i) p.add(i < count ? out + (r + j) * ldo + m + i : nullptr, rows[i], xr + j * ldx);
    }
  }
  if (p.slots) p.flush(k);
}

GPTOSS_AVX2 void bf16_decode(const Bf16& w, int64_t m0, int64_t m1, float* dst) {
  const uint16_t* src = w.w + m0 * w.k;
  const int64_t total = (m1 - m0) * w.k;
  int64_t i = 0;
  for (; i + 8 <= total; i += 8) _mm256_storeu_ps(dst + i, load_bf16(src + i));
  for (; i < total; ++i) dst[i] = bf16_to_float(src[i]);
}

GPTOSS_AVX2 inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// e^x, within 1 ulp of the correctly rounded value for every float in [-87.3, 88] (checked exhaustively against
// exp in double precision): 2^n e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts), e^r by Cephes'
// expf polynomial. x is clamped to that range: below -87.3 (e^x < 2^-126, where fp32 turns subnormal) it returns
// e^-87.3, nothing next to a softmax maximum's term of 1 or to the 1 of a sigmoid's denominator; above 88, e^88.
GPTOSS_AVX2 inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// Each head's scores (a.scores, [group, count]) -> e^(s - max) / total in place, with a.maxima and a.totals.
GPTOSS_AVX2 inline void attend_softmax(const Attend& a) {
  const int64_t n = a.count;
  for (int64_t g = 0; g < a.group; ++g) {
    float* sg = a.scores + g * n;
    const int64_t whole = n - n % 8;
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < whole; i += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(sg + i));
    float top = hmax(top8);
    for (int64_t i = whole; i < n; ++i) top = std::max(top, sg[i]);
    const __m256 top_v = _mm256_set1_ps(top);
    __m256 total8 = _mm256_setzero_ps();
    for (int64_t i = 0; i < whole; i += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sg + i), top_v));
      _mm256_storeu_ps(sg + i, e);
      total8 = _mm256_add_ps(total8, e);
    }
    float total = hsum(total8);
    for (int64_t i = whole; i < n; ++i) total += (sg[i] = std::exp(sg[i] - top));
    const __m256 total_v = _mm256_set1_ps(total);
    for (int64_t i = 0; i < whole; i += 8) _mm256_storeu_ps(sg + i, _mm256_div_ps(_mm256_loadu_ps(sg + i), total_v));
    for (int64_t i = whole; i < n; ++i) sg[i] /= total;
    a.maxima[g] = top, a.totals[g] = total;
  }
}

// attend_body with the loops written out for head sizes that are a multiple of 8. Scores: each key row against
// eight heads at once, eight accumulators reduced together (sum8); one head at a time with its own reduction ran
// ~330 cycles a slot for eight heads (one kv head, 4k slots, one thread). Values: eight heads' accumulators for one
// vector of the head over the chunk's slots (decode_attention's chunks keep their value rows in L1/L2 for the
// head's other vectors).
GPTOSS_AVX2 void attend(const Attend& a) {
  const int64_t n = a.count, dim = a.dim;
  if (dim % 8 != 0) return attend_body(a);
  const __m256 scale = _mm256_set1_ps(a.scale);
  for (int64_t i = 0; i < std::min(kAttendAhead, n); ++i) prefetch_slot(a, i);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAttendAhead < n) prefetch_slot(a, i + kAttendAhead);
    const float* kr = a.k + a.slots[i] * a.slot_stride;
    int64_t g = 0;
    for (; g + 8 <= a.group; g += 8) {
      __m256 acc[8];
      for (int h = 0; h < 8; ++h) acc[h] = _mm256_setzero_ps();
      for (int64_t d = 0; d < dim; d += 8) {
        const __m256 kc = _mm256_loadu_ps(kr + d);
        for (int h = 0; h < 8; ++h) acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(a.q + (g + h) * dim + d), kc, acc[h]);
      }
      alignas(32) float dots[8];
      _mm256_store_ps(dots, _mm256_mul_ps(sum8(acc), scale));
      for (int h = 0; h < 8; ++h) a.scores[(g + h) * n + i] = dots[h];
    }
    for (; g < a.group; ++g) {  // heads beyond a multiple of eight
      const float* qg = a.q + g * dim;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < dim; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(kr + d), acc);
      a.scores[g * n + i] = hsum(acc) * a.scale;
    }
  }
  attend_softmax(a);
  int64_t g = 0;
  for (; g + 8 <= a.group; g += 8) {  // eight heads by eight values: each value vector feeds eight FMAs
    const float* p = a.scores + g * n;
    for (int64_t d = 0; d < dim; d += 8) {
      __m256 acc[8];
      for (int h = 0; h < 8; ++h) acc[h] = _mm256_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        const __m256 vc = _mm256_loadu_ps(a.v + a.slots[i] * a.slot_stride + d);
        for (int h = 0; h < 8; ++h) acc[h] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + h * n + i), vc, acc[h]);
      }
      for (int h = 0; h < 8; ++h) _mm256_storeu_ps(a.out + (g + h) * dim + d, acc[h]);
    }
  }
  for (; g < a.group; ++g) {  // heads beyond a multiple of eight
    const float* pg = a.scores + g * n;
    for (int64_t d = 0; d < dim; d += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < n; ++i)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(pg[i]), _mm256_loadu_ps(a.v + a.slots[i] * a.slot_stride + d), acc);
      _mm256_storeu_ps(a.out + g * dim + d, acc);
    }
  }
}

// lanes 0 1 4 5 2 3 6 7 -> 0 .. 7 (what _mm256_shuffle_ps of two registers leaves, per 128-bit half)
GPTOSS_AVX2 inline __m256 split(__m256 v) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8));
}

// Eight pairs at a time: the even (gate) and odd (up) lanes of two loads are split by one shuffle each and a lane
// permute; the tail takes the scalar formula. The result for a column does not depend on the others.
GPTOSS_AVX2 void swiglu(const float* g, int64_t n, float alpha, float limit, float* out) {
  const __m256 lim = _mm256_set1_ps(limit), neg_lim = _mm256_set1_ps(-limit), one = _mm256_set1_ps(1.f);
  const __m256 neg_alpha = _mm256_set1_ps(-alpha);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 a = _mm256_loadu_ps(g + 2 * j), b = _mm256_loadu_ps(g + 2 * j + 8);
    const __m256 gate = _mm256_min_ps(split(_mm256_shuffle_ps(a, b, 0x88)), lim);
    const __m256 up = _mm256_min_ps(_mm256_max_ps(split(_mm256_shuffle_ps(a, b, 0xDD)), neg_lim), lim);
    const __m256 e = exp_ps(_mm256_mul_ps(gate, neg_alpha));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_add_ps(up, one), _mm256_div_ps(gate, _mm256_add_ps(one, e))));
  }
  scalar::swiglu(g + 2 * j, n - j, alpha, limit, out + j);
}

}  // namespace avx2

// ---- AVX-512 (F, BW, VL) ----
#define GPTOSS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
namespace avx512 {

// 16 bytes -> the block's 32 values (times 2) in two zmm registers, in order.
GPTOSS_AVX512 inline void decode_block(const uint8_t* b, __m512 w[2]) {
  const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kTwiceFp4));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(bytes, nibble));
  const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
  w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpacklo_epi8(lo, hi)));
  w[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpackhi_epi8(lo, hi)));
}

// Four blocks (64 bytes, 128 codes) -> eight zmm of the values times 2 as fp32. vpermps looks a 16-entry fp32 table
// up with only the low 4 bits of each 32-bit lane, so after a right shift by 4 j lane i yields the code in its bits
// 4 j .. 4 j + 3: value 8 i + j of the quad (byte 4 i + j / 2, low nibble for even j). One shift and one lookup per
// 16 values, and no int -> float conversion: the table holds the floats.
GPTOSS_AVX512 inline void decode_quad(const uint8_t* b, __m512 table, __m512 w[8]) {
  const __m512i codes = _mm512_loadu_si512(b);
  w[0] = _mm512_permutexvar_ps(codes, table);
  for (int j = 1; j < 8; ++j) w[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4 * j), table);
}

// The activation order decode_quad's weights come in (vector j, lane i holds value 8 i + j); the last
// (groups mod 4) blocks stay in natural order.
void mxfp4_dot_layout(const float* x, int64_t k, float* dst) {
  const int64_t quads = k / (4 * kBlock);
  for (int64_t q = 0; q < quads; ++q, x += 4 * kBlock, dst += 4 * kBlock)
    for (int j = 0; j < 8; ++j)
      for (int i = 0; i < 16; ++i) dst[16 * j + i] = x[8 * i + j];
  std::memcpy(dst, x, (k - quads * 4 * kBlock) * sizeof(float));
}

// Up to 16 scale bytes -> their fp32 factors 2^(s - 128) (halved: the table holds twice the values), built in the
// exponent field; s = 0 and 1 give 2^-128 and 2^-127, subnormals the exponent field cannot hold: their bits are
// set directly (mantissa bit 21 + s).
GPTOSS_AVX512 inline __m512 half_scales(const uint8_t* s, int64_t count) {
  const __m128i bytes = count == 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s))
                                     : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << count) - 1), s);
  const __m512i e = _mm512_cvtepu8_epi32(bytes);
  const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
  const __m512i subnormal = _mm512_sllv_epi32(_mm512_set1_epi32(1 << 21), e);
  return _mm512_castsi512_ps(
      _mm512_mask_mov_epi32(normal, _mm512_cmplt_epu32_mask(e, _mm512_set1_epi32(2)), subnormal));
}

constexpr int64_t kSumRows = 16;  // weight rows whose sums are reduced together

// decode_quad's values times 2 as fp32, indexed by code (made once per call, not per row)
GPTOSS_AVX512 inline __m512 fp4_table() {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kTwiceFp4))));
}

// One quad of blocks of one weight row against R activation rows, into acc[R]: one chain of eight products per
// row (no pairwise add); quads are independent, so the out-of-order core overlaps their chains.
template <int R>
GPTOSS_AVX512 __attribute__((always_inline)) inline void mxfp4_quad(const uint8_t* b, int64_t q, const float* x,
                                                                    int64_t ldx, __m512 table, __m512 scale,
                                                                    __m512* acc) {
  _mm_prefetch(reinterpret_cast<const char*>(b + q * kBlockBytes) + g_prefetch.mxfp4, _MM_HINT_T0);
  __m512 w[8];
  decode_quad(b + q * kBlockBytes, table, w);
  for (int r = 0; r < R; ++r) {
    const float* xr = x + r * ldx + q * kBlock;
    __m512 p = _mm512_mul_ps(w[0], _mm512_loadu_ps(xr));
    for (int j = 1; j < 8; ++j) p = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(xr + 16 * j), p);
    acc[r] = _mm512_fmadd_ps(p, scale, acc[r]);
  }
}

// R activation rows (in dot_layout order) against one weight row: each quad of blocks is decoded once and shared
// by the R rows; the block scales (lane i of a quad's vectors belongs to its block i / 4) multiply each row's
// partial sums, not the weights. Scales are converted 16 blocks at a time and spread to a quad's lanes with a
// constant index per quad position. The R accumulators go to sums[r * kSumRows]
// unreduced (mxfp4_dot reduces sixteen weight rows' together).
template <int R>
GPTOSS_AVX512 __attribute__((always_inline)) inline void mxfp4_rows(const uint8_t* b, const uint8_t* s,
                                                                    int64_t groups, const float* x, int64_t ldx,
                                                                    __m512 table, __m512* sums) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i first = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i lanes[4] = {first, _mm512_add_epi32(first, _mm512_set1_epi32(4)),
                            _mm512_add_epi32(first, _mm512_set1_epi32(8)),
                            _mm512_add_epi32(first, _mm512_set1_epi32(12))};  // quad j of a chunk: blocks 4j..4j+3
  const int64_t quad_end = groups - groups % 4;  // blocks in whole quads
  for (int64_t chunk = 0; chunk < quad_end; chunk += 16) {
    const int64_t chunk_end = std::min(quad_end, chunk + 16);
    const __m512 scales16 = half_scales(s + chunk, chunk_end - chunk);
#pragma GCC unroll 4  // so that lanes[j] is a register, not a load
    for (int j = 0; chunk + 4 * j < chunk_end; ++j)
      mxfp4_quad<R>(b, chunk + 4 * j, x, ldx, table, _mm512_permutexvar_ps(lanes[j], scales16), acc);
  }
  for (int64_t g = quad_end; g < groups; ++g) {  // the last blocks, natural order
    __m512 w[2];
    decode_block(b + g * kBlockBytes, w);
    const __m512 scale = _mm512_set1_ps(kHalfScale.v[s[g]]);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + g * kBlock;
      const __m512 p = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr + 16), _mm512_mul_ps(w[0], _mm512_loadu_ps(xr)));
      acc[r] = _mm512_fmadd_ps(p, scale, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) sums[r * kSumRows] = acc[r];
}

// The horizontal sums of sixteen vectors as one vector (lane i: the sum of v[i]'s lanes): a tree of 256-bit,
// 128-bit and 32-bit shuffles, ~3 instructions a vector instead of the ~8 of reducing each alone.
GPTOSS_AVX512 inline __m512 sum16(const __m512* v) {
  // The tree leaves its lanes in the order 0-3, 8-11, 4-7, 12-15; feeding it v[kIn[i]] puts lane i right.
  constexpr int kIn[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {
    const __m512 lo = v[kIn[i]], hi = v[kIn[i + 8]];
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, 0x44), _mm512_shuffle_f32x4(lo, hi, 0xEE));
  }
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[i], b[i + 2]), _mm512_unpackhi_ps(b[i], b[i + 2]));
  return _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
}

// Weight rows go sixteen at a time so that their sums are reduced together (sum16) and stored as one vector.
GPTOSS_AVX512 void mxfp4_dot(const Mxfp4& w, int64_t m0, int64_t m1, const float* x, int64_t ldx, int64_t n,
                             float* out, int64_t ldo) {
  __m512 sums[4 * kSumRows];  // [activation row of the four][weight row of the sixteen]
  const __m512 table = fp4_table();
  for (int64_t m = m0; m < m1; m += kSumRows) {
    const int64_t rows = std::min(kSumRows, m1 - m);
    const __mmask16 store = static_cast<__mmask16>((1u << rows) - 1);
    for (int64_t r = 0; r < n; r += 4) {
      const float* xr = x + r * ldx;
      const int R = static_cast<int>(std::min<int64_t>(4, n - r));
      for (int64_t i = 0; i < kSumRows; ++i) {
        if (i >= rows) {
          for (int j = 0; j < R; ++j) sums[j * kSumRows + i] = _mm512_setzero_ps();
          continue;
        }
        const uint8_t* b = w.blocks + (m + i) * w.groups * kBlockBytes;
        const uint8_t* s = w.scales + (m + i) * w.groups;
        switch (R) {
          case 4: mxfp4_rows<4>(b, s, w.groups, xr, ldx, table, sums + i); break;
          case 3: mxfp4_rows<3>(b, s, w.groups, xr, ldx, table, sums + i); break;
          case 2: mxfp4_rows<2>(b, s, w.groups, xr, ldx, table, sums + i); break;
          default: mxfp4_rows<1>(b, s, w.groups, xr, ldx, table, sums + i); break;
        }
      }
      for (int j = 0; j < R; ++j)
        _mm512_mask_storeu_ps(out + (r + j) * ldo + m, store, sum16(sums + j * kSumRows));
    }
  }
}

GPTOSS_AVX512 void mxfp4_decode(const Mxfp4& w, int64_t m0, int64_t m1, float* dst) {
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* b = w.blocks + m * w.groups * kBlockBytes;
    const uint8_t* s = w.scales + m * w.groups;
    for (int64_t g = 0; g < w.groups; ++g, dst += kBlock) {
      __m512 v[2];
      decode_block(b + g * kBlockBytes, v);
      const __m512 scale = _mm512_set1_ps(kHalfScale.v[s[g]]);
      _mm512_storeu_ps(dst, _mm512_mul_ps(v[0], scale));
      _mm512_storeu_ps(dst + 16, _mm512_mul_ps(v[1], scale));
    }
  }
}

GPTOSS_AVX512 inline __m512 load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// bf16 weights widen by one unpack per 16 (unpacked_bf16_layout): of 32 weights (one zmm of bf16), the low vector
// holds 0-3, 8-11, 16-19, 24-27 and the high one the others.
constexpr int64_t kBf16Step = 32;

void bf16_dot_layout(const float* x, int64_t k, float* dst) { unpacked_bf16_layout<kBf16Step>(x, k, dst); }

// A tile of W (1, 2 or 4) weight rows against R (1..4) activation rows (in bf16_dot_layout order): each weight vector
// is widened once and used by the R rows, each activation vector loaded once and used by the W weight rows; one
// accumulator per (weight row, activation row). Every pair takes the same operations in the same order whatever
// R and W are, so a row's result does not depend on the other rows of its batch. Accumulator (r, i) goes to
// sums[r * lds + i].
template <int R, int W>
GPTOSS_AVX512 __attribute__((always_inline)) inline void bf16_tile(const uint16_t* const* rows, int64_t k,
                                                                   const float* x, int64_t ldx, __m512* sums,
                                                                   int64_t lds) {
  __m512 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < W; ++i) acc[r][i] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  int64_t c = 0;
  for (; c + kBf16Step <= k; c += kBf16Step) {
    // A tile's rows are adjacent in memory (the last tile's may repeat one): the bytes ahead of it are asked for
    // as one linear stream, W lines a step, a tile's worth over its k loop. One weight row streams at the tuned
    // distance; a tile of several rows (compute-bound: a microsecond or less at these widths) asks for the next.
    const int64_t distance = W == 1 ? g_prefetch.bf16 : W * 2 * k;
    const char* ahead = reinterpret_cast<const char*>(rows[0]) + distance + W * 2 * c;
    for (int i = 0; i < W; ++i) _mm_prefetch(ahead + 64 * i, _MM_HINT_T0);
    __m512 lo[W], hi[W];
    for (int i = 0; i < W; ++i) {
      const __m512i w = _mm512_loadu_si512(rows[i] + c);
      lo[i] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, w));
      hi[i] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, w));
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xl = _mm512_loadu_ps(x + r * ldx + c), xh = _mm512_loadu_ps(x + r * ldx + c + 16);
      for (int i = 0; i < W; ++i) acc[r][i] = _mm512_fmadd_ps(hi[i], xh, _mm512_fmadd_ps(lo[i], xl, acc[r][i]));
    }
  }
  if (c < k) {  // the last k % 32 weights, natural order, masked (zeros add nothing)
    const int64_t tail = k - c;
    const __mmask16 m0 = static_cast<__mmask16>(tail >= 16 ? 0xFFFF : (1u << tail) - 1);
    const __mmask16 m1 = static_cast<__mmask16>(tail > 16 ? (1u << (tail - 16)) - 1 : 0);
    __m512 lo[W], hi[W];
    for (int i = 0; i < W; ++i) {
      lo[i] = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m0, rows[i] + c)), 16));
      hi[i] = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m1, rows[i] + c + 16)), 16));
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xl = _mm512_maskz_loadu_ps(m0, x + r * ldx + c);
      const __m512 xh = _mm512_maskz_loadu_ps(m1, x + r * ldx + c + 16);
      for (int i = 0; i < W; ++i) acc[r][i] = _mm512_fmadd_ps(hi[i], xh, _mm512_fmadd_ps(lo[i], xl, acc[r][i]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < W; ++i) sums[r * lds + i] = acc[r][i];
}

// Up to three activation rows (memory-bound: 2 FMAs per 32 weights each): weight rows one at a time, in
// memory order, so the weights stream linearly; sixteen weight rows' accumulators are reduced together (sum16).
template <int R>
GPTOSS_AVX512 void bf16_stream(const Bf16& w, int64_t m0, int64_t m1, const float* x, int64_t ldx, float* out,
                               int64_t ldo) {
  __m512 sums[4 * kSumRows];  // [activation row][weight row of the sixteen]
  for (int64_t m = m0; m < m1; m += kSumRows) {
    const int64_t count = std::min(kSumRows, m1 - m);
    for (int64_t i = 0; i < kSumRows; ++i) {
      if (i >= count) {
        for (int r = 0; r < R; ++r) sums[r * kSumRows + i] = _mm512_setzero_ps();
        continue;
      }
      const uint16_t* row = w.w + (m + i) * w.k;
      bf16_tile<R, 1>(&row, w.k, x, ldx, sums + i, kSumRows);
    }
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(out + r * ldo + m, static_cast<__mmask16>((1u << count) - 1), sum16(sums + r * kSumRows));
  }
}

// More rows (compute-bound): tiles of T (2 or 4) weight rows by four activation rows, so each weight vector loaded
// serves four FMAs and each activation vector T; the 4 T accumulators are reduced together (lane r * T + i: activation
// row r, weight row i). A row past m1 repeats the last one and is not stored.
template <int T>
GPTOSS_AVX512 void bf16_tiles(const Bf16& w, int64_t m0, int64_t m1, const float* x, int64_t ldx, int64_t n,
                              float* out, int64_t ldo) {
  __m512 sums[16];
  for (int64_t m = m0; m < m1; m += T) {
    const int64_t count = std::min<int64_t>(T, m1 - m);
    const uint16_t* rows[T];
    for (int64_t i = 0; i < T; ++i) rows[i] = w.w + (m + std::min(i, count - 1)) * w.k;
    for (int64_t r = 0; r < n; r += 4) {
      const int R = static_cast<int>(std::min<int64_t>(4, n - r));
      const float* xr = x + r * ldx;
      switch (R) {
        case 4: bf16_tile<4, T>(rows, w.k, xr, ldx, sums, T); break;
        case 3: bf16_tile<3, T>(rows, w.k, xr, ldx, sums, T); break;
        case 2: bf16_tile<2, T>(rows, w.k, xr, ldx, sums, T); break;
        default: bf16_tile<1, T>(rows, w.k, xr, ldx, sums, T); break;
      }
      for (int i = R * T; i < 16; ++i) sums[i] = _mm512_setzero_ps();
      alignas(64) float total[16];
      _mm512_store_ps(total, sum16(sums));
      for (int j = 0; j < R; ++j)
        for (int64_t i = 0; i < count; ++i) out[(r + j) * ldo + m + i] = total[j * T + i];
    }
  }
}

// Every path gives each (weight row, activation row) pair the same arithmetic, so which one a call takes does not
// change any result. Up to three rows stream; four take tiles of two weight rows, more tiles of four (Zen 4 VM,
// lm_head-size weights from memory, 2 threads: 8 rows 2.6-2.9 ms one weight row at a time, 1.7-1.9 in tiles of
// four, 1.9-3.5 of two; 4 rows 1.26-1.41 ms one at a time, 1.24-1.45 in tiles of two, 1.48-2.19 of four).
GPTOSS_AVX512 void bf16_dot(const Bf16& w, int64_t m0, int64_t m1, const float* x, int64_t ldx, int64_t n,
                            float* out, int64_t ldo) {
  switch (n) {
    case 1: return bf16_stream<1>(w, m0, m1, x, ldx, out, ldo);
    case 2: return bf16_stream<2>(w, m0, m1, x, ldx, out, ldo);
    case 3: return bf16_stream<3>(w, m0, m1, x, ldx, out, ldo);
    case 4: return bf16_tiles<2>(w, m0, m1, x, ldx, n, out, ldo);
    default: return bf16_tiles<4>(w, m0, m1, x, ldx, n, out, ldo);
  }
}

GPTOSS_AVX512 void bf16_decode(const Bf16& w, int64_t m0, int64_t m1, float* dst) {
  const uint16_t* src = w.w + m0 * w.k;
  const int64_t total = (m1 - m0) * w.k;
  int64_t i = 0;
  for (; i + 16 <= total; i += 16) _mm512_storeu_ps(dst + i, load_bf16(src + i));
  for (; i < total; ++i) dst[i] = bf16_to_float(src[i]);
}

// avx2::attend's three phases with 16-float vectors, for head sizes that are a multiple of 16 and query groups of
// whole sets of eight heads (others take the AVX2 path): scores of eight heads against each key row (eight accumulators, halved to 256 bits and reduced
// together), the AVX2 softmax, then eight heads by sixteen values over the chunk's slots.
GPTOSS_AVX512 void attend(const Attend& a) {
  const int64_t n = a.count, dim = a.dim;
  if (dim % 16 != 0 || a.group % 8 != 0) return avx2::attend(a);
  const __m256 scale = _mm256_set1_ps(a.scale);
  for (int64_t i = 0; i < std::min(kAttendAhead, n); ++i) prefetch_slot(a, i);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAttendAhead < n) prefetch_slot(a, i + kAttendAhead);
    const float* kr = a.k + a.slots[i] * a.slot_stride;
    for (int64_t g = 0; g < a.group; g += 8) {
      __m512 acc[8];
      for (int h = 0; h < 8; ++h) acc[h] = _mm512_setzero_ps();
      for (int64_t d = 0; d < dim; d += 16) {
        const __m512 kc = _mm512_loadu_ps(kr + d);
        for (int h = 0; h < 8; ++h) acc[h] = _mm512_fmadd_ps(_mm512_loadu_ps(a.q + (g + h) * dim + d), kc, acc[h]);
      }
      __m256 half[8];
      for (int h = 0; h < 8; ++h)
        half[h] = _mm256_add_ps(_mm512_castps512_ps256(acc[h]),
                                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[h]), 1)));
      alignas(32) float dots[8];
      _mm256_store_ps(dots, _mm256_mul_ps(avx2::sum8(half), scale));
      for (int h = 0; h < 8; ++h) a.scores[(g + h) * n + i] = dots[h];
    }
  }
  avx2::attend_softmax(a);
  for (int64_t g = 0; g < a.group; g += 8) {  // eight heads by sixteen values: each value vector feeds eight FMAs
    const float* p = a.scores + g * n;
    for (int64_t d = 0; d < dim; d += 16) {
      __m512 acc[8];
      for (int h = 0; h < 8; ++h) acc[h] = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        const __m512 vc = _mm512_loadu_ps(a.v + a.slots[i] * a.slot_stride + d);
        for (int h = 0; h < 8; ++h) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * n + i]), vc, acc[h]);
      }
      for (int h = 0; h < 8; ++h) _mm512_storeu_ps(a.out + (g + h) * dim + d, acc[h]);
    }
  }
}

// 16 registers of 16 32-bit lanes, transposed in place: r[i] lane j <-> r[j] lane i.
GPTOSS_AVX512 inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4 i + q], 128-bit lane L: lane value 4 L + q of rows 4 i .. 4 i + 3
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0x88), v1 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0xDD);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0xDD);
    r[q] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[4 + q] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[8 + q] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    r[12 + q] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}

// The many-rows path's product without MKL, which takes its AVX2 code on CPUs not made by Intel (Zen 5 VM: sgemm
// 55-58 G MAC/s a core at these shapes, where AVX-512 FMAs peaked at 140 that day; another day's host of the same
// reported model ran them at half rate, 59, as fast as 256-bit ones: fma_rates). Each step of k multiplies V
// vectors of 16 activation rows (xt, packed k-major) by kGemmCols weights broadcast from the tile's rows, into V x 8
// accumulators; k goes in chunks of kGemmK so that a chunk of the rows stays in L1 while the weight rows pass.
// Every (row, weight row) pair sums its products in k order whatever n is, so a row's result does not depend on
// its batch.
constexpr int64_t kGemmK = 128;

template <int V>
GPTOSS_AVX512 __attribute__((always_inline)) inline void gemm_block(const float* xt, int64_t np, const float* t,
                                                                    int64_t ldt, int64_t kc, float* acc, bool first) {
  __m512 a[V][kGemmCols];
  for (int v = 0; v < V; ++v)
    for (int j = 0; j < kGemmCols; ++j)
      a[v][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + j * np + 16 * v);
  for (int64_t c = 0; c < kc; ++c) {
    __m512 x[V];
    for (int v = 0; v < V; ++v) x[v] = _mm512_loadu_ps(xt + c * np + 16 * v);
    for (int j = 0; j < kGemmCols; ++j) {
      const __m512 w = _mm512_set1_ps(t[j * ldt + c]);
      for (int v = 0; v < V; ++v) a[v][j] = _mm512_fmadd_ps(x[v], w, a[v][j]);
    }
  }
  for (int v = 0; v < V; ++v)
    for (int j = 0; j < kGemmCols; ++j) _mm512_storeu_ps(acc + j * np + 16 * v, a[v][j]);
}

GPTOSS_AVX512 void gemm_nt(const float* xt, int64_t n, const float* t, int64_t mt, int64_t k, float* out,
                           int64_t ldo, float* acc) {
  const int64_t np = padded_rows(n), cols = (mt + kGemmCols - 1) / kGemmCols * kGemmCols;
  for (int64_t k0 = 0; k0 < k; k0 += kGemmK) {
    const int64_t kc = std::min(kGemmK, k - k0);
    for (int64_t r0 = 0; r0 < np; r0 += 3 * 16) {
      const int64_t vectors = std::min<int64_t>(3, (np - r0) / 16);
      for (int64_t j0 = 0; j0 < cols; j0 += kGemmCols) {
        const float* x = xt + k0 * np + r0;
        const float* w = t + j0 * k + k0;
        float* a = acc + j0 * np + r0;
        if (vectors == 3) gemm_block<3>(x, np, w, k, kc, a, k0 == 0);
        else if (vectors == 2) gemm_block<2>(x, np, w, k, kc, a, k0 == 0);
        else gemm_block<1>(x, np, w, k, kc, a, k0 == 0);
      }
    }
  }
  // acc [weight row][row] -> out [row][weight row], 16 x 16 at a time (the rows past mt in acc are not read out)
  for (int64_t j0 = 0; j0 < mt; j0 += 16) {
    const __mmask16 keep = static_cast<__mmask16>(mt - j0 >= 16 ? 0xFFFF : (1u << (mt - j0)) - 1);
    for (int64_t r0 = 0; r0 < n; r0 += 16) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = j0 + i < cols ? _mm512_loadu_si512(acc + (j0 + i) * np + r0) : _mm512_setzero_si512();
      transpose16(v);
      for (int64_t i = 0; i < std::min<int64_t>(16, n - r0); ++i)
        _mm512_mask_storeu_ps(out + (r0 + i) * ldo + j0, keep, _mm512_castsi512_ps(v[i]));
    }
  }
}

}  // namespace avx512

// ---- AMX (tiles of bf16, fp32 sums) ----
// The many-rows path without sgemm: C += A B on 16 x 16 fp32 tiles, A 16 weight rows by 32 bf16 values, B 32
// activation values (as 16 pairs) by 16 activation rows. The weights are exact in bf16 (an MXFP4 value times its
// power-of-two scale has at most 2 significant bits; bf16 weights are themselves), and each fp32 activation is cut
// into three bf16 parts whose sum is exactly it (8 significant bits each: x1 = bf16(x), x2 = bf16(x - x1),
// x3 = x - x1 - x2). A bf16 product is exact in fp32, so W x = W x1 + W x2 + W x3 with every product exact and
// fp32 sums: the dense fp32 result up to summation order, like sgemm. The tiles flush subnormal inputs to zero: a
// part below 2^-126 (an activation under ~2^-110, or a weight with scale 2^-127) counts as zero, an error far
// below the fp32 rounding of any sum it enters.
#define GPTOSS_AMX __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512f,avx512bw,avx512vl,avx2,fma")))
namespace amx {

constexpr int64_t kRows = kTileRows;    // rows of a tile (weight rows in A, activation rows in B's columns)
constexpr int64_t kStep = kTileStep;    // bf16 values a tile row holds (64 bytes)
constexpr int64_t kParts = kTileParts;  // bf16 parts an activation is cut into
constexpr int64_t kTileWords = kRows * kStep;  // bf16 words in one A or B tile
static_assert(kRows == 16 && kStep == 32, "one AMX tile: 16 rows of 64 bytes");

// The CPU has AMX-TILE, AMX-BF16 and AVX512-BF16, and Linux lets this process use the tile registers (they are
// off until asked for: arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA).
bool usable() {
#if defined(__linux__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool avx512_bf16 = a & (1u << 5);
  if (!(tile && bf16 && avx512_bf16 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")))
    return false;
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
  return false;
#endif
}

// Every tile 16 rows of 64 bytes (palette 1); the tile configuration is per thread, so each thread sets it before
// its first tile instruction of a call.
struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = kRows;
  }
};

GPTOSS_AMX void configure() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}

GPTOSS_AMX void release() { _tile_release(); }

GPTOSS_AMX inline __m512 widen(__m256i bf16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

// One activation step of 32 values (x) -> its three bf16 parts, each 16 pairs of values in one register.
GPTOSS_AMX inline void split_step(const float* x, __m512i parts[kParts]) {
  __m256i bits[2][kParts];
  for (int half = 0; half < 2; ++half) {
    __m512 rest = _mm512_loadu_ps(x + 16 * half);
    for (int p = 0; p < kParts; ++p) {
      bits[half][p] = (__m256i)_mm512_cvtneps_pbh(rest);
      rest = _mm512_sub_ps(rest, widen(bits[half][p]));
    }
  }
  for (int p = 0; p < kParts; ++p)
    parts[p] = _mm512_inserti64x4(_mm512_castsi256_si512(bits[0][p]), bits[1][p], 1);
}

// mxfp4_decode's quad order on bf16 words: output step t (of a quad's four), word w, holds the quad's value
// 4 w + t (the code in bits 4 t .. 4 t + 3 of the quad's 16-bit word w). Each output step draws from all four
// natural steps: two two-register word permutes (steps 0-1 and 2-3) and a blend.
struct QuadOrder {
  alignas(64) uint16_t index[4][32];
  uint32_t upper[4];  // words taken from steps 2-3
  QuadOrder() {
    for (int t = 0; t < 4; ++t) {
      upper[t] = 0;
      for (int w = 0; w < 32; ++w) {
        const int value = 4 * w + t, step = value / 32;
        index[t][w] = static_cast<uint16_t>((step % 2) * 32 + value % 32);
        if (step >= 2) upper[t] |= 1u << w;
      }
    }
  }
};
const QuadOrder kQuadOrder;

// Up to 16 activation rows (x, ldx apart; K a multiple of 32) -> their B tiles: for each step of 32 values, the
// three parts' tiles one after another, each 16 pairs of values (tile rows) by the 16 activation rows (missing
// rows are zeros): dst[((s * 3 + p) * 16 + pair) * 32 + 2 * row + h] = part p of value 2 pair + h of step s.
// `quads`: the values of each whole quad of steps in QuadOrder (for MXFP4 weights from mxfp4_decode).
GPTOSS_AMX void split_tile(const float* x, int64_t ldx, int64_t rows, int64_t k, bool quads, uint16_t* dst) {
  const int64_t steps = k / kStep, quad_steps = quads ? steps - steps % 4 : 0;
  __m512i index[4];
  for (int t = 0; t < 4; ++t) index[t] = _mm512_load_si512(kQuadOrder.index[t]);
  for (int64_t s = 0; s < steps;) {
    const int64_t count = s < quad_steps ? 4 : 1;  // steps taken together
    __m512i part[4][kParts][kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      if (r >= rows) {
        for (int64_t t = 0; t < count; ++t)
          for (int p = 0; p < kParts; ++p) part[t][p][r] = _mm512_setzero_si512();
        continue;
      }
      __m512i natural[4][kParts];
      for (int64_t t = 0; t < count; ++t) split_step(x + r * ldx + (s + t) * kStep, natural[t]);
      for (int p = 0; p < kParts; ++p) {
        if (count == 1) {
          part[0][p][r] = natural[0][p];
          continue;
        }
        for (int t = 0; t < 4; ++t)
          part[t][p][r] = _mm512_mask_blend_epi16(
              kQuadOrder.upper[t], _mm512_permutex2var_epi16(natural[0][p], index[t], natural[1][p]),
              _mm512_permutex2var_epi16(natural[2][p], index[t], natural[3][p]));
      }
    }
    for (int64_t t = 0; t < count; ++t, ++s)
      for (int p = 0; p < kParts; ++p) {
        avx512::transpose16(part[t][p]);
        uint16_t* tile = dst + (s * kParts + p) * kTileWords;
        for (int64_t pair = 0; pair < kRows; ++pair) _mm512_storeu_si512(tile + pair * kStep, part[t][p][pair]);
      }
  }
}

// A quad of blocks straight to bf16 words in QuadOrder, for rows whose scales s all lie in 2..252 (an exponent
// field then stays within 1..254): output step t takes the code in bits 4 t .. 4 t + 3 of each 16-bit word of the
// quad (a shift and a mask), looks its word for twice its value up (vpermw reads a word's low 5 bits), and adds
// s - 128 to the exponent field of every nonzero word. Exact: the word is the fp32 value's top half.
struct QuadWords {
  alignas(64) uint16_t twice[32];  // bf16 of kTwiceFp4[code]
  alignas(64) uint8_t spread[64];  // pshufb: word w <- its block's scale byte, w / 8 (each 128-bit lane: one block)
  QuadWords() : twice(), spread() {
    for (int c = 0; c < 16; ++c) twice[c] = static_cast<uint16_t>(kTwiceFp4Bf16Hi[c] << 8 | kTwiceFp4Bf16Lo[c]);
    for (int w = 0; w < 32; ++w) {
      spread[2 * w] = static_cast<uint8_t>(w / 8);
      spread[2 * w + 1] = 0x80;
    }
  }
};
const QuadWords kQuadWords;

// Whether every scale of a row lies in the word decoder's range.
inline bool row_in_word_range(const uint8_t* s, int64_t count) {
  uint8_t lo = 255, hi = 0;
  for (int64_t i = 0; i < count; ++i) lo = std::min(lo, s[i]), hi = std::max(hi, s[i]);
  return lo >= 2 && hi <= 252;
}

GPTOSS_AMX inline void decode_quad_words(const uint8_t* b, const uint8_t* s, __m512i twice, __m512i spread,
                                         uint16_t* dst) {
  int32_t four;
  std::memcpy(&four, s, sizeof four);
  const __m512i exponent = _mm512_slli_epi16(
      _mm512_sub_epi16(_mm512_shuffle_epi8(_mm512_set1_epi32(four), spread), _mm512_set1_epi16(128)), 7);
  const __m512i nibble = _mm512_set1_epi16(0x000F), magnitude = _mm512_set1_epi16(0x7FFF);
  const __m512i codes = _mm512_loadu_si512(b);
  for (int t = 0; t < 4; ++t) {
    const __m512i code = _mm512_and_si512(t ? _mm512_srli_epi16(codes, 4 * t) : codes, nibble);
    const __m512i value = _mm512_permutexvar_epi16(code, twice);
    _mm512_storeu_si512(dst + t * kStep,
                        _mm512_mask_add_epi16(value, _mm512_test_epi16_mask(value, magnitude), value, exponent));
  }
}

// The same quad through fp32 (any scale: subnormal factors for s = 0, 1; infinities past the largest), for the rare
// row the word decoder does not take. Every value is exact in bf16, so its fp32 bits' top half is its bf16.
inline void decode_quad_scalar(const uint8_t* b, const uint8_t* s, uint16_t* dst) {
  for (int v = 0; v < 4 * kBlock; ++v) {
    const uint8_t byte = b[v / 2];
    const float x = kTwiceFp4[v % 2 ? byte >> 4 : byte & 0x0F] * kHalfScale.v[s[v / kBlock]];
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    dst[(v % 4) * kStep + v / 4] = static_cast<uint16_t>(bits >> 16);
  }
}

// Weight rows [m0, m1) of an MXFP4 matrix as bf16 rows of K (exact: see above) in QuadOrder (within a quad of blocks,
// value 4 w + t at position 32 t + w; the last groups % 4 blocks in natural order), rows from m1 up to the next
// multiple of 16 zero. The activations are split in the same order, so the products pair up unchanged.
GPTOSS_AMX void mxfp4_decode(const Mxfp4& w, int64_t m0, int64_t m1, uint16_t* dst) {
  const int64_t k = w.groups * kBlock, quad_end = w.groups - w.groups % 4;
  const __m512i twice = _mm512_load_si512(kQuadWords.twice), spread = _mm512_load_si512(kQuadWords.spread);
  for (int64_t m = m0; m < m1; ++m, dst += k) {
    const uint8_t* b = w.blocks + m * w.groups * kBlockBytes;
    const uint8_t* s = w.scales + m * w.groups;
    const bool words = row_in_word_range(s, w.groups);  // almost every row
    for (int64_t q = 0; q < quad_end; q += 4) {
      if (words) decode_quad_words(b + q * kBlockBytes, s + q, twice, spread, dst + q * kBlock);
      else decode_quad_scalar(b + q * kBlockBytes, s + q, dst + q * kBlock);
    }
    for (int64_t g = quad_end; g < w.groups; ++g) {
      __m512 v[2];
      avx512::decode_block(b + g * kBlockBytes, v);
      const __m512 scale = _mm512_set1_ps(kHalfScale.v[s[g]]);
      const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_mul_ps(v[1], scale), _mm512_mul_ps(v[0], scale));
      _mm512_storeu_si512(dst + g * kBlock, (__m512i)h);
    }
  }
  const int64_t padded = (m1 - m0 + kRows - 1) / kRows * kRows;
  std::memset(dst, 0, (padded - (m1 - m0)) * k * sizeof(uint16_t));
}

// C tiles (Wr weight tiles by Xr activation tiles, Wr * Xr <= 4) over all of K: per step of 32 values the weight
// tiles are loaded once and each part's activation tiles once, Wr * Xr * 3 products. A product's latency is ~3
// times its issue interval (Sapphire Rapids), so four accumulators keep the unit busy where one or two wait.
// Tile registers: C 0-3, A 4-5, B 6-7.
template <int Wr, int Xr>
GPTOSS_AMX __attribute__((always_inline)) inline void tile_block(const uint16_t* a, int64_t lda,
                                                                 const uint16_t* b, int64_t tile_words,
                                                                 int64_t steps) {
  const int64_t stride = lda * static_cast<int64_t>(sizeof(uint16_t));
  for (int64_t s = 0; s < steps; ++s, b += kParts * kTileWords) {
    _tile_loadd(4, a + s * kStep, stride);
    if (Wr == 2) _tile_loadd(5, a + kRows * lda + s * kStep, stride);
    for (int p = 0; p < kParts; ++p) {
      _tile_loadd(6, b + p * kTileWords, 64);
      if (Xr == 2) _tile_loadd(7, b + tile_words + p * kTileWords, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (Wr == 2) _tile_dpbf16ps(1, 5, 6);
      if (Xr == 2) _tile_dpbf16ps(2, 4, 7);
      if (Wr == 2 && Xr == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// out[r * ldo + i] = sum_k x[r][k] a[i * lda + k] for r < n, i < mt, with a's rows padded to a multiple of 16
// (readable; padding rows are not stored) and x in split_tile() form (`xs`, one block per 16 rows): blocks of two
// weight tiles by two activation tiles, fewer at the edges. The activation tiles go in bands of about 1 MiB that
// stay in L2 while every weight tile passes over them (all of a band's rows re-read per weight tile pair).
constexpr int64_t kBandBytes = 1 << 20;

GPTOSS_AMX void gemm(const uint16_t* a, int64_t lda, int64_t mt, const uint16_t* xs, int64_t n, int64_t k,
                     float* out, int64_t ldo) {
  const int64_t steps = k / kStep, tile_words = steps * kParts * kTileWords;
  const int64_t x_tiles = (n + kRows - 1) / kRows;
  const int64_t band = std::max<int64_t>(2, kBandBytes / (tile_words * 2) / 2 * 2);
  alignas(64) float c[4][kRows][kRows];  // c[t][i][r]: tile t = 2 * activation tile + weight tile
  for (int64_t j0 = 0; j0 < x_tiles; j0 += band)
  for (int64_t mb = 0; mb < mt; mb += 2 * kRows) {
    const int wr = mt - mb > kRows ? 2 : 1;
    for (int64_t j = j0; j < std::min(x_tiles, j0 + band); j += 2) {
      const int xr = std::min(x_tiles, j0 + band) - j > 1 ? 2 : 1;
      const uint16_t* b = xs + j * tile_words;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* at = a + mb * lda;
      if (wr == 2 && xr == 2) tile_block<2, 2>(at, lda, b, tile_words, steps);
      else if (wr == 2) tile_block<2, 1>(at, lda, b, tile_words, steps);
      else if (xr == 2) tile_block<1, 2>(at, lda, b, tile_words, steps);
      else tile_block<1, 1>(at, lda, b, tile_words, steps);
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      const int64_t cols = std::min(wr * kRows, mt - mb);
      for (int xt = 0; xt < xr; ++xt) {
        const int64_t rows = std::min(kRows, n - (j + xt) * kRows);
        for (int64_t r = 0; r < rows; ++r) {
          float* o = out + ((j + xt) * kRows + r) * ldo + mb;
          for (int64_t i = 0; i < cols; ++i) o[i] = c[2 * xt + i / kRows][i % kRows][r];
        }
      }
    }
  }
}

const TileKernels kTiles{configure, release, split_tile, mxfp4_decode, gemm};

}  // namespace amx
#endif  // GPTOSS_X86

// -- instruction-set selection -------------------------------------------------------------------------------------
const Kernels kScalar{"scalar", nullptr, scalar::mxfp4_dot, scalar::mxfp4_decode, nullptr, scalar::bf16_dot,
                      scalar::bf16_decode, scalar::attend, scalar::swiglu, {0, 0}, false, false, nullptr, nullptr};
#ifdef GPTOSS_X86
const Kernels kAvx2{"avx2", avx2::mxfp4_dot_layout, avx2::mxfp4_dot, avx2::mxfp4_decode, avx2::bf16_dot_layout,
                    avx2::bf16_dot, avx2::bf16_decode, avx2::attend, avx2::swiglu, {1024, 1024}, true, false, nullptr,
                    nullptr};
const Kernels kAvx512{"avx512", avx512::mxfp4_dot_layout, avx512::mxfp4_dot, avx512::mxfp4_decode,
                      avx512::bf16_dot_layout, avx512::bf16_dot, avx512::bf16_decode, avx512::attend, avx2::swiglu,
                      {8192, 8192}, true, true, nullptr, avx512::gemm_nt};
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
// others its AVX2 code, at half the AVX-512 FMA rate where the core has full-width units (Zen 5). So: own by
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
  static int64_t own_gemm_few_rows(int64_t k) { return k <= 1024 ? 24 : 16; }
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
  // bf16 weights against the own sgemm: the register tiles (bf16 read in place, no decode, no padding) keep up to
  // 256 rows where K <= 1024, and kDecodeRows beyond (Zen 5 VM, 2 threads, register / own time at 256 rows:
  // 1280 x 768 0.83-0.92x, 768 x 1024 0.68-0.84x; 1280 x 1536 1.10-1.15x, 2048 x 2048 1.16-1.45x; 512 rows
  // 1280 x 768 1.09-1.18x).
  static int64_t own_gemm_few_rows(int64_t k) { return k <= 1024 ? 256 : kDecodeRows; }
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
  const int64_t few = own ? W::own_gemm_few_rows(k) : kDecodeRows;  // rows an expert takes on the register path
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
          pack_rows(xp + groups[gi].start * k, k, sgemm_rows(groups[gi]), k, xt + packed_at[gi]);
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

  // each row's visible slots, and its chunks' places in the partial results
  std::vector<std::vector<int64_t>> visible(rows);
  std::vector<int64_t> first_chunk(rows + 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* kp = k_pos.data_ptr<int64_t>() + (r / steps) * n;
    const int64_t p = q_pos.data_ptr<int64_t>()[r];
    for (int64_t j = 0; j < n; ++j)
      if (kp[j] >= 0 && kp[j] <= p && (window <= 0 || kp[j] > p - window)) visible[r].push_back(j);
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
              " path has none (only the AVX-512 path has its own sgemm)");
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
