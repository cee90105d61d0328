// CPU kernels of the gate family (SE, ECA, CBAM, HAM, triplet): see attnzoo/kernels/reference.py
// for the contract and attnzoo/kernels/cpu.py for how this file is built and called.
//
// Every operation works on a contiguous [O, R, I] view of a 4-d map in memory order and
// reduces (or broadcasts) along R. Rows of the reduction are optionally split into G groups
// by an int8 table groups[N, R] (HAM's separated spatial gate); sample n owns the rows o with
// o / (O / N) == n. The element type is float32 or bfloat16 (DT = 0 or 1); all arithmetic is
// in float32 and a bfloat16 result is rounded once (round to nearest even, as PyTorch).
//
// Parallel over O with OpenMP (the caller passes PyTorch's thread count; loaded into a
// process that has imported torch, libgomp.so.1 is torch's own, so the two share one pool).
// No -ffast-math: the max keeps NaN (a NaN is the max, the first NaN its argmax), and the
// sums over contiguous rows use explicit lanes so that the compiler vectorises them.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <vector>

#include <omp.h>

namespace {

typedef uint16_t bf16;
constexpr int kMaxGroups = 8;
constexpr int kBlock = 16;
constexpr int kConvBlock = 32;

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (v != v) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16>(u >> 16);
}

inline void store(float* p, float v) { *p = v; }
inline void store(bf16* p, float v) { *p = bf16_bits(v); }

// v rounded to T's precision and back (the gate "in x's dtype").
inline float rounded(float v, const float*) { return v; }
inline float rounded(float v, const bf16*) { return to_float(bf16_bits(v)); }

inline bool takes(float v, float best, int32_t arg) {
  // The first member, a larger value, or the first NaN; ties keep the earlier index.
  return arg < 0 || v > best || (v != v && best == best);
}

// One block of up to kBlock consecutive rows o (one sample's) with I == 1: each row is a
// contiguous run of R values, reduced with the rows as the vector lanes (strided loads), so
// that a short R (a spatial gate over C = 16 channels) costs no per-row horizontal merge.
template <typename T, bool WANT_MAX, bool PRODUCT, int COUNT>
inline void reduce_rows(const T* a, const T* b, int64_t R, const int8_t* grp, int64_t G,
                        int64_t lanes, float* sum, float* mx, int32_t* am) {
  const int64_t nb = COUNT > 0 ? COUNT : lanes;
  float s[kMaxGroups][kBlock], m[kMaxGroups][kBlock];
  int32_t ix[kMaxGroups][kBlock];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t l = 0; l < kBlock; ++l) {
      s[g][l] = 0.f;
      m[g][l] = -std::numeric_limits<float>::infinity();
      ix[g][l] = -1;
    }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = grp ? grp[r] : 0;
    float* sg = s[g];
    float* mg = m[g];
    int32_t* ig = ix[g];
    const int32_t rr = static_cast<int32_t>(r);
    for (int64_t l = 0; l < nb; ++l) {
      float v = to_float(a[l * R + r]);
      if (PRODUCT) v *= to_float(b[l * R + r]);
      sg[l] += v;
      if (WANT_MAX) {
        bool t = takes(v, mg[l], ig[l]);
        mg[l] = t ? v : mg[l];
        ig[l] = t ? rr : ig[l];
      }
    }
  }
  for (int64_t l = 0; l < nb; ++l)
    for (int64_t g = 0; g < G; ++g) {
      sum[l * G + g] = s[g][l];
      if (WANT_MAX) {
        mx[l * G + g] = m[g][l];
        am[l * G + g] = ix[g][l];
      }
    }
}

// sum (and max, argmax) over r; PRODUCT: of a[.] * b[.] (dot) instead of a[.].
template <typename T, bool WANT_MAX, bool PRODUCT>
void reduce(const T* a, const T* b, int64_t O, int64_t R, int64_t I, const int8_t* groups,
            int64_t G, int64_t N, float* sum, float* mx, int32_t* am, int threads) {
  const int64_t per_n = O / N;
  if (I == 1) {
    const int64_t blocks = (per_n + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t q = 0; q < N * blocks; ++q) {
      const int64_t n = q / blocks;
      const int64_t o0 = n * per_n + (q % blocks) * kBlock;
      const int64_t lanes = std::min<int64_t>(kBlock, (n + 1) * per_n - o0);
      const int8_t* grp = groups ? groups + n * R : nullptr;
      const T* bo = PRODUCT ? b + o0 * R : nullptr;
      float* mo = WANT_MAX ? mx + o0 * G : nullptr;
      int32_t* io = WANT_MAX ? am + o0 * G : nullptr;
      if (lanes == kBlock)
        reduce_rows<T, WANT_MAX, PRODUCT, kBlock>(a + o0 * R, bo, R, grp, G, lanes,
                                                  sum + o0 * G, mo, io);
      else
        reduce_rows<T, WANT_MAX, PRODUCT, 0>(a + o0 * R, bo, R, grp, G, lanes, sum + o0 * G,
                                             mo, io);
    }
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t o = 0; o < O; ++o) {
    const T* ao = a + o * R * I;
    const T* bo = PRODUCT ? b + o * R * I : nullptr;
    const int8_t* grp = groups ? groups + (o / per_n) * R : nullptr;
    float* so = sum + o * G * I;
    float* mo = WANT_MAX ? mx + o * G * I : nullptr;
    int32_t* io = WANT_MAX ? am + o * G * I : nullptr;
    for (int64_t k = 0; k < G * I; ++k) {
      so[k] = 0.f;
      if (WANT_MAX) {
        mo[k] = -std::numeric_limits<float>::infinity();
        io[k] = -1;
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = grp ? grp[r] : 0;
      const T* row = ao + r * I;
      const T* row_b = PRODUCT ? bo + r * I : nullptr;
      float* s = so + g * I;
      float* m = WANT_MAX ? mo + g * I : nullptr;
      int32_t* ix = WANT_MAX ? io + g * I : nullptr;
      const int32_t rr = static_cast<int32_t>(r);
      for (int64_t i = 0; i < I; ++i) {
        float v = to_float(row[i]);
        if (PRODUCT) v *= to_float(row_b[i]);
        s[i] += v;
        if (WANT_MAX) {
          bool t = takes(v, m[i], ix[i]);
          m[i] = t ? v : m[i];
          ix[i] = t ? rr : ix[i];
        }
      }
    }
  }
}

// out = x * round(gate) (APPLY), or grad * round(gate) + bias + [r == argmax] * dmax.
template <typename T, bool BIAS, bool MAX>
void broadcast(const T* x, int64_t O, int64_t R, int64_t I, const int8_t* groups, int64_t G,
               int64_t N, const float* gate, const float* bias, const int32_t* am,
               const float* dmax, T* out, int threads) {
  const int64_t per_n = O / N;
  std::vector<float> masks;
  if (groups && I == 1 && G <= 2) {
    masks.resize(N * R);
    for (int64_t k = 0; k < N * R; ++k) masks[k] = groups[k] != 0 ? 1.f : 0.f;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t o = 0; o < O; ++o) {
    const T* xo = x + o * R * I;
    T* out_o = out + o * R * I;
    const int8_t* grp = groups ? groups + (o / per_n) * R : nullptr;
    const float* go = gate + o * G * I;
    const float* bo = BIAS ? bias + o * G * I : nullptr;
    const int32_t* io = MAX ? am + o * G * I : nullptr;
    const float* dm = MAX ? dmax + o * G * I : nullptr;
    if (I == 1) {
      float gq[kMaxGroups], bq[kMaxGroups], dq[kMaxGroups];
      int32_t iq[kMaxGroups];
      for (int64_t g = 0; g < G; ++g) {
        gq[g] = rounded(go[g], x);
        bq[g] = BIAS ? bo[g] : 0.f;
        iq[g] = MAX ? io[g] : -1;
        dq[g] = MAX ? dm[g] : 0.f;
      }
      if (!grp) {
        const float g0 = gq[0], b0 = bq[0];
        for (int64_t r = 0; r < R; ++r) {
          float v = to_float(xo[r]) * g0;
          if (BIAS) v += b0;
          store(out_o + r, v);
        }
        if (MAX && iq[0] >= 0) {  // the one position of the max: add its term
          const float v = to_float(xo[iq[0]]) * g0 + (BIAS ? b0 : 0.f) + dq[0];
          store(out_o + iq[0], v);
        }
        continue;
      }
      if (G <= 2) {  // a blend by the sample's 0/1 group mask instead of a lookup: vectorises
        const float* mk = masks.data() + (o / per_n) * R;
        // g0 * (1 - m) + g1 * m is exactly g0 or g1 for m in {0, 1} (g0 + m * (g1 - g0) is
        // not: g0 + (g1 - g0) can miss g1 by an ulp).
        const float g0 = gq[0], g1 = G > 1 ? gq[1] : gq[0];
        const float b0 = bq[0], b1 = G > 1 ? bq[1] : bq[0];
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) {
          const float m = mk[r], keep = 1.f - m;
          float v = to_float(xo[r]) * (g0 * keep + g1 * m);
          if (BIAS) v += b0 * keep + b1 * m;
          store(out_o + r, v);
        }
      } else {
        for (int64_t r = 0; r < R; ++r) {
          const int g = grp[r];
          float v = to_float(xo[r]) * gq[g];
          if (BIAS) v += bq[g];
          store(out_o + r, v);
        }
      }
      if (MAX)  // each group's one max position gets its term
        for (int64_t g = 0; g < G; ++g)
          if (iq[g] >= 0 && grp[iq[g]] == g)
            store(out_o + iq[g], to_float(xo[iq[g]]) * gq[g] + (BIAS ? bq[g] : 0.f) + dq[g]);
      continue;
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = grp ? grp[r] : 0;
      const T* row = xo + r * I;
      T* dst = out_o + r * I;
      const float* gg = go + g * I;
      const float* bb = BIAS ? bo + g * I : nullptr;
      const int32_t* ii = MAX ? io + g * I : nullptr;
      const float* dd = MAX ? dm + g * I : nullptr;
      const int32_t rr = static_cast<int32_t>(r);
      for (int64_t i = 0; i < I; ++i) {
        float v = to_float(row[i]) * rounded(gg[i], x);
        if (BIAS) v += bb[i];
        if (MAX) v += ii[i] == rr ? dd[i] : 0.f;
        store(dst + i, v);
      }
    }
  }
}

template <typename T>
void reduce_any(const void* a, const void* b, int64_t O, int64_t R, int64_t I,
                const int8_t* groups, int64_t G, int64_t N, float* sum, float* mx,
                int32_t* am, int threads) {
  const T* ta = static_cast<const T*>(a);
  const T* tb = static_cast<const T*>(b);
  if (b)
    reduce<T, false, true>(ta, tb, O, R, I, groups, G, N, sum, mx, am, threads);
  else if (mx)
    reduce<T, true, false>(ta, tb, O, R, I, groups, G, N, sum, mx, am, threads);
  else
    reduce<T, false, false>(ta, tb, O, R, I, groups, G, N, sum, mx, am, threads);
}

template <typename T>
void broadcast_any(const void* x, int64_t O, int64_t R, int64_t I, const int8_t* groups,
                   int64_t G, int64_t N, const float* gate, const float* bias,
                   const int32_t* am, const float* dmax, void* out, int threads) {
  const T* tx = static_cast<const T*>(x);
  T* to = static_cast<T*>(out);
  const bool with_max = am && dmax;
  if (bias && with_max)
    broadcast<T, true, true>(tx, O, R, I, groups, G, N, gate, bias, am, dmax, to, threads);
  else if (bias)
    broadcast<T, true, false>(tx, O, R, I, groups, G, N, gate, bias, am, dmax, to, threads);
  else if (with_max)
    broadcast<T, false, true>(tx, O, R, I, groups, G, N, gate, bias, am, dmax, to, threads);
  else
    broadcast<T, false, false>(tx, O, R, I, groups, G, N, gate, bias, am, dmax, to, threads);
}


typedef float vec16 __attribute__((vector_size(64)));

inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// --- the spatial gates' few-channel k x k conv to one channel ("same" zero padding) ---------
// in [B, C, H, W], weight [C, k, k], out [B, H, W], float32, contiguous. Each input row is
// copied once into a zero-padded buffer; the k x k taps are then vector loops over W.

void conv_forward(const float* in, int64_t B, int64_t C, int64_t H, int64_t W, const float* wt,
                  int64_t k, float* out, int threads) {
  // The sample's padded planes, then each output row in blocks of kConvBlock columns whose
  // partial sums stay in registers over all C * k * k taps.
  const int64_t p = k / 2, Hp = H + 2 * p, Wp = W + 2 * p + kConvBlock;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> pad(C * Hp * Wp, 0.f);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t h = 0; h < H; ++h)
          std::copy(in + ((b * C + c) * H + h) * W, in + ((b * C + c) * H + h + 1) * W,
                    pad.begin() + (c * Hp + h + p) * Wp + p);
      float* o = out + b * H * W;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w0 = 0; w0 < W; w0 += kConvBlock) {
          // Two 16-float vectors of partial sums held in registers over all C * k * k taps
          // (GCC vector extensions: AVX-512 registers where the CPU has them, pairs of AVX2
          // registers otherwise).
          vec16 acc0 = {}, acc1 = {};
          for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < k; ++i) {
              const float* src = pad.data() + (c * Hp + h + i) * Wp + w0;
              const float* wr = wt + (c * k + i) * k;
              for (int64_t j = 0; j < k; ++j) {
                const float wv = wr[j];
                acc0 += wv * load16(src + j);
                acc1 += wv * load16(src + j + 16);
              }
            }
          float acc[kConvBlock];
          std::memcpy(acc, &acc0, sizeof(acc0));
          std::memcpy(acc + 16, &acc1, sizeof(acc1));
          const int64_t n = std::min<int64_t>(kConvBlock, W - w0);
          std::copy(acc, acc + n, o + h * W + w0);
        }
    }
  }
}

void conv_backward_input(const float* grad, int64_t B, int64_t C, int64_t H, int64_t W,
                         const float* wt, int64_t k, float* grad_in, int threads) {
  // grad_in[c, h, w] = sum_ij wt[c, i, j] * grad[h - i + p, w - j + p]: the forward's loop
  // on the padded gradient plane with the taps turned 180 degrees.
  const int64_t p = k / 2, Hp = H + 2 * p, Wp = W + 2 * p + kConvBlock;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> pad(Hp * Wp, 0.f);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h)
        std::copy(grad + (b * H + h) * W, grad + (b * H + h + 1) * W,
                  pad.begin() + (h + p) * Wp + p);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w0 = 0; w0 < W; w0 += kConvBlock) {
            vec16 acc0 = {}, acc1 = {};
            for (int64_t i = 0; i < k; ++i) {
              // grad row h - i + p is padded row h - i + 2p
              const float* src = pad.data() + (h - i + 2 * p) * Wp + w0;
              const float* wr = wt + (c * k + i) * k;
              for (int64_t j = 0; j < k; ++j) {
                const float wv = wr[j];
                const float* sj = src + 2 * p - j;
                acc0 += wv * load16(sj);
                acc1 += wv * load16(sj + 16);
              }
            }
            float acc[kConvBlock];
            std::memcpy(acc, &acc0, sizeof(acc0));
            std::memcpy(acc + 16, &acc1, sizeof(acc1));
            const int64_t n = std::min<int64_t>(kConvBlock, W - w0);
            std::copy(acc, acc + n, grad_in + ((b * C + c) * H + h) * W + w0);
          }
    }
  }
}

void conv_backward_weight(const float* grad, const float* in, int64_t B, int64_t C, int64_t H,
                          int64_t W, int64_t k, float* grad_w, int threads) {
  // grad_w[c, i, j] = sum_{b, h, w} grad[b, h, w] * in[b, c, h + i - p, w + j - p]: per tap,
  // kConvBlock lane sums over all rows (in L1), added up across lanes and threads at the end.
  const int64_t p = k / 2, Hp = H + 2 * p, Wp = W + 2 * p + kConvBlock;
  const int64_t taps = C * k * k;
  std::fill(grad_w, grad_w + taps, 0.f);
  std::vector<double> partial(static_cast<size_t>(threads) * taps, 0.0);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> pad(C * Hp * Wp, 0.f);
    std::vector<float> lanes(taps * kConvBlock, 0.f);
    float row[kConvBlock];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t h = 0; h < H; ++h)
          std::copy(in + ((b * C + c) * H + h) * W, in + ((b * C + c) * H + h + 1) * W,
                    pad.begin() + (c * Hp + h + p) * Wp + p);
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w0 = 0; w0 < W; w0 += kConvBlock) {
          const int64_t n = std::min<int64_t>(kConvBlock, W - w0);
          for (int l = 0; l < kConvBlock; ++l) row[l] = l < n ? grad[(b * H + h) * W + w0 + l] : 0.f;
          for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < k; ++i) {
              const float* src = pad.data() + (c * Hp + h + i) * Wp + w0;
              float* lane = lanes.data() + (c * k + i) * k * kConvBlock;
              for (int64_t j = 0; j < k; ++j) {
                float* lj = lane + j * kConvBlock;
#pragma omp simd
                for (int l = 0; l < kConvBlock; ++l) lj[l] += row[l] * src[j + l];
              }
            }
        }
    }
    // Each thread's sums, added in thread order below: the same result on every run.
    const int me = omp_get_thread_num();
    for (int64_t t = 0; t < taps; ++t) {
      double total = 0.0;
      for (int l = 0; l < kConvBlock; ++l) total += lanes[t * kConvBlock + l];
      partial[me * taps + t] = total;
    }
  }
  for (int th = 0; th < threads; ++th)
    for (int64_t t = 0; t < taps; ++t) grad_w[t] += static_cast<float>(partial[th * taps + t]);
}


// --- triplet attention: the three single-dim reductions of one map in one pass -------------
// x is [N, D1, D2, D3] in memory order. Branch k reduces dim Dk: its results are indexed by
// the other two dims, in memory order ([N, D2, D3], [N, D1, D3], [N, D1, D2]). A branch
// whose sum pointer is null is skipped. Max ties keep the lowest index, NaN is the max.
struct Branch {
  float* sum;
  float* mx;
  int32_t* am;
};

template <typename T, bool PRODUCT>
void tri_reduce(const T* a, const T* b, int64_t N, int64_t D1, int64_t D2, int64_t D3,
                Branch k1, Branch k2, Branch k3, bool want_max, int threads) {
  const float inf = std::numeric_limits<float>::infinity();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buf(D3);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      float* s1 = k1.sum ? k1.sum + n * D2 * D3 : nullptr;
      float* s2 = k2.sum ? k2.sum + n * D1 * D3 : nullptr;
      float* s3 = k3.sum ? k3.sum + n * D1 * D2 : nullptr;
      float* m1 = want_max && s1 ? k1.mx + n * D2 * D3 : nullptr;
      float* m2 = want_max && s2 ? k2.mx + n * D1 * D3 : nullptr;
      float* m3 = want_max && s3 ? k3.mx + n * D1 * D2 : nullptr;
      int32_t* i1 = m1 ? k1.am + n * D2 * D3 : nullptr;
      int32_t* i2 = m2 ? k2.am + n * D1 * D3 : nullptr;
      int32_t* i3 = m3 ? k3.am + n * D1 * D2 : nullptr;
      if (s1) std::fill(s1, s1 + D2 * D3, 0.f);
      if (s2) std::fill(s2, s2 + D1 * D3, 0.f);
      if (m1) {
        std::fill(m1, m1 + D2 * D3, -inf);
        std::fill(i1, i1 + D2 * D3, -1);
      }
      if (m2) {
        std::fill(m2, m2 + D1 * D3, -inf);
        std::fill(i2, i2 + D1 * D3, -1);
      }
      const T* an = a + n * D1 * D2 * D3;
      const T* bn = PRODUCT ? b + n * D1 * D2 * D3 : nullptr;
      float* v = buf.data();
      for (int64_t d1 = 0; d1 < D1; ++d1) {
        if (s3)  // over D3, the contiguous dim: the rows d2 of this slab in blocks of kBlock
          for (int64_t d2 = 0; d2 < D2; d2 += kBlock) {
            const int64_t lanes = std::min<int64_t>(kBlock, D2 - d2);
            const int64_t at = d1 * D2 + d2;
            const T* rows = an + at * D3;
            const T* rows_b = PRODUCT ? bn + at * D3 : nullptr;
            if (m3 && lanes == kBlock)
              reduce_rows<T, true, PRODUCT, kBlock>(rows, rows_b, D3, nullptr, 1, lanes, s3 + at,
                                                    m3 + at, i3 + at);
            else if (m3)
              reduce_rows<T, true, PRODUCT, 0>(rows, rows_b, D3, nullptr, 1, lanes, s3 + at,
                                               m3 + at, i3 + at);
            else if (lanes == kBlock)
              reduce_rows<T, false, PRODUCT, kBlock>(rows, rows_b, D3, nullptr, 1, lanes,
                                                     s3 + at, nullptr, nullptr);
            else
              reduce_rows<T, false, PRODUCT, 0>(rows, rows_b, D3, nullptr, 1, lanes, s3 + at,
                                                nullptr, nullptr);
          }
        if (!s1 && !s2) continue;
        for (int64_t d2 = 0; d2 < D2; ++d2) {
          const T* row = an + (d1 * D2 + d2) * D3;
          const T* row_b = PRODUCT ? bn + (d1 * D2 + d2) * D3 : nullptr;
#pragma omp simd
          for (int64_t d3 = 0; d3 < D3; ++d3)
            v[d3] = PRODUCT ? to_float(row[d3]) * to_float(row_b[d3]) : to_float(row[d3]);
          if (s1) {
            float* r = s1 + d2 * D3;
#pragma omp simd
            for (int64_t d3 = 0; d3 < D3; ++d3) r[d3] += v[d3];
          }
          if (s2) {
            float* r = s2 + d1 * D3;
#pragma omp simd
            for (int64_t d3 = 0; d3 < D3; ++d3) r[d3] += v[d3];
          }
          if (m1) {
            float* mm = m1 + d2 * D3;
            int32_t* ii = i1 + d2 * D3;
            const int32_t at = static_cast<int32_t>(d1);
#pragma omp simd
            for (int64_t d3 = 0; d3 < D3; ++d3) {
              const bool t = takes(v[d3], mm[d3], ii[d3]);
              mm[d3] = t ? v[d3] : mm[d3];
              ii[d3] = t ? at : ii[d3];
            }
          }
          if (m2) {
            float* mm = m2 + d1 * D3;
            int32_t* ii = i2 + d1 * D3;
            const int32_t at = static_cast<int32_t>(d2);
#pragma omp simd
            for (int64_t d3 = 0; d3 < D3; ++d3) {
              const bool t = takes(v[d3], mm[d3], ii[d3]);
              mm[d3] = t ? v[d3] : mm[d3];
              ii[d3] = t ? at : ii[d3];
            }
          }
        }
      }
    }
  }
}

struct Terms {
  const float* gate;  // the branch's gate (already scaled by 1 / branches)
  const float* bias;
  const int32_t* am;
  const float* dmax;
};

// out = x * round(g1 + g2 + g3) (+ the branches' bias and max terms): the forward product, or
// the input gradient with grad for x. Absent terms read a zero gate / zero bias / no max
// (``tri_broadcast_any`` supplies the buffers), so the inner loop has no branches.
template <typename T, bool BIAS>
void tri_broadcast(const T* x, int64_t N, int64_t D1, int64_t D2, int64_t D3, Terms k1, Terms k2,
                   Terms k3, T* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d1 = 0; d1 < D1; ++d1)
      for (int64_t d2 = 0; d2 < D2; ++d2) {
        const int64_t base = ((n * D1 + d1) * D2 + d2) * D3;
        const T* row = x + base;
        T* dst = out + base;
        const int64_t o1 = n * D2 * D3 + d2 * D3, o2 = n * D1 * D3 + d1 * D3;
        const int64_t o3 = (n * D1 + d1) * D2 + d2;
        const float* g1 = k1.gate + o1;
        const float* g2 = k2.gate + o2;
        const float g3 = k3.gate[o3];
        const float* b1 = BIAS ? k1.bias + o1 : nullptr;
        const float* b2 = BIAS ? k2.bias + o2 : nullptr;
        const int32_t* a1 = BIAS ? k1.am + o1 : nullptr;
        const int32_t* a2 = BIAS ? k2.am + o2 : nullptr;
        const float* e1 = BIAS ? k1.dmax + o1 : nullptr;
        const float* e2 = BIAS ? k2.dmax + o2 : nullptr;
        const float b3 = BIAS ? k3.bias[o3] : 0.f;
        const int32_t a3 = BIAS ? k3.am[o3] : -1;
        const float e3 = BIAS ? k3.dmax[o3] : 0.f;
        const int32_t i1 = static_cast<int32_t>(d1), i2 = static_cast<int32_t>(d2);
#pragma omp simd
        for (int64_t d3 = 0; d3 < D3; ++d3) {
          // (g1 + g2) + g3: the PyTorch path's order, so the rounding agrees
          const float g = (g1[d3] + g2[d3]) + g3;
          float v = to_float(row[d3]) * rounded(g, x);
          if (BIAS) {
            v += b1[d3] + b2[d3] + b3;
            v += (a1[d3] == i1 ? e1[d3] : 0.f) + (a2[d3] == i2 ? e2[d3] : 0.f) +
                 (a3 == static_cast<int32_t>(d3) ? e3 : 0.f);
          }
          store(dst + d3, v);
        }
      }
}

// Fills the absent terms with zeros (gate, bias, dmax) and -1 (argmax), then runs the loop.
template <typename T>
void tri_broadcast_any(const T* x, int64_t N, int64_t D1, int64_t D2, int64_t D3, Terms k1,
                       Terms k2, Terms k3, bool terms, T* out, int threads) {
  const int64_t most = std::max({D2 * D3, D1 * D3, D1 * D2}) * N;
  std::vector<float> zeros;
  std::vector<int32_t> none;
  Terms* all[3] = {&k1, &k2, &k3};
  for (Terms* k : all) {
    const bool need = !k->gate || (terms && (!k->bias || !k->am || !k->dmax));
    if (need && zeros.empty()) {
      zeros.assign(most, 0.f);
      none.assign(most, -1);
    }
    if (!k->gate) k->gate = zeros.data();
    if (terms) {
      if (!k->bias) k->bias = zeros.data();
      if (!k->am || !k->dmax) {
        k->am = none.data();
        k->dmax = zeros.data();
      }
    }
  }
  if (terms)
    tri_broadcast<T, true>(x, N, D1, D2, D3, k1, k2, k3, out, threads);
  else
    tri_broadcast<T, false>(x, N, D1, D2, D3, k1, k2, k3, out, threads);
}

}  // namespace

extern "C" {

int attnzoo_gates_version() { return 2; }

// sum [O, G, I] (and max, argmax when mx and am are not null) of a over r, or of a * b when b
// is not null (then mx and am must be null).
int attnzoo_gate_reduce(int dtype, const void* a, const void* b, int64_t O, int64_t R,
                        int64_t I, const int8_t* groups, int64_t G, int64_t N, float* sum,
                        float* mx, int32_t* am, int threads) {
  if (G < 1 || G > kMaxGroups || N < 1 || O % N) return 1;
  if (dtype == 0)
    reduce_any<float>(a, b, O, R, I, groups, G, N, sum, mx, am, threads);
  else if (dtype == 1)
    reduce_any<bf16>(a, b, O, R, I, groups, G, N, sum, mx, am, threads);
  else
    return 2;
  return 0;
}

// out = x * gate (bias, am, dmax null), or grad * gate + bias + [r == am] * dmax.
int attnzoo_gate_broadcast(int dtype, const void* x, int64_t O, int64_t R, int64_t I,
                           const int8_t* groups, int64_t G, int64_t N, const float* gate,
                           const float* bias, const int32_t* am, const float* dmax, void* out,
                           int threads) {
  if (G < 1 || G > kMaxGroups || N < 1 || O % N) return 1;
  if (dtype == 0)
    broadcast_any<float>(x, O, R, I, groups, G, N, gate, bias, am, dmax, out, threads);
  else if (dtype == 1)
    broadcast_any<bf16>(x, O, R, I, groups, G, N, gate, bias, am, dmax, out, threads);
  else
    return 2;
  return 0;
}

// The gates' C -> 1 k x k conv: out (B, H, W) = conv(in, weight) (what 0), or the input
// gradient (1, into grad_in [B, C, H, W]) or the weight gradient (2, into grad_w [C, k, k]).
int attnzoo_gate_conv(int what, const float* in, const float* grad, int64_t B, int64_t C,
                      int64_t H, int64_t W, const float* wt, int64_t k, float* out,
                      int threads) {
  if (k < 1 || k % 2 == 0) return 1;
  if (what == 0)
    conv_forward(in, B, C, H, W, wt, k, out, threads);
  else if (what == 1)
    conv_backward_input(grad, B, C, H, W, wt, k, out, threads);
  else if (what == 2)
    conv_backward_weight(grad, in, B, C, H, W, k, out, threads);
  else
    return 2;
  return 0;
}

// Triplet's reductions (see tri_reduce); b non-null: of a * b, sums only.
int attnzoo_tri_reduce(int dtype, const void* a, const void* b, int64_t N, int64_t D1,
                       int64_t D2, int64_t D3, float* s1, float* m1, int32_t* i1, float* s2,
                       float* m2, int32_t* i2, float* s3, float* m3, int32_t* i3,
                       int want_max, int threads) {
  Branch k1{s1, m1, i1}, k2{s2, m2, i2}, k3{s3, m3, i3};
  const bool wm = want_max && !b;
  if (dtype == 0) {
    if (b)
      tri_reduce<float, true>(static_cast<const float*>(a), static_cast<const float*>(b), N, D1,
                              D2, D3, k1, k2, k3, false, threads);
    else
      tri_reduce<float, false>(static_cast<const float*>(a), nullptr, N, D1, D2, D3, k1, k2, k3,
                               wm, threads);
  } else if (dtype == 1) {
    if (b)
      tri_reduce<bf16, true>(static_cast<const bf16*>(a), static_cast<const bf16*>(b), N, D1, D2,
                             D3, k1, k2, k3, false, threads);
    else
      tri_reduce<bf16, false>(static_cast<const bf16*>(a), nullptr, N, D1, D2, D3, k1, k2, k3, wm,
                              threads);
  } else {
    return 2;
  }
  return 0;
}

// Triplet's product / input gradient (see tri_broadcast); per branch: gate, bias, argmax,
// dmax (null: absent).
int attnzoo_tri_broadcast(int dtype, const void* x, int64_t N, int64_t D1, int64_t D2,
                          int64_t D3, const float* g1, const float* b1, const int32_t* a1,
                          const float* d1, const float* g2, const float* b2, const int32_t* a2,
                          const float* d2, const float* g3, const float* b3, const int32_t* a3,
                          const float* d3, void* out, int threads) {
  Terms k1{g1, b1, d1 ? a1 : nullptr, d1}, k2{g2, b2, d2 ? a2 : nullptr, d2};
  Terms k3{g3, b3, d3 ? a3 : nullptr, d3};
  const bool terms = b1 || b2 || b3 || d1 || d2 || d3;
  if (dtype == 0)
    tri_broadcast_any<float>(static_cast<const float*>(x), N, D1, D2, D3, k1, k2, k3, terms,
                             static_cast<float*>(out), threads);
  else if (dtype == 1)
    tri_broadcast_any<bf16>(static_cast<const bf16*>(x), N, D1, D2, D3, k1, k2, k3, terms,
                            static_cast<bf16*>(out), threads);
  else
    return 2;
  return 0;
}

}  // extern "C"
