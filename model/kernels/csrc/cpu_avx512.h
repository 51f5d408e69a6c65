// ---- AVX-512 (F, BW, VL) ----
// cpu_kernels.cpp includes this inside its anonymous namespace, after the definitions every path shares
// (Mxfp4, Bf16, Attend, the tables and constants) and before the instruction-set selection that names these
// functions: one translation unit, so everything stays internal to the library. Not a header to include
// anywhere else (no include guard on purpose).

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
