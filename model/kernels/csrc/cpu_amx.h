// ---- AMX (tiles of bf16, fp32 sums) ----
// cpu_kernels.cpp includes this inside its anonymous namespace, after the definitions every path shares
// (Mxfp4, Bf16, Attend, the tables and constants) and before the instruction-set selection that names these
// functions: one translation unit, so everything stays internal to the library. Not a header to include
// anywhere else (no include guard on purpose).

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
