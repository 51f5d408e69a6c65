// ---- AVX2 + FMA ----
// cpu_kernels.cpp includes this inside its anonymous namespace, after the definitions every path shares
// (Mxfp4, Bf16, Attend, the tables and constants) and before the instruction-set selection that names these
// functions: one translation unit, so everything stays internal to the library. Not a header to include
// anywhere else (no include guard on purpose).

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

// The many-rows path's product without MKL. The activations go in panels of kPackRows (16) rows, each panel k-major
// and contiguous (pack_panels), so a step of k reads one cache line of them, and the weights are broadcast from
// kAvx2GemmCols rows of the decoded tile in its natural layout: 2 x 6 accumulators, two activation loads and six
// broadcasts for twelve FMAs a step (the register budget of sixteen: 12 + 2 + 1). Each kAvx2GemmK steps of k run as
// fresh chains in registers, added in k order into the 16 x 6 block's sums, which then go out through a small
// buffer: one chain over the whole of k erred 4.8e-5 at K = 2880 against float64 (MKL 7.2e-6). Every (row, weight
// row) pair takes the same operations in the same order whatever n is, so a row's result does not depend on its
// batch.
constexpr int kAvx2GemmCols = 6;
constexpr int64_t kAvx2GemmK = 256;

// x [n, k] -> panels of 16 rows, [padded_rows(n) / 16][k][16], rows past n zero.
void pack_panels(const float* x, int64_t ldx, int64_t n, int64_t k, float* dst) {
  for (int64_t r0 = 0; r0 < n; r0 += kPackRows, dst += kPackRows * k) {
    const int64_t rows = std::min<int64_t>(kPackRows, n - r0);
    for (int64_t c = 0; c < k; ++c) {
      float* d = dst + c * kPackRows;
      for (int64_t r = 0; r < rows; ++r) d[r] = x[(r0 + r) * ldx + c];
      for (int64_t r = rows; r < kPackRows; ++r) d[r] = 0.f;
    }
  }
}

GPTOSS_AVX2 void gemm_nt(const float* xt, int64_t n, const float* t, int64_t mt, int64_t k, float* out, int64_t ldo,
                         float*) {
  constexpr int J = kAvx2GemmCols;
  for (int64_t j0 = 0; j0 < mt; j0 += J) {
    const int64_t cols = std::min<int64_t>(J, mt - j0);
    const float* w[J];  // a block's columns past mt repeat its last one and are not stored
    for (int j = 0; j < J; ++j) w[j] = t + (j0 + std::min<int64_t>(j, cols - 1)) * k;
    for (int64_t r0 = 0; r0 < n; r0 += kPackRows) {
      const float* xp = xt + r0 * k;
      alignas(32) float block[J][kPackRows];
      for (int64_t k0 = 0; k0 < k; k0 += kAvx2GemmK) {
        __m256 a[2][J];
        for (int j = 0; j < J; ++j) a[0][j] = a[1][j] = _mm256_setzero_ps();
        for (int64_t c = k0, end = std::min(k, k0 + kAvx2GemmK); c < end; ++c) {
          const __m256 x0 = _mm256_loadu_ps(xp + c * kPackRows), x1 = _mm256_loadu_ps(xp + c * kPackRows + 8);
          for (int j = 0; j < J; ++j) {
            const __m256 b = _mm256_broadcast_ss(w[j] + c);
            a[0][j] = _mm256_fmadd_ps(x0, b, a[0][j]);
            a[1][j] = _mm256_fmadd_ps(x1, b, a[1][j]);
          }
        }
        for (int j = 0; j < J; ++j)
          for (int v = 0; v < 2; ++v) {
            float* b = block[j] + 8 * v;
            _mm256_store_ps(b, k0 == 0 ? a[v][j] : _mm256_add_ps(_mm256_load_ps(b), a[v][j]));
          }
      }
      const int64_t rows = std::min<int64_t>(kPackRows, n - r0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j) out[(r0 + r) * ldo + j0 + j] = block[j][r];
    }
  }
}

}  // namespace avx2
