// The portable kernels (every CPU; GPTOSS_CPU_ISA=scalar forces them), the reference the vector paths are
// tested against.
// cpu_kernels.cpp includes this inside its anonymous namespace, after the definitions every path shares
// (Mxfp4, Bf16, Attend, the tables and constants) and before the instruction-set selection that names these
// functions: one translation unit, so everything stays internal to the library. Not a header to include
// anywhere else (no include guard on purpose).

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
