// One tile of prefill attention, written once over a vector type V of V::W floats: attention.cpp includes this
// body inside each instruction set's namespace, under that set's target options, with V defined there. Not a
// header to include anywhere else (no include guard on purpose).
//
// A tile is up to V::kVectors * W query rows (some heads sharing one kv head, at some positions), one row per
// vector lane, so the kernel never transposes a key or value row: with the rows along lanes,
//   scores^T[j, r] = sum_d k[j, d] q^T[d, r]   (a key's element broadcast, times a vector of rows' q elements)
//   out^T[d, r]   += sum_j v[j, d] p^T[j, r]   (a value's element broadcast, times a vector of rows' weights)
// and the softmax's per-row maximum and total are lane-wise maxima and sums over j. Keys go in blocks of
// kKeyBlock slots with the running maximum and total of an online softmax; the sink is the starting logit
// (maximum = sink, total = 1, out = 0), so a row that sees no key ends as 0 / 1. Every lane takes the same
// operations in the same order whatever the other lanes hold, the tile's size, the batch or the thread count: a
// row's result depends on nothing but its own inputs and the slots' key blocks. A block no row of the tile sees
// leaves the row's state as it was bit for bit (its maximum stays, e^0 = 1, no weight), so skipping it changes
// nothing.

// e^x by the same range reduction and Cephes expf polynomial as avx2::exp_ps in cpu_avx2.h (that one was
// checked within 1 ulp on [-87.3, 88]; this generic copy was not checked exhaustively), clamped to that range:
// below it e^-87.3, which the callers mask to 0 where it stands for -inf. e^0 is exactly 1, which keeps a block
// no row sees a no-op.
inline typename V::T exp_v(typename V::T x) {
  x = V::min(V::max(x, V::set1(-87.3f)), V::set1(88.f));
  const typename V::T n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  typename V::T r = V::fnmadd(n, V::set1(0.693359375f), x);
  r = V::fnmadd(n, V::set1(-2.12194440e-4f), r);
  typename V::T p = V::set1(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = V::fmadd(p, r, V::set1(c));
  p = V::add(V::fmadd(p, V::mul(r, r), r), V::set1(1.f));
  return V::mul(p, V::pow2(n));
}

// scores^T for JK keys (slots j .. j + JK) against the tile's NV vectors of rows, into st (rows Rp = NV W apart).
template <int JK, int NV>
inline void tile_scores(const PrefillTile& a, const float* qt, int64_t j, float* st) {
  using T = typename V::T;
  constexpr int64_t Rp = NV * V::W;
  T acc[JK][NV];
  for (int jj = 0; jj < JK; ++jj)
    for (int v = 0; v < NV; ++v) acc[jj][v] = V::zero();
  const float* kr[JK];
  for (int jj = 0; jj < JK; ++jj) kr[jj] = a.k + (j + jj) * a.slot_stride;
  for (int64_t d = 0; d < a.dim; ++d) {
    T qv[NV];
    for (int v = 0; v < NV; ++v) qv[v] = V::load(qt + d * Rp + v * V::W);
    for (int jj = 0; jj < JK; ++jj) {
      const T kb = V::set1(kr[jj][d]);
      for (int v = 0; v < NV; ++v) acc[jj][v] = V::fmadd(kb, qv[v], acc[jj][v]);
    }
  }
  for (int jj = 0; jj < JK; ++jj)
    for (int v = 0; v < NV; ++v) V::store(st + jj * Rp + v * V::W, acc[jj][v]);
}

// out^T[d .. d + DD] += the block's weights (p^T, count keys from slot j) times their values.
template <int DD, int NV>
inline void tile_values(const PrefillTile& a, const float* pt, int64_t j, int64_t count, int64_t d, float* ot) {
  using T = typename V::T;
  constexpr int64_t Rp = NV * V::W;
  T acc[DD][NV];
  for (int dd = 0; dd < DD; ++dd)
    for (int v = 0; v < NV; ++v) acc[dd][v] = V::load(ot + (d + dd) * Rp + v * V::W);
  for (int64_t i = 0; i < count; ++i) {
    const float* vr = a.v + (j + i) * a.slot_stride + d;
    T pv[NV];
    for (int v = 0; v < NV; ++v) pv[v] = V::load(pt + i * Rp + v * V::W);
    for (int dd = 0; dd < DD; ++dd) {
      const T vb = V::set1(vr[dd]);
      for (int v = 0; v < NV; ++v) acc[dd][v] = V::fmadd(vb, pv[v], acc[dd][v]);
    }
  }
  for (int dd = 0; dd < DD; ++dd)
    for (int v = 0; v < NV; ++v) V::store(ot + (d + dd) * Rp + v * V::W, acc[dd][v]);
}

// The tile's rows (NV vectors of them) over all the key blocks some row sees. scratch: tile_floats(dim, NV W).
template <int NV>
void attend_tile(const PrefillTile& a, float* scratch) {
  using T = typename V::T;
  constexpr int64_t W = V::W, Rp = NV * W;
  constexpr int JK = V::kAcc / NV > 0 ? V::kAcc / NV : 1;  // keys (scores) or value elements a register tile takes
  const int64_t dim = a.dim, rows = a.heads * a.steps;
  float* qt = scratch;             // q^T * scale [dim, Rp]
  float* ot = qt + dim * Rp;       // out^T (unnormalised) [dim, Rp]
  float* st = ot + dim * Rp;       // the block's scores^T, then weights [kKeyBlock, Rp]
  float* lo = st + kKeyBlock * Rp; // a slot is visible to row r when lo[r] < its position <= hi[r]
  float* hi = lo + Rp;
  float* top = hi + Rp;            // running maximum per row
  float* total = top + Rp;         // running total per row
  float lo_min = INFINITY, lo_max = -INFINITY, hi_min = INFINITY, hi_max = -INFINITY;
  for (int64_t r = 0; r < Rp; ++r) {
    const int64_t g = r / a.steps, t = r % a.steps;
    const bool real = r < rows;
    for (int64_t d = 0; d < dim; ++d) qt[d * Rp + r] = real ? a.q[t * a.q_row + g * dim + d] * a.scale : 0.f;
    for (int64_t d = 0; d < dim; ++d) ot[d * Rp + r] = 0.f;
    top[r] = real ? a.sinks[g] : 0.f;
    total[r] = 1.f;
    if (!real) {  // a padding lane sees nothing; its result is dropped
      lo[r] = 0.f, hi[r] = -1.f;
      continue;
    }
    const float p = static_cast<float>(a.q_pos[t]);
    hi[r] = p;
    lo[r] = a.window > 0 ? std::max(p - static_cast<float>(a.window), -1.f) : -1.f;
    lo_min = std::min(lo_min, lo[r]), lo_max = std::max(lo_max, lo[r]);
    hi_min = std::min(hi_min, hi[r]), hi_max = std::max(hi_max, hi[r]);
  }
  for (int64_t j0 = 0; j0 < a.n; j0 += kKeyBlock) {
    const int64_t b = j0 / kKeyBlock, count = std::min(kKeyBlock, a.n - j0);
    const float kmin = a.block_min[b], kmax = a.block_max[b];
    if (kmax <= lo_min || kmin > hi_max) continue;  // no row sees any slot of the block
    const bool all_seen = kmin > lo_max && kmax <= hi_min;
    int64_t i = 0;
    for (; i + JK <= count; i += JK) tile_scores<JK, NV>(a, qt, j0 + i, st + i * Rp);
    for (; i < count; ++i) tile_scores<1, NV>(a, qt, j0 + i, st + i * Rp);
    for (int v = 0; v < NV; ++v) {
      const T lo_v = V::load(lo + v * W), hi_v = V::load(hi + v * W);
      T block_top = V::set1(-INFINITY);
      for (int64_t i = 0; i < count; ++i) {
        T s = V::load(st + i * Rp + v * W);
        if (!all_seen) s = V::seen_or(V::seen(V::set1(a.k_pos[j0 + i]), lo_v, hi_v), s, V::set1(-INFINITY));
        block_top = V::max(block_top, s);
        V::store(st + i * Rp + v * W, s);
      }
      const T old_top = V::load(top + v * W), new_top = V::max(old_top, block_top);
      const T rescale = exp_v(V::sub(old_top, new_top));
      for (int64_t d = 0; d < dim; ++d) V::store(ot + d * Rp + v * W, V::mul(V::load(ot + d * Rp + v * W), rescale));
      T sum = V::zero();
      for (int64_t i = 0; i < count; ++i) {
        const T s = V::load(st + i * Rp + v * W);
        T p = exp_v(V::sub(s, new_top));
        if (!all_seen) p = V::seen_or(V::seen(V::set1(a.k_pos[j0 + i]), lo_v, hi_v), p, V::zero());
        sum = V::add(sum, p);
        V::store(st + i * Rp + v * W, p);
      }
      V::store(top + v * W, new_top);
      V::store(total + v * W, V::add(V::mul(V::load(total + v * W), rescale), sum));
    }
    int64_t d = 0;
    for (; d + JK <= dim; d += JK) tile_values<JK, NV>(a, st, j0, count, d, ot);
    for (; d < dim; ++d) tile_values<1, NV>(a, st, j0, count, d, ot);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = a.out + (r % a.steps) * a.q_row + (r / a.steps) * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = ot[d * Rp + r] / total[r];
  }
}

// Tiles of up to V::kVectors vectors of rows (at most 4).
void attend_tile_any(const PrefillTile& a, float* scratch) {
  switch ((a.heads * a.steps + V::W - 1) / V::W) {
    case 1: return attend_tile<1>(a, scratch);
    case 2: return attend_tile<std::min(2, V::kVectors)>(a, scratch);
    case 3: return attend_tile<std::min(3, V::kVectors)>(a, scratch);
    default: return attend_tile<std::min(4, V::kVectors)>(a, scratch);
  }
}
