// Native CPU kernels of nqkv: blockwise quantize / dequantize of rows, and decode attention that
// reads packed codes in place.
//
// A plain C ABI on raw pointers, loaded with ctypes (as Inductor loads the C++ it generates) by
// nqkv_core/native.py, which owns every check: shapes, dtypes, strides and ranges are validated in
// Python before a pointer reaches this file. No torch headers, so the library builds in a few
// seconds with the system compiler, for whatever torch version is installed.
//
// Storage layout (docs/design.md): codes are packed along a row's last axis -- 4-bit: code d in
// byte d/2 at bit 4*(d%2); 2-bit: byte d/4, bit 2*(d%4); 8-bit: one byte; 3-bit: a 2-bit plane of
// the low bits in bytes [0, D/4) and a 1-bit plane of the high bit in bytes [D/4, 3D/8). An element
// decodes to codebook[code] * absmax[its block].
//
// The hot loops have an AVX-512 version (a codebook of up to 16 levels fits one zmm register, so
// `vpermps` decodes sixteen 2-, 3- or 4-bit codes in one instruction), an AVX2 version for CPUs
// without AVX-512 (eight lanes; a 16-level lookup is two permutes and a blend) and a portable
// scalar version (other CPUs, head dims and blocks).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// -- scalar helpers --------------------------------------------------------------------------------

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float half_to_float(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float mag;
  if (exp == 0) {
    mag = std::ldexp((float)man, -24);  // zero or subnormal
  } else if (exp == 31) {
    mag = man ? NAN : INFINITY;
  } else {
    mag = bits_to_float(((exp + 112) << 23) | (man << 13));
  }
  return bits_to_float(float_to_bits(mag) | sign);
#endif
}

// Round to nearest even, as torch's float -> bfloat16 cast (inputs here are finite).
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Full-precision token rows (sinks, ring) are fp32 or bf16 (`bf16` set): read / write n elements at
// element offset i. A bf16 store rounds to nearest even as torch's cast does, NaN staying NaN.
inline void load_fp(const void* p, int64_t i, int64_t n, int bf16, float* dst) {
  if (!bf16) {
    std::memcpy(dst, (const float*)p + i, n * sizeof(float));
    return;
  }
  const uint16_t* h = (const uint16_t*)p + i;
  for (int64_t e = 0; e < n; ++e) dst[e] = bits_to_float((uint32_t)h[e] << 16);
}

inline uint16_t bf16_bits(float f) {
  return f != f ? (uint16_t)((float_to_bits(f) >> 16) | 0x40u) : float_to_bf16(f);
}

inline void store_fp(void* p, int64_t i, int64_t n, int bf16, const float* src) {
  if (!bf16) {
    std::memcpy((float*)p + i, src, n * sizeof(float));
    return;
  }
  uint16_t* h = (uint16_t*)p + i;
  for (int64_t e = 0; e < n; ++e) h[e] = bf16_bits(src[e]);
}

// x rounded to what the full-precision rows store (bf16: to nearest even, in place).
inline void round_fp(float* x, int64_t n, int bf16) {
  if (bf16)
    for (int64_t e = 0; e < n; ++e) x[e] = bits_to_float((uint32_t)bf16_bits(x[e]) << 16);
}

// Stored block scales (scale_fmt): 0 fp32, 1 fp16 bits, 2 E5M3 bytes (the fp16 bits 14..7, as
// nqkv_core.quantize.E5M3: byte k is the fp16 with bits k << 7).
enum ScaleFormat { SCALE_F32 = 0, SCALE_F16 = 1, SCALE_E5M3 = 2 };

// The value of every E5M3 byte (one load in the decode loops instead of a shift and a conversion).
struct E5M3Table {
  float v[256];
  E5M3Table() {
    for (int k = 0; k < 256; ++k) v[k] = half_to_float((uint16_t)(k << 7));
  }
};
static const E5M3Table e5m3_values;

inline float load_scale(const void* p, int64_t i, int fmt) {
  if (fmt == SCALE_E5M3) return e5m3_values.v[((const uint8_t*)p)[i]];
  return fmt == SCALE_F16 ? half_to_float(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

inline int code_at(const uint8_t* row, int bits, int64_t row_len, int64_t d) {
  switch (bits) {
    case 4: return (row[d >> 1] >> ((d & 1) * 4)) & 15;
    case 2: return (row[d >> 2] >> ((d & 3) * 2)) & 3;
    case 8: return row[d];
    default:  // 3-bit: low plane, then high plane
      return ((row[d >> 2] >> ((d & 3) * 2)) & 3) | (((row[row_len / 4 + (d >> 3)] >> (d & 7)) & 1) << 2);
  }
}

// fp32 absmax rounded up to the fp16 grid, exactly as nqkv_core.quantize._round_up: ceil to a
// multiple of the fp16 spacing at the value's exponent, so |x / s| <= 1 with the stored scale.
inline float round_up_half(float a) {
  int e;
  std::frexp(a, &e);
  if (e < -13) e = -13;  // subnormals share the smallest normal spacing
  const float spacing = std::ldexp(1.0f, e - 11);
  return std::ceil(a / spacing) * spacing;
}

// fp32 value rounded to the nearest fp16 value (ties to even), in fp32, as
// nqkv_core.quantize._round_nearest; the caller checks the range.
inline float round_nearest_half(float a) {
  int e;
  std::frexp(a, &e);
  if (e < -13) e = -13;
  const float spacing = std::ldexp(1.0f, e - 11);
  return std::nearbyint(a / spacing) * spacing;
}

// fp16 bits of a value that fp16 represents exactly (a scale rounded by round_up_half).
inline uint16_t half_bits_exact(float a) {
  if (a == 0.f) return 0;
  int e;
  std::frexp(a, &e);  // a = m * 2**e, m in [0.5, 1)
  if (e < -13) return (uint16_t)(a * 16777216.0f);  // subnormal: a multiple of 2**-24
  return (uint16_t)(((e + 14) << 10) | (uint16_t)((std::ldexp(a, 1 - e) - 1.0f) * 1024.0f));
}

// The E5M3 byte nearest a finite absmax of at most fp16's largest value, as
// nqkv_core.quantize._e5m3_bytes: the nearest fp16, then the nearest multiple of 128 of its bits
// (ties up), at most 0xF7.
inline uint8_t e5m3_byte(float a) {
  if (!(a <= 65504.f)) return 0xF7;  // (NaN or beyond: flagged by the caller, which raises)
  const uint32_t bits = half_bits_exact(round_nearest_half(a));
  const uint32_t k = (bits + 64) >> 7;
  return (uint8_t)(k < 0xF7 ? k : 0xF7);
}

// A finite scale rounded as format fmt stores it: up to fp16 (the absmax scale: |x / s| <= 1), to
// the nearest E5M3 value, or kept (fp32). `nearest`: fp16 rounds to nearest (a fitted scale).
inline float coding_scale(float a, int fmt, bool nearest) {
  if (fmt == SCALE_E5M3) return half_to_float((uint16_t)(e5m3_byte(a) << 7));
  if (fmt == SCALE_F16) return nearest ? round_nearest_half(a) : round_up_half(a);
  return a;
}

// A scale that format fmt represents exactly (coding_scale's result), stored at index i.
inline void store_scale(void* p, int64_t i, int fmt, float a) {
  if (fmt == SCALE_E5M3) ((uint8_t*)p)[i] = (uint8_t)(half_bits_exact(a) >> 7);
  else if (fmt == SCALE_F16) ((uint16_t*)p)[i] = half_bits_exact(a);
  else ((float*)p)[i] = a;
}

// -- one row of codes -> levels ----------------------------------------------------------------------

#ifdef __AVX512F__
// Sixteen fp32 to bf16 bits, rounding to nearest even.
inline __m256i to_bf16(__m512 v) {
#ifdef __AVX512BF16__
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16));
#endif
}
#endif

// Levels of the D codes of one token row times their block scales, into out[0, D) as fp32, or as
// bf16 bits into out_bf16 when that is not null.
void decode_row(const uint8_t* row, const float* scales, const float* cb, int bits, int64_t D, int64_t block,
                float* out, uint16_t* out_bf16 = nullptr) {
#ifdef __AVX512F__
  if (bits == 4 && block % 32 == 0) {
    const __m512 levels = _mm512_loadu_ps(cb);
    const __m512i nibble = _mm512_set1_epi32(15);
    // interleave even (low nibble) and odd (high nibble) codes back into row order
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t d = 0; d < D; d += 32) {
      const __m512 s = _mm512_set1_ps(scales[d / block]);
      const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + d / 2)));
      const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(w, nibble), levels);
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), levels);
      const __m512 a = _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), s);
      const __m512 b = _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), s);
      if (out_bf16) {
        _mm256_storeu_si256((__m256i*)(out_bf16 + d), to_bf16(a));
        _mm256_storeu_si256((__m256i*)(out_bf16 + d + 16), to_bf16(b));
      } else {
        _mm512_storeu_ps(out + d, a);
        _mm512_storeu_ps(out + d + 16, b);
      }
    }
    return;
  }
#endif
#ifdef __AVX2__
  // Without AVX-512, or blocks of 16: a 16-entry lookup as two 8-entry ones.
  if (bits == 4 && block % 16 == 0) {
    const __m256 levels_lo = _mm256_loadu_ps(cb), levels_hi = _mm256_loadu_ps(cb + 8);
    const __m256i nibble = _mm256_set1_epi32(15);
    auto lookup = [&](__m256i c) {  // bit 3 of the code (moved to the sign bit) picks the half
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(levels_lo, c), _mm256_permutevar8x32_ps(levels_hi, c),
                              _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
    };
    for (int64_t d = 0; d < D; d += 16) {
      const __m256 s = _mm256_set1_ps(scales[d / block]);
      const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + d / 2)));
      const __m256 even = lookup(_mm256_and_si256(w, nibble)), odd = lookup(_mm256_srli_epi32(w, 4));
      // back into row order: unpack interleaves within 128-bit halves, permute2f128 joins them
      const __m256 x0 = _mm256_unpacklo_ps(even, odd), x1 = _mm256_unpackhi_ps(even, odd);
      const __m256 a = _mm256_mul_ps(_mm256_permute2f128_ps(x0, x1, 0x20), s);
      const __m256 b = _mm256_mul_ps(_mm256_permute2f128_ps(x0, x1, 0x31), s);
      if (out_bf16) {
        alignas(32) float tmp[16];
        _mm256_store_ps(tmp, a);
        _mm256_store_ps(tmp + 8, b);
        for (int i = 0; i < 16; ++i) out_bf16[d + i] = float_to_bf16(tmp[i]);
      } else {
        _mm256_storeu_ps(out + d, a);
        _mm256_storeu_ps(out + d + 8, b);
      }
    }
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) {
    const float x = cb[code_at(row, bits, D, d)] * scales[d / block];
    if (out_bf16) out_bf16[d] = float_to_bf16(x); else out[d] = x;
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
#ifdef __AVX512F__
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (n % 16 == 0) {  // two chains of FMAs; one would wait on each FMA's latency
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    const __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
#endif
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {  // y += w * x
#ifdef __AVX512F__
  if (n % 16 == 0) {
    const __m512 wv = _mm512_set1_ps(w);
    for (int64_t i = 0; i < n; i += 16)
      _mm512_storeu_ps(y + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (n % 8 == 0) {
    const __m256 wv = _mm256_set1_ps(w);
    for (int64_t i = 0; i < n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// y = x @ M for a row x of n and M (n, cols) row-major; M null: y = x (cols == n).
inline void row_times(const float* x, const float* M, int64_t n, int64_t cols, float* y) {
  if (!M) {
    std::memcpy(y, x, n * sizeof(float));
    return;
  }
  for (int64_t e = 0; e < cols; ++e) y[e] = 0.f;
  for (int64_t d = 0; d < n; ++d) axpy(x[d], M + d * cols, y, cols);
}

// max(x[0..n)), -inf for n = 0. (A scalar `m = x > m ? x : m` loop is one dependent chain the
// compiler cannot vectorize, which cost a tenth of a decode call at 4k tokens.)
float row_max(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -INFINITY;
#ifdef __AVX512F__
  __m512 mv = _mm512_set1_ps(-INFINITY), mv2 = mv;
  for (; i + 32 <= n; i += 32) {
    mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + i));
    mv2 = _mm512_max_ps(mv2, _mm512_loadu_ps(x + i + 16));
  }
  m = _mm512_reduce_max_ps(_mm512_max_ps(mv, mv2));
#elif defined(__AVX2__)
  __m256 mv = _mm256_set1_ps(-INFINITY), mv2 = mv;
  for (; i + 16 <= n; i += 16) {
    mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
    mv2 = _mm256_max_ps(mv2, _mm256_loadu_ps(x + i + 8));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(mv, mv2));
  for (float l : lanes) m = l > m ? l : m;
#endif
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// exp(t) = 2^k * p(r), t = k ln2 + r, |r| <= ln2 / 2, p(r) = 1 + r + r^2 (c0 + r (c1 + ...)), a
// degree-6 polynomial (rel. error ~2e-7); t below kExpFloor underflows to 0.
constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f, kExpFloor = -87.0f;
constexpr float kExpPoly[5] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                               5.0000001201e-1f};

// In place: x[i] = exp(x[i] - m), returns the sum. exp(-inf) is exactly 0; a NaN x[i] (or m) stays
// NaN and makes the sum NaN, as torch.softmax's: the comparison that zeroes underflowing lanes is
// true for NaN (unordered), and max(floor, t) returns its second operand, t, when t is NaN.
float exp_shift_sum(float* x, int64_t n, float m) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef __AVX512F__
  const __m512 mv = _mm512_set1_ps(m), log2e = _mm512_set1_ps(kLog2e);
  const __m512 ln2_hi = _mm512_set1_ps(kLn2Hi), ln2_lo = _mm512_set1_ps(kLn2Lo), lo_clamp = _mm512_set1_ps(kExpFloor);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 t = _mm512_sub_ps(_mm512_loadu_ps(x + i), mv);
    const __mmask16 live = _mm512_cmp_ps_mask(t, lo_clamp, _CMP_NLT_UQ);  // below: underflows to 0
    const __m512 tc = _mm512_max_ps(lo_clamp, t);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(tc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, ln2_hi, tc);
    r = _mm512_fnmadd_ps(k, ln2_lo, r);
    __m512 p = _mm512_set1_ps(kExpPoly[0]);
    for (int c = 1; c < 5; ++c) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[c]));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512 e = _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, k));
    _mm512_storeu_ps(x + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
  // 2^k from the exponent bits (tc >= kExpFloor and t <= 0 keep k in [-126, 0]).
  const __m256 mv = _mm256_set1_ps(m), log2e = _mm256_set1_ps(kLog2e);
  const __m256 ln2_hi = _mm256_set1_ps(kLn2Hi), ln2_lo = _mm256_set1_ps(kLn2Lo), lo_clamp = _mm256_set1_ps(kExpFloor);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 t = _mm256_sub_ps(_mm256_loadu_ps(x + i), mv);
    const __m256 live = _mm256_cmp_ps(t, lo_clamp, _CMP_NLT_UQ);
    const __m256 tc = _mm256_max_ps(lo_clamp, t);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(tc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, ln2_hi, tc);
    r = _mm256_fnmadd_ps(k, ln2_lo, r);
    __m256 p = _mm256_set1_ps(kExpPoly[0]);
    for (int c = 1; c < 5; ++c) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[c]));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127));
    const __m256 e = _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23))), live);
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float l : lanes) sum += l;
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  return sum;
}

// A RoPE [cos | sin] table held compactly (nqkv_core/cache/format.py, RopeTable): starts (P / 16, D),
// row t the angles of position 16 t; offsets (D, 16), element d of position l < 16 at [d, l]. Row
// p is the angle addition of start p / 16 and offset p % 16 (compact_row).
struct RopeCompact {
  const float* starts;
  const float* offsets;
};

constexpr int64_t kMaxBiasDim = 256;  // head_dim of the register paths' key bias (fast_path)

// w' with w' . [cos | sin](b) = w . [cos | sin](a + b) for every offset angle b: each (cos, sin)
// weight pair of w (D) turned by the angles a of one table row (start, D).
inline void tile_weights(const float* w, int64_t D, const float* start, float* out) {
  const int64_t H = D / 2;
  for (int64_t i = 0; i < H; ++i) {
    const float c = start[i], sn = start[H + i], a = w[i], b = w[H + i];
    out[i] = a * c + b * sn;
    out[H + i] = b * c - a * sn;
  }
}

// One packed history (K or V): codes (B, H, T, row_bytes) and absmax (B, H, T, D / block) with
// element strides for the batch, head and token axes; rows of codes and of scales are contiguous.
struct Packed {
  const uint8_t* codes;
  int64_t cs_b, cs_h, cs_t;
  const void* absmax;
  int64_t as_b, as_h, as_t;
  int scale_fmt;
  const float* codebook;  // 2**bits levels
  int bits;
  int64_t block;
};

inline const uint8_t* packed_row(const Packed& p, int64_t b, int64_t h, int64_t j) {
  return p.codes + b * p.cs_b + h * p.cs_h + j * p.cs_t;
}

inline int64_t scale_index(const Packed& p, int64_t b, int64_t h, int64_t j) {
  return b * p.as_b + h * p.as_h + j * p.as_t;
}

// Token j of (batch b, KV head h) as fp32: packed history tokens (j < t_hist) are decoded into
// `row` (with `scales` as scratch); tail tokens are read in place from `tail`.
inline const float* token_row(const Packed& p, const float* codebook, const float* tail, int64_t b, int64_t h,
                              int64_t bh, int64_t j, int64_t t_hist, int64_t t_tail, int64_t dim, float* scales,
                              float* row) {
  if (j >= t_hist) return tail + (bh * t_tail + (j - t_hist)) * dim;
  const int64_t nb = dim / p.block, ai = scale_index(p, b, h, j);
  for (int64_t i = 0; i < nb; ++i) scales[i] = load_scale(p.absmax, ai + i, p.scale_fmt);
  decode_row(packed_row(p, b, h, j), scales, codebook, p.bits, dim, p.block, row);
  return row;
}

// Lane order: how the register decoders below emit codes, L lanes per vector (16 with AVX-512, 8
// with AVX2), without interleaving them back. 4-bit: the 2L codes of L bytes as [even | odd] (low
// and high nibbles), so with L = 16 a group of 64 is [even 0-30 | odd 1-31 | even 32-62 | odd 33-63];
// 2- and 3-bit: the 4L codes of L bytes as [codes 4i | 4i+1 | 4i+2 | 4i+3], i < L (the 2-bit
// fields of each byte). A dot product does not depend on the order, so queries are put in lane
// order once per call and keys are never reordered; value outputs are summed in lane order and
// reordered once.
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
inline int lane_position(int bits, int d) {  // d in [0, 64)
  return bits == 4 ? (d / (2 * kLanes)) * 2 * kLanes + (d & 1) * kLanes + (d % (2 * kLanes)) / 2
                   : (d / (4 * kLanes)) * 4 * kLanes + (d & 3) * kLanes + (d % (4 * kLanes)) / 4;
}

#ifdef __AVX512F__
// -- decode attention in registers: 2/3/4-bit codes, head_dim = 16 * ND (64 or 128) ------------------
#define NQKV_REGISTER_PATH 1

// Whether a side can take the register path: a 4-bit vector mixes 32 consecutive codes, which must
// share a scale; a 2/3-bit vector mixes a whole group of 64 (lane i: codes 4i..4i+3), which may
// span blocks of 16 or more (one scale per lane then).
inline bool fast_path(const Packed& p, int64_t dim) {
  return (dim == 64 || dim == 128) && (p.bits == 4 ? p.block % 32 == 0 : (p.bits == 2 || p.bits == 3) && p.block % 16 == 0);
}

// Group g (codes [64g, 64g + 64)) of a row of D codes, times their scales (Scaled) or as bare
// codebook levels (for a caller that applies the group's one scale to a sum), in lane order.
// `levels`: the codebook padded to sixteen entries; si: index of the row's first scale.
template <bool Scaled = true>
inline void decode_group(const Packed& p, const uint8_t* row, int64_t D, int g, int64_t si, __m512 levels, __m512* out) {
  const int64_t d0 = 64 * g;
  if (p.bits == 4) {
    for (int half = 0; half < 2; ++half) {
      const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + d0 / 2 + 16 * half)));
      out[2 * half] = _mm512_permutexvar_ps(_mm512_and_si512(w, _mm512_set1_epi32(15)), levels);
      out[2 * half + 1] = _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), levels);
      if (Scaled) {
        const __m512 s = _mm512_set1_ps(load_scale(p.absmax, si + (d0 + 32 * half) / p.block, p.scale_fmt));
        out[2 * half] = _mm512_mul_ps(out[2 * half], s);
        out[2 * half + 1] = _mm512_mul_ps(out[2 * half + 1], s);
      }
    }
    return;
  }
  const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + d0 / 4)));  // lane i: byte i
  __m512i high = _mm512_setzero_si512();
  if (p.bits == 3) {  // code 4i+f has its high bit in plane byte i/2, bit 4*(i%2) + f
    const __m128i hb = _mm_loadl_epi64((const __m128i*)(row + D / 4 + d0 / 8));
    high = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hb, hb));  // lane i: plane byte i/2
  }
  const __m512i odd_nibble = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  for (int f = 0; f < 4; ++f) {
    __m512i c = _mm512_and_si512(_mm512_srli_epi32(w, 2 * f), _mm512_set1_epi32(3));
    if (p.bits == 3) {
      const __m512i bit = _mm512_srlv_epi32(high, _mm512_add_epi32(odd_nibble, _mm512_set1_epi32(f)));
      c = _mm512_or_si512(c, _mm512_slli_epi32(_mm512_and_si512(bit, _mm512_set1_epi32(1)), 2));
    }
    out[f] = _mm512_permutexvar_ps(c, levels);
  }
  if (Scaled) {
    __m512 s;
    if (p.block % 64 == 0) {
      s = _mm512_set1_ps(load_scale(p.absmax, si + d0 / p.block, p.scale_fmt));
    } else if (p.block == 32) {  // lanes 0-7: the group's first block, lanes 8-15: its second
      const int64_t i0 = si + d0 / 32;
      s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(load_scale(p.absmax, i0, p.scale_fmt)),
                               _mm512_set1_ps(load_scale(p.absmax, i0 + 1, p.scale_fmt)));
    } else {  // blocks of 16: lane i holds codes 4i..4i+3 of the group, all in block (d0 + 4i) / block
      alignas(64) float lane[16];
      for (int i = 0; i < 16; ++i) lane[i] = load_scale(p.absmax, si + (d0 + 4 * i) / p.block, p.scale_fmt);
      s = _mm512_load_ps(lane);
    }
    for (int f = 0; f < 4; ++f) out[f] = _mm512_mul_ps(out[f], s);
  }
}

template <int ND, bool Scaled = true>
inline void decode_row_lanes(const Packed& p, const uint8_t* row, int64_t si, __m512 levels, __m512* out) {
  for (int g = 0; g < ND / 4; ++g) decode_group<Scaled>(p, row, 16 * ND, g, si, levels, out + 4 * g);
}

// Whether every group of 64 codes has one scale, which can then multiply a sum instead of each code.
inline bool scale_per_group(const Packed& p) { return p.block % 64 == 0; }

// The four horizontal sums of x0..x3, in one 128-bit vector.
inline __m128 reduce4(__m512 x0, __m512 x1, __m512 x2, __m512 x3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(x0, x1), _mm512_unpackhi_ps(x0, x1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(x2, x3), _mm512_unpackhi_ps(x2, x3));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 y = _mm256_add_ps(_mm512_castps512_ps256(w),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
}

// s[r * Tk + j] = q_r . k_j (+ w_r . table[pos[j]] when w is not null) for packed tokens j in
// [j0, j1). q: R rows in lane order, padded with zero rows to a multiple of four, so four dot
// products share one reduction; w (original order, padded the same way) meets table rows in the
// same reduction.
template <int ND>
void scores_fast(const Packed& k, const float* levels16, int64_t b, int64_t h, const float* q, const float* w,
                 const float* table, const int64_t* pos, int64_t R, int64_t j0, int64_t j1, float* s, int64_t Tk) {
  constexpr int64_t D = 16 * ND;
  const __m512 levels = _mm512_loadu_ps(levels16);
  alignas(16) float sums[4];
  for (int64_t j = j0; j < j1; ++j) {
    __m512 kv[ND];
    decode_row_lanes<ND>(k, packed_row(k, b, h, j), scale_index(k, b, h, j), levels, kv);
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const float* qr = q + r0 * D;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int i = 0; i < ND; ++i) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + i * 16), kv[i], a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + D + i * 16), kv[i], a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 2 * D + i * 16), kv[i], a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 3 * D + i * 16), kv[i], a3);
      }
      if (w) {  // the score offset of the key's position, in the same reduction
        const float* wr = w + r0 * D;
        const float* tr = table + pos[j] * D;
        for (int i = 0; i < ND; ++i) {
          const __m512 t = _mm512_loadu_ps(tr + i * 16);
          a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + i * 16), t, a0);
          a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + D + i * 16), t, a1);
          a2 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + 2 * D + i * 16), t, a2);
          a3 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + 3 * D + i * 16), t, a3);
        }
      }
      _mm_store_ps(sums, reduce4(a0, a1, a2, a3));
      for (int64_t r = r0; r < R && r < r0 + 4; ++r) s[r * Tk + j] = sums[r - r0];
    }
  }
}

// The R <= 4 dot products of 64-wide rows held in registers with x (four vectors), in one
// reduction; the lanes of rows R..3 are zero.
template <int R>
__attribute__((always_inline)) inline __m128 dot_rows_64(const __m512 (&rows)[R][4], const __m512* x) {
  __m512 a[4];
  for (int r = 0; r < 4; ++r) {
    if (r >= R) {
      a[r] = _mm512_setzero_ps();
      continue;
    }
    a[r] = _mm512_mul_ps(rows[r][0], x[0]);
    for (int i = 1; i < 4; ++i) a[r] = _mm512_fmadd_ps(rows[r][i], x[i], a[r]);
  }
  return reduce4(a[0], a[1], a[2], a[3]);
}

// scores_fast for head_dim 64 and R <= 4 query rows (a decode step of a model with up to four query
// heads per KV head): the query rows stay in registers across the tokens, only the R real rows are
// multiplied, and with one scale per token (Factored) the scale multiplies the R sums instead of
// the 64 codes. The score offset is a second pass with the bias weights in registers, so each token
// costs its codes and one table row of loads instead of the query and weight rows again.
template <int R, bool Factored>
void scores_fast_64(const Packed& k, const float* levels16, int64_t b, int64_t h, const float* q, const float* w,
                    const float* table, const int64_t* pos, int64_t j0, int64_t j1, float* s, int64_t Tk) {
  const __m512 levels = _mm512_loadu_ps(levels16);
  alignas(16) float sums[4];
  __m512 qv[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) qv[r][i] = _mm512_loadu_ps(q + r * 64 + i * 16);
  for (int64_t j = j0; j < j1; ++j) {
    __m512 kv[4];
    const int64_t si = scale_index(k, b, h, j);
    decode_row_lanes<4, !Factored>(k, packed_row(k, b, h, j), si, levels, kv);
    __m128 sum = dot_rows_64<R>(qv, kv);
    if (Factored) sum = _mm_mul_ps(sum, _mm_set1_ps(load_scale(k.absmax, si, k.scale_fmt)));
    _mm_store_ps(sums, sum);
    for (int r = 0; r < R; ++r) s[r * Tk + j] = sums[r];
  }
  if (!w) return;
  for (int r = 0; r < R; ++r)  // (the query registers are free again)
    for (int i = 0; i < 4; ++i) qv[r][i] = _mm512_loadu_ps(w + r * 64 + i * 16);
  for (int64_t j = j0; j < j1; ++j) {
    const float* tr = table + pos[j] * 64;
    __m512 t[4];
    for (int i = 0; i < 4; ++i) t[i] = _mm512_loadu_ps(tr + i * 16);
    _mm_store_ps(sums, dot_rows_64<R>(qv, t));
    for (int r = 0; r < R; ++r) s[r * Tk + j] += sums[r];
  }
}

// scores_fast_64 for a run-time row count R in [1, 4].
void scores_fast_64x4(const Packed& k, const float* levels16, int64_t b, int64_t h, const float* q, const float* w,
                      const float* table, const int64_t* pos, int64_t R, int64_t j0, int64_t j1, float* s,
                      int64_t Tk) {
  const bool f = scale_per_group(k);
  switch (R) {
    case 1: return f ? scores_fast_64<1, true>(k, levels16, b, h, q, w, table, pos, j0, j1, s, Tk)
                     : scores_fast_64<1, false>(k, levels16, b, h, q, w, table, pos, j0, j1, s, Tk);
    case 2: return f ? scores_fast_64<2, true>(k, levels16, b, h, q, w, table, pos, j0, j1, s, Tk)
                     : scores_fast_64<2, false>(k, levels16, b, h, q, w, table, pos, j0, j1, s, Tk);
    case 3: return f ? scores_fast_64<3, true>(k, levels16, b, h, q, w, table, pos, j0, j1, s, Tk)
                     : scores_fast_64<3, false>(k, levels16, b, h, q, w, table, pos, j0, j1, s, Tk);
    default: return f ? scores_fast_64<4, true>(k, levels16, b, h, q, w, table, pos, j0, j1, s, Tk)
                      : scores_fast_64<4, false>(k, levels16, b, h, q, w, table, pos, j0, j1, s, Tk);
  }
}

// o[r] += sum_j p[r * Tk + j] v_j for packed tokens j in [j0, j1), o in the original order. Groups
// of rows keep their outputs in registers, in lane order, across the tokens (the row is decoded
// again for each group) and are reordered once at the end. With one scale per group of 64 codes
// (Factored) the scale goes into the row weight instead of into the 64 decoded values.
template <int ND, bool Factored>
void values_fast(const Packed& v, const float* levels16, int64_t b, int64_t h, const float* p, int64_t R,
                 int64_t j0, int64_t j1, int64_t Tk, float* o) {
  constexpr int64_t Dv = 16 * ND;
  constexpr int RG = ND <= 4 ? 4 : 2;
  const __m512 levels = _mm512_loadu_ps(levels16);
  alignas(64) float lanes[Dv];
  for (int64_t r0 = 0; r0 < R; r0 += RG) {
    const int rows = R - r0 < RG ? (int)(R - r0) : RG;
    __m512 acc[RG][ND];
    for (int r = 0; r < RG; ++r)
      for (int i = 0; i < ND; ++i) acc[r][i] = _mm512_setzero_ps();
    for (int64_t j = j0; j < j1; ++j) {
      __m512 vv[ND];
      const int64_t si = scale_index(v, b, h, j);
      decode_row_lanes<ND, !Factored>(v, packed_row(v, b, h, j), si, levels, vv);
      float gs[ND / 4];  // Factored: each group's one scale goes into the row weights
      for (int g = 0; g < ND / 4; ++g) gs[g] = Factored ? load_scale(v.absmax, si + 64 * g / v.block, v.scale_fmt) : 1.f;
      for (int r = 0; r < RG; ++r) {
        if (r >= rows) break;
        const float pr = p[(r0 + r) * Tk + j];
        for (int g = 0; g < ND / 4; ++g) {
          const __m512 w = _mm512_set1_ps(pr * gs[g]);
          for (int i = 4 * g; i < 4 * g + 4; ++i) acc[r][i] = _mm512_fmadd_ps(w, vv[i], acc[r][i]);
        }
      }
    }
    for (int r = 0; r < rows; ++r) {
      for (int i = 0; i < ND; ++i) _mm512_store_ps(lanes + i * 16, acc[r][i]);
      float* dst = o + (r0 + r) * Dv;
      for (int64_t d = 0; d < Dv; ++d) dst[d] += lanes[(d / 64) * 64 + lane_position(v.bits, d % 64)];
    }
  }
}

// s[r * Tk + j] += w_r . table[p + j - j0] for j in [j0, j0 + n) and ROWS rows from r0: the key
// bias of keys at consecutive positions p, p + 1, ... from the table held compactly (RopeCompact):
// by angle addition, the bias of position 16 t + l is w'_t . offsets(l), where w'_t is w with each
// (cos, sin) weight pair turned by tile t's start angles (tile_weights), so sixteen keys are one
// vector per element d against the one offset tile, which stays in L1 for every tile; no
// horizontal sums and no padded rows (the cache body's positions are consecutive). NT tiles at a
// time from tile tb: NT x ROWS independent accumulators in registers (template arguments), enough
// to hide the FMA latency, and each offset vector serves NT tiles.
template <int ROWS, int NT>
void add_tile_bias_rows(const float* wr, int64_t D, RopeCompact rope, int64_t tb, int64_t p, int64_t j0, int64_t n,
                        float* s, int64_t Tk) {
  alignas(64) float wt[NT][ROWS][kMaxBiasDim];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < ROWS; ++r) tile_weights(wr + r * D, D, rope.starts + (tb / 16 + t) * D, wt[t][r]);
  __m512 acc[NT][ROWS];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < ROWS; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 x = _mm512_loadu_ps(rope.offsets + d * 16);
    for (int t = 0; t < NT; ++t)
      for (int r = 0; r < ROWS; ++r) acc[t][r] = _mm512_fmadd_ps(_mm512_set1_ps(wt[t][r][d]), x, acc[t][r]);
  }
  for (int t = 0; t < NT; ++t) {
    // lane l is position tb + 16t + l, key j0 + tb + 16t + l - p; only positions in [p, p + n) are written
    const int64_t t0 = tb + 16 * t, lo = p - t0 > 0 ? p - t0 : 0, hi = p + n - t0 < 16 ? p + n - t0 : 16;
    const __mmask16 m = (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
    for (int r = 0; r < ROWS; ++r) {
      float* dst = s + r * Tk + j0 + (t0 - p);  // lanes before j0 / after j0 + n are masked off
      _mm512_mask_storeu_ps(dst, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), acc[t][r]));
    }
  }
}

// (add_tile_bias_rows<ROWS> and add_tile_bias: after the AVX2 section)
constexpr int kBiasTiles = 4, kBiasRows = 4;
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// -- decode attention in registers without AVX-512: 2/3/4-bit codes, head_dim 64, 128, 192 or 256 --
//
// As above with eight lanes, sixteen codes at a time (a "pass" c: lane-order positions
// [16c, 16c + 16) of the row) as two vectors of bare levels: 4-bit, the codes of bytes
// [8c, 8c + 8) as [even | odd], a 16-entry lookup being two 8-entry `vpermps` and a blend;
// 2/3-bit, two of the four 2-bit fields of the eight bytes of codes [32(c/2), 32(c/2) + 32)
// (lane l of field f: code 4l + f), one `vpermps` each. Sixteen ymm registers hold neither a
// decoded row and four query rows nor four rows of full-width outputs, so queries are read from
// memory (L1) by the FMAs and value outputs are built sixteen lanes at a time.
#define NQKV_REGISTER_PATH 1

// Blocks of 16 or more: the eight lanes of a 4-bit pass, and lanes 0-3 / 4-7 of a 2/3-bit one,
// share a scale. head_dim <= 256: values_fast_avx2's lane buffer.
inline bool fast_path(const Packed& p, int64_t dim) {
  return dim % 64 == 0 && dim <= 256 && (p.bits == 4 || p.bits == 3 || p.bits == 2) && p.block % 16 == 0;
}

struct Levels16 {
  __m256 lo, hi;  // codebook levels 0-7 and 8-15 (2/3-bit: lo only)
};

inline Levels16 load_levels(const float* levels16) { return {_mm256_loadu_ps(levels16), _mm256_loadu_ps(levels16 + 8)}; }

// levels[c] for eight codes in [0, 16) (bits above 3 ignored): bit 3, moved to the sign bit, picks the half.
inline __m256 lookup16(Levels16 t, __m256i c) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, c), _mm256_permutevar8x32_ps(t.hi, c),
                          _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
}

// Pass c of a row of D codes as bare levels, lane-order positions 16c + [0, 8) in x0, + [8, 16) in x1.
inline void decode_pass(int bits, const uint8_t* row, int64_t D, int64_t c, Levels16 t, __m256& x0, __m256& x1) {
  if (bits == 4) {
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + 8 * c)));
    x0 = lookup16(t, _mm256_and_si256(w, _mm256_set1_epi32(15)));
    x1 = lookup16(t, _mm256_srli_epi32(w, 4));
    return;
  }
  const int64_t run = c / 2;
  const int f = 2 * (int)(c % 2);
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + 8 * run)));  // lane l: byte l
  const __m256i three = _mm256_set1_epi32(3);
  __m256i c0 = _mm256_and_si256(_mm256_srli_epi32(w, 2 * f), three);
  __m256i c1 = _mm256_and_si256(_mm256_srli_epi32(w, 2 * f + 2), three);
  if (bits == 3) {  // code 4l + f has its high bit in plane byte l/2 of the run, bit 4(l % 2) + f
    uint32_t plane;
    std::memcpy(&plane, row + D / 4 + 4 * run, 4);
    const __m128i hb = _mm_cvtsi32_si128((int)plane);
    const __m256i high = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(hb, hb));  // lane l: plane byte l/2
    const __m256i shift = _mm256_add_epi32(_mm256_set_epi32(4, 0, 4, 0, 4, 0, 4, 0), _mm256_set1_epi32(f));
    const __m256i one = _mm256_set1_epi32(1);
    c0 = _mm256_or_si256(c0, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(high, shift), one), 2));
    c1 = _mm256_or_si256(
        c1, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(high, _mm256_add_epi32(shift, one)), one), 2));
  }
  x0 = _mm256_permutevar8x32_ps(t.lo, c0);
  x1 = _mm256_permutevar8x32_ps(t.lo, c1);
}

// The scales of pass c's lanes (row's first scale at si): 4-bit, one block; 2/3-bit, lanes 0-3
// hold codes [d0, d0 + 16) of the run, lanes 4-7 codes [d0 + 16, d0 + 32).
inline __m256 pass_scale(const Packed& p, int64_t si, int64_t c) {
  if (p.bits == 4) return _mm256_set1_ps(load_scale(p.absmax, si + 16 * c / p.block, p.scale_fmt));
  const int64_t d0 = 32 * (c / 2);
  const __m256 a = _mm256_set1_ps(load_scale(p.absmax, si + d0 / p.block, p.scale_fmt));
  if (p.block % 32 == 0) return a;
  return _mm256_blend_ps(a, _mm256_set1_ps(load_scale(p.absmax, si + (d0 + 16) / p.block, p.scale_fmt)), 0xF0);
}

// The four horizontal sums of x0..x3, in one 128-bit vector.
inline __m128 reduce4(__m256 x0, __m256 x1, __m256 x2, __m256 x3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(x0, x1), _mm256_hadd_ps(x2, x3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// s[r * Tk + j] = q_r . k_j for R <= 4 query rows (lane order, D apart) and packed tokens j in
// [j0, j1). Factored (one scale per token): the scale multiplies the R sums, not the D levels.
// The two vectors of a pass feed separate accumulators, two FMA chains per row.
template <int R, bool Factored>
void scores_fast_avx2(const Packed& k, const float* levels16, int64_t b, int64_t h, const float* q, int64_t D,
                      int64_t j0, int64_t j1, float* s, int64_t Tk) {
  const Levels16 t = load_levels(levels16);
  alignas(16) float sums[4];
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* row = packed_row(k, b, h, j);
    const int64_t si = scale_index(k, b, h, j);
    __m256 acc0[4], acc1[4];
    for (int r = 0; r < 4; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < D / 16; ++c) {
      __m256 x0, x1;
      decode_pass(k.bits, row, D, c, t, x0, x1);
      if (!Factored) {
        const __m256 sc = pass_scale(k, si, c);
        x0 = _mm256_mul_ps(x0, sc), x1 = _mm256_mul_ps(x1, sc);
      }
      for (int r = 0; r < R; ++r) {
        acc0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + 16 * c), x0, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + 16 * c + 8), x1, acc1[r]);
      }
    }
    for (int r = 0; r < R; ++r) acc0[r] = _mm256_add_ps(acc0[r], acc1[r]);
    __m128 sum = reduce4(acc0[0], acc0[1], acc0[2], acc0[3]);
    if (Factored) sum = _mm_mul_ps(sum, _mm_set1_ps(load_scale(k.absmax, si, k.scale_fmt)));
    _mm_store_ps(sums, sum);
    for (int r = 0; r < R; ++r) s[r * Tk + j] = sums[r];
  }
}

// Every query row (R of them, lane order), four at a time; the codes are decoded again for each
// group of four.
void scores_fast_avx2(const Packed& k, const float* levels16, int64_t b, int64_t h, const float* q, int64_t R,
                      int64_t D, int64_t j0, int64_t j1, float* s, int64_t Tk) {
  const bool f = k.block == D;
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const float* qr = q + r0 * D;
    float* sr = s + r0 * Tk;
    switch (R - r0 < 4 ? R - r0 : 4) {
      case 1: f ? scores_fast_avx2<1, true>(k, levels16, b, h, qr, D, j0, j1, sr, Tk)
                : scores_fast_avx2<1, false>(k, levels16, b, h, qr, D, j0, j1, sr, Tk); break;
      case 2: f ? scores_fast_avx2<2, true>(k, levels16, b, h, qr, D, j0, j1, sr, Tk)
                : scores_fast_avx2<2, false>(k, levels16, b, h, qr, D, j0, j1, sr, Tk); break;
      case 3: f ? scores_fast_avx2<3, true>(k, levels16, b, h, qr, D, j0, j1, sr, Tk)
                : scores_fast_avx2<3, false>(k, levels16, b, h, qr, D, j0, j1, sr, Tk); break;
      default: f ? scores_fast_avx2<4, true>(k, levels16, b, h, qr, D, j0, j1, sr, Tk)
                 : scores_fast_avx2<4, false>(k, levels16, b, h, qr, D, j0, j1, sr, Tk);
    }
  }
}

// o[r] += sum_j p[r * Tk + j] v_j for RG rows from r0 and packed tokens j in [j0, j1), o in the
// original order. One pass (sixteen lanes) at a time over the tokens, its RG x 2 accumulators in
// registers; the scales go into the row weights instead of into the decoded levels. (All of a
// row's lanes at once, or 32 of them with three rows, spill on sixteen registers.)
template <int RG>
void values_fast_avx2(const Packed& v, const float* levels16, int64_t b, int64_t h, const float* p, int64_t r0,
                      int64_t j0, int64_t j1, int64_t Tk, int64_t Dv, float* o) {
  const Levels16 t = load_levels(levels16);
  alignas(32) float lanes[RG][256];
  for (int64_t c = 0; c < Dv / 16; ++c) {
    __m256 acc0[RG], acc1[RG];
    for (int r = 0; r < RG; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int64_t j = j0; j < j1; ++j) {
      const __m256 sc = pass_scale(v, scale_index(v, b, h, j), c);
      __m256 x0, x1;
      decode_pass(v.bits, packed_row(v, b, h, j), Dv, c, t, x0, x1);
      for (int r = 0; r < RG; ++r) {
        const __m256 w = _mm256_mul_ps(_mm256_set1_ps(p[(r0 + r) * Tk + j]), sc);
        acc0[r] = _mm256_fmadd_ps(w, x0, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(w, x1, acc1[r]);
      }
    }
    // (unrolled: a loop that indexes the accumulators at run time makes GCC keep them in memory,
    // a store of each after every FMA of the loop above)
#pragma GCC unroll 4
    for (int r = 0; r < RG; ++r) {
      _mm256_store_ps(lanes[r] + 16 * c, acc0[r]);
      _mm256_store_ps(lanes[r] + 16 * c + 8, acc1[r]);
    }
  }
  for (int r = 0; r < RG; ++r) {
    float* dst = o + (r0 + r) * Dv;
    for (int64_t d = 0; d < Dv; ++d) dst[d] += lanes[r][(d / 64) * 64 + lane_position(v.bits, d % 64)];
  }
}

void values_fast_avx2(const Packed& v, const float* levels16, int64_t b, int64_t h, const float* p, int64_t R,
                      int64_t j0, int64_t j1, int64_t Tk, int64_t Dv, float* o) {
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    switch (R - r0 < 4 ? R - r0 : 4) {
      case 1: values_fast_avx2<1>(v, levels16, b, h, p, r0, j0, j1, Tk, Dv, o); break;
      case 2: values_fast_avx2<2>(v, levels16, b, h, p, r0, j0, j1, Tk, Dv, o); break;
      case 3: values_fast_avx2<3>(v, levels16, b, h, p, r0, j0, j1, Tk, Dv, o); break;
      default: values_fast_avx2<4>(v, levels16, b, h, p, r0, j0, j1, Tk, Dv, o);
    }
  }
}

// add_tile_bias with eight lanes: the offset tile is two vectors per element d; NT tiles x 2
// halves x ROWS accumulators, each tile's turned weights broadcast once per d.
template <int ROWS, int NT>
void add_tile_bias_rows(const float* wr, int64_t D, RopeCompact rope, int64_t tb, int64_t p, int64_t j0, int64_t n,
                        float* s, int64_t Tk) {
  alignas(32) float wt[NT][ROWS][kMaxBiasDim];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < ROWS; ++r) tile_weights(wr + r * D, D, rope.starts + (tb / 16 + t) * D, wt[t][r]);
  __m256 acc[NT][2][ROWS];
  for (int t = 0; t < NT; ++t)
    for (int hf = 0; hf < 2; ++hf)
      for (int r = 0; r < ROWS; ++r) acc[t][hf][r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 x0 = _mm256_loadu_ps(rope.offsets + d * 16), x1 = _mm256_loadu_ps(rope.offsets + d * 16 + 8);
    for (int t = 0; t < NT; ++t)
      for (int r = 0; r < ROWS; ++r) {
        const __m256 wv = _mm256_broadcast_ss(&wt[t][r][d]);
        acc[t][0][r] = _mm256_fmadd_ps(wv, x0, acc[t][0][r]);
        acc[t][1][r] = _mm256_fmadd_ps(wv, x1, acc[t][1][r]);
      }
  }
  alignas(32) float lanes[16];
  // (unrolled: a loop that indexes the accumulators at run time makes GCC keep them in memory, a
  // store of each after every FMA of the loop above)
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    // lane l is position tb + 16t + l, key j0 + tb + 16t + l - p; only positions in [p, p + n) are written
    const int64_t t0 = tb + 16 * t, lo = p - t0 > 0 ? p - t0 : 0, hi = p + n - t0 < 16 ? p + n - t0 : 16;
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      _mm256_store_ps(lanes, acc[t][0][r]);
      _mm256_store_ps(lanes + 8, acc[t][1][r]);
      float* dst = s + r * Tk + j0 + (t0 - p);
      for (int64_t l = lo; l < hi; ++l) dst[l] += lanes[l];
    }
  }
}

constexpr int kBiasTiles = 2, kBiasRows = 3;  // 2 x 2 x 3 accumulators of sixteen registers
#endif

#ifdef NQKV_REGISTER_PATH
// The key bias of packed tokens j in [j0, j1) at consecutive positions from p, rows in groups of
// kBiasRows, kBiasTiles tiles of sixteen positions at a time (add_tile_bias_rows<ROWS, NT> above).
template <int ROWS>
void add_tile_bias_rows(const float* wr, int64_t D, RopeCompact rope, int64_t p, int64_t j0, int64_t n, float* s,
                        int64_t Tk) {
  int64_t tb = p & ~int64_t(15);
  for (; tb + 16 * kBiasTiles <= p + n; tb += 16 * kBiasTiles)
    add_tile_bias_rows<ROWS, kBiasTiles>(wr, D, rope, tb, p, j0, n, s, Tk);
  for (; tb < p + n; tb += 16) add_tile_bias_rows<ROWS, 1>(wr, D, rope, tb, p, j0, n, s, Tk);
}

void add_tile_bias(const float* w, int64_t R, int64_t D, RopeCompact rope, int64_t p, int64_t j0, int64_t j1,
                   float* s, int64_t Tk) {
  for (int64_t r0 = 0; r0 < R; r0 += kBiasRows) {
    const float* wr = w + r0 * D;
    float* sr = s + r0 * Tk;
    const int64_t rows = R - r0 < kBiasRows ? R - r0 : kBiasRows;
    if (rows == 1) add_tile_bias_rows<1>(wr, D, rope, p, j0, j1 - j0, sr, Tk);
    else if (rows == 2) add_tile_bias_rows<2>(wr, D, rope, p, j0, j1 - j0, sr, Tk);
    else if (rows == 3) add_tile_bias_rows<3>(wr, D, rope, p, j0, j1 - j0, sr, Tk);
    else add_tile_bias_rows<kBiasRows>(wr, D, rope, p, j0, j1 - j0, sr, Tk);
  }
}
#endif

// Row p of a RoPE table held compactly, into row (D): [cos | sin] of the angles of tile p / 16's
// start plus those of offset p % 16, by angle addition (compose_rope_rows in nqkv_core/transform.py).
inline void compact_row(RopeCompact rope, int64_t D, int64_t p, float* row) {
  const int64_t H = D / 2, l = p % 16;
  const float* start = rope.starts + (p / 16) * D;
  for (int64_t i = 0; i < H; ++i) {
    const float ca = start[i], sa = start[H + i], cb = rope.offsets[i * 16 + l], sb = rope.offsets[(H + i) * 16 + l];
    row[i] = ca * cb - sa * sb;
    row[H + i] = sa * cb + ca * sb;
  }
}

// Decode attention (see nqkv_attention_decode below for the contract). rope: the bias table held
// compactly (starts null: none); with it, packed tokens at consecutive positions take their bias
// from it (add_tile_bias), and bias_table may be null: the rows the other keys read one at a time
// are then composed from it.

int attention_decode(const float* q, Packed k, Packed v, int64_t t_hist, const float* k_tail, const float* v_tail,
                     int64_t t_tail, const float* mask, int64_t ms_b, int64_t ms_h, int64_t ms_q, int mask_hides,
                     const float* bias_w, const float* bias_table, const int64_t* bias_pos, int64_t bias_rows,
                     int causal, int64_t B, int64_t Hkv, int64_t G, int64_t Tq, int64_t D, int64_t Dv, float* out,
                     int threads, RopeCompact rope = {nullptr, nullptr}) {
  const int64_t R = G * Tq, Tk = t_hist + t_tail, BH = B * Hkv;
  if (bias_w)
    for (int64_t j = 0; j < Tk; ++j)
      if (bias_pos[j] < 0 || bias_pos[j] >= bias_rows) return 1;
  // A compact table only: the keys that read their bias row by row get their rows composed here,
  // indexed by key (row_pos[j] = j - first): the tail, and the packed tokens too unless they take
  // the tiles.
  const float* table = bias_table;
  const int64_t* table_pos = bias_pos;
  std::vector<float> gathered;
  std::vector<int64_t> row_pos;
  if (bias_w && !bias_table) {
    bool tiled = false;
#ifdef NQKV_REGISTER_PATH
    tiled = fast_path(k, D);
    for (int64_t j = 1; tiled && j < t_hist; ++j) tiled = bias_pos[j] == bias_pos[0] + j;
#endif
    const int64_t first = tiled ? t_hist : 0;
    gathered.resize((Tk - first) * D);
    row_pos.assign(Tk, 0);
    for (int64_t j = first; j < Tk; ++j) {
      compact_row(rope, D, bias_pos[j], gathered.data() + (j - first) * D);
      row_pos[j] = j - first;
    }
    table = gathered.data(), table_pos = row_pos.data();
  }
  const int64_t chunk = 256;  // tokens per work item
  const int64_t n_chunks = (Tk + chunk - 1) / chunk, items = BH * n_chunks;
  float kcb[16] = {0}, vcb[16] = {0};
  if (k.bits <= 4) std::memcpy(kcb, k.codebook, sizeof(float) << k.bits);
  if (v.bits <= 4) std::memcpy(vcb, v.codebook, sizeof(float) << v.bits);
  const float* kc = k.bits <= 4 ? kcb : k.codebook;
  const float* vc = v.bits <= 4 ? vcb : v.codebook;
  std::vector<float> scores(BH * R * Tk);
  std::vector<float> partial(items * R * Dv);  // unnormalised outputs of each work item

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> row(D > Dv ? D : Dv), scales(D > Dv ? D : Dv), qpad((R + 3) / 4 * 4 * D, 0.f);
    std::vector<float> wpad(bias_w ? (R + 3) / 4 * 4 * D : 0, 0.f);
    // scores: s[r, j] = q_r . k_j (+ mask), -inf where causally hidden
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t bh = it / n_chunks, b = bh / Hkv, h = bh % Hkv;
      const int64_t j0 = (it % n_chunks) * chunk, j1 = j0 + chunk < Tk ? j0 + chunk : Tk;
      [[maybe_unused]] const int64_t jh = j1 < t_hist ? j1 : t_hist;  // [j0, jh) packed, then tail
      const float* qr = q + bh * R * D;
      const float* wr = bias_w ? bias_w + bh * R * D : nullptr;
      float* s = scores.data() + bh * R * Tk;
      int64_t j = j0;
#ifdef NQKV_REGISTER_PATH
      if (j < jh && fast_path(k, D)) {
        for (int64_t r = 0; r < R; ++r)  // queries in lane order
          for (int64_t d = 0; d < D; ++d) qpad[r * D + (d / 64) * 64 + lane_position(k.bits, d % 64)] = qr[r * D + d];
        bool consecutive = wr && rope.starts;
        for (int64_t jj = j + 1; consecutive && jj < jh; ++jj) consecutive = bias_pos[jj] == bias_pos[j] + (jj - j);
#ifdef __AVX512F__
        if (wr) std::memcpy(wpad.data(), wr, R * D * sizeof(float));
        const float* wp = wr && !consecutive ? wpad.data() : nullptr;
        if (D == 64 && R <= 4) scores_fast_64x4(k, kc, b, h, qpad.data(), wp, table, table_pos, R, j, jh, s, Tk);
        else if (D == 64) scores_fast<4>(k, kc, b, h, qpad.data(), wp, table, table_pos, R, j, jh, s, Tk);
        else scores_fast<8>(k, kc, b, h, qpad.data(), wp, table, table_pos, R, j, jh, s, Tk);
#else
        scores_fast_avx2(k, kc, b, h, qpad.data(), R, D, j, jh, s, Tk);
        if (wr && !consecutive)
          for (int64_t jj = j; jj < jh; ++jj)
            for (int64_t r = 0; r < R; ++r) s[r * Tk + jj] += dot(wr + r * D, table + table_pos[jj] * D, D);
#endif
        if (consecutive) add_tile_bias(wr, R, D, rope, bias_pos[j], j, jh, s, Tk);
        j = jh;
      }
#endif
      for (; j < j1; ++j) {
        const float* key = token_row(k, kc, k_tail, b, h, bh, j, t_hist, t_tail, D, scales.data(), row.data());
        for (int64_t r = 0; r < R; ++r) s[r * Tk + j] = dot(qr + r * D, key, D);
        if (wr)
          for (int64_t r = 0; r < R; ++r) s[r * Tk + j] += dot(wr + r * D, table + table_pos[j] * D, D);
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t g = r / Tq, i = r % Tq;
        float* sr = s + r * Tk;
        if (mask) {
          const float* mr = mask + b * ms_b + (h * G + g) * ms_h + i * ms_q;
          if (mask_hides)  // a boolean mask: a hidden key's score is -inf, whatever it was (NaN too)
            for (int64_t jj = j0; jj < j1; ++jj) sr[jj] = mr[jj] == -INFINITY ? -INFINITY : sr[jj];
          else
            for (int64_t jj = j0; jj < j1; ++jj) sr[jj] += mr[jj];
        }
        if (causal) {
          const int64_t last = Tk - Tq + i;
          for (int64_t jj = (last + 1 > j0 ? last + 1 : j0); jj < j1; ++jj) sr[jj] = -INFINITY;
        }
      }
    }
    // softmax per row. A NaN score makes the row's weights, and so its output, NaN (as torch's
    // softmax): exp_shift_sum carries it into the sum; row_max may skip it, which matters only
    // when every other score is -inf.
#pragma omp for schedule(static)
    for (int64_t rr = 0; rr < BH * R; ++rr) {
      float* sr = scores.data() + rr * Tk;
      const float m = row_max(sr, Tk);
      if (m == -INFINITY) {  // sees nothing: zero weights, zero output (unless a score is NaN)
        bool nan = false;
        for (int64_t j = 0; j < Tk; ++j) nan |= std::isnan(sr[j]);
        std::fill(sr, sr + Tk, nan ? NAN : 0.f);
        continue;
      }
      const float inv = 1.f / exp_shift_sum(sr, Tk, m);
      for (int64_t j = 0; j < Tk; ++j) sr[j] *= inv;
    }
    // values: each work item's weighted sum of its tokens
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t bh = it / n_chunks, b = bh / Hkv, h = bh % Hkv;
      const int64_t j0 = (it % n_chunks) * chunk, j1 = j0 + chunk < Tk ? j0 + chunk : Tk;
      [[maybe_unused]] const int64_t jh = j1 < t_hist ? j1 : t_hist;
      const float* p = scores.data() + bh * R * Tk;
      float* o = partial.data() + it * R * Dv;
      std::memset(o, 0, R * Dv * sizeof(float));
      int64_t j = j0;
#ifdef NQKV_REGISTER_PATH
      if (j < jh && fast_path(v, Dv)) {
#ifdef __AVX512F__
        const bool f = scale_per_group(v);
        if (Dv == 64) f ? values_fast<4, true>(v, vc, b, h, p, R, j, jh, Tk, o) : values_fast<4, false>(v, vc, b, h, p, R, j, jh, Tk, o);
        else f ? values_fast<8, true>(v, vc, b, h, p, R, j, jh, Tk, o) : values_fast<8, false>(v, vc, b, h, p, R, j, jh, Tk, o);
#else
        values_fast_avx2(v, vc, b, h, p, R, j, jh, Tk, Dv, o);
#endif
        j = jh;
      }
#endif
      for (; j < j1; ++j) {
        const float* val = token_row(v, vc, v_tail, b, h, bh, j, t_hist, t_tail, Dv, scales.data(), row.data());
        // zero weights too: an infinite value times 0 is NaN, as in torch's product
        for (int64_t r = 0; r < R; ++r) axpy(p[r * Tk + j], val, o + r * Dv, Dv);
      }
    }
    // merge the work items of each (batch, head)
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < BH; ++bh) {
      float* dst = out + bh * R * Dv;
      std::memset(dst, 0, R * Dv * sizeof(float));
      for (int64_t c = 0; c < n_chunks; ++c) {
        const float* src = partial.data() + (bh * n_chunks + c) * R * Dv;
        for (int64_t e = 0; e < R * Dv; ++e) dst[e] += src[e];
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// The key native.py built this library with (a hash of this source, the compiler, the flags and the
// CPU): a library that returns another one, or lacks this function, is not loaded.
#ifndef NQKV_BUILD_KEY
#define NQKV_BUILD_KEY ""
#endif
const char* nqkv_build_key() { return NQKV_BUILD_KEY; }

// The vector code this library was built with: 512 (AVX-512), 256 (AVX2 with FMA) or 0 (scalar).
int nqkv_vector_bits() {
#if defined(__AVX512F__)
  return 512;
#elif defined(__AVX2__) && defined(__FMA__)
  return 256;
#else
  return 0;
#endif
}

// Largest |x| of n values; NaN if any is NaN (so that it reaches the caller's check).
inline float block_absmax(const float* x, int64_t n) {
  float a = 0.f;
  for (int64_t i = 0; i < n; ++i) a = std::fmax(a, std::fabs(x[i]));
  for (int64_t i = 0; i < n; ++i) a = std::isnan(x[i]) ? x[i] : a;
  return a;
}

// Code `c` of element d into a zeroed packed row (the layout of nqkv_core.packing).
inline void put_code(uint8_t* out, int bits, int64_t row_len, int64_t d, uint8_t c) {
  switch (bits) {
    case 4: out[d >> 1] |= c << ((d & 1) * 4); break;
    case 2: out[d >> 2] |= c << ((d & 3) * 2); break;
    case 8: out[d] = c; break;
    default:
      out[d >> 2] |= (c & 3) << ((d & 3) * 2);
      out[row_len / 4 + (d >> 3)] |= (c >> 2) << (d & 7);
  }
}

// Codes and fp32 absmax of `rows` rows of `row_len` elements, blocks of `block` along the row.
// x: fp32 (x_bf16 = 0) or bf16 bits (x_bf16 = 1), contiguous. thresholds: the 2**bits - 1 midpoints
// between ascending levels; a code is the number of midpoints strictly below x / s (what
// torch.bucketize gives). absmax_out gets the scale used for coding (rounded up to the fp16 grid
// or to format scale_fmt's grid: coding_scale). Returns the number of blocks whose absmax is not finite (NaN or Inf in the
// input) or above max_scale; the caller then finds and words the error.
//
// Fitted scales (n_ratios > 0, as nqkv_core.quantize with fit_scale=True): for each clipping ratio r
// the codes of x against the scale r * absmax, then the scale t = sum(x^2) / sum(x * level) that
// makes the block's decoded values unbiased (sum(x * xhat) = sum(x^2)); the block keeps the ratio
// whose codes give the smallest squared error with their t (sums in double; the first on ties), and
// stores t rounded to the nearest value of format scale_fmt. levels: the 2**bits levels.
//
// Error feedback (feedback non-null, as nqkv_core.quantize with feedback=U): absmax scales; the
// elements of row r are coded in order, each rounding error divided by U[i][i] and subtracted
// from the later elements along U[i][j]; U = feedback + (r / feedback_rows) * row_len^2, row-major.
int64_t nqkv_quantize_rows(const void* x, int x_bf16, int64_t rows, int64_t row_len, int64_t block,
                           const float* thresholds, int bits, int scale_fmt, float max_scale, uint8_t* codes,
                           float* absmax_out, int threads, const float* levels, const float* ratios,
                           int n_ratios, const float* feedback, int64_t feedback_rows) {
  const int n_thr = (1 << bits) - 1;
  const int64_t row_bytes = row_len * bits / 8, nb = row_len / block;
  int64_t bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad)
  {
    std::vector<float> y(block), xs(block), w(feedback ? row_len : 0);
    std::vector<uint8_t> c(block), best(block);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      uint8_t* out = codes + r * row_bytes;
      std::memset(out, 0, row_bytes);
      if (feedback) {
        for (int64_t i = 0; i < row_len; ++i)
          w[i] = x_bf16 ? bits_to_float((uint32_t)((const uint16_t*)x)[r * row_len + i] << 16)
                        : ((const float*)x)[r * row_len + i];
        float* sc = absmax_out + r * nb;
        for (int64_t b = 0; b < nb; ++b) {
          float a = block_absmax(w.data() + b * block, block);
          if (!(a <= max_scale)) ++bad;
          if (a <= max_scale) a = coding_scale(a, scale_fmt, false);  // (else kept for the caller's error)
          sc[b] = a;
        }
        const float* U = feedback + (r / feedback_rows) * row_len * row_len;
        for (int64_t i = 0; i < row_len; ++i) {
          const float s = sc[i / block], y_i = w[i] / (s > 0.f ? s : 1.f);
          uint8_t code = 0;
          for (int t = 0; t < n_thr; ++t) code += y_i > thresholds[t];
          put_code(out, bits, row_len, i, code);
          const float err = (w[i] - levels[code] * s) / U[i * row_len + i];
          for (int64_t j = i + 1; j < row_len; ++j) w[j] -= err * U[i * row_len + j];
        }
        continue;
      }
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t base = r * row_len + b * block;
        if (x_bf16) {
          const uint16_t* xs = (const uint16_t*)x + base;
          for (int64_t i = 0; i < block; ++i) y[i] = bits_to_float((uint32_t)xs[i] << 16);
        } else {
          std::memcpy(y.data(), (const float*)x + base, block * sizeof(float));
        }
        float a = block_absmax(y.data(), block);
        if (!(a <= max_scale)) ++bad;  // NaN compares false
        if (n_ratios > 0) {
          std::memcpy(xs.data(), y.data(), block * sizeof(float));
          double best_err = 0.0, best_t = 0.0;
          for (int k = 0; k < n_ratios; ++k) {
            const float sr = a * ratios[k];
            const float s = sr > 0.f ? sr : 1.f;
            for (int64_t i = 0; i < block; ++i) y[i] = xs[i] / s;
            for (int64_t i = 0; i < block; ++i) c[i] = 0;
            for (int t = 0; t < n_thr; ++t) {
              const float th = thresholds[t];
              for (int64_t i = 0; i < block; ++i) c[i] += y[i] > th;
            }
            double xx = 0.0, xq = 0.0, qq = 0.0;
            for (int64_t i = 0; i < block; ++i) {
              const double xi = xs[i], qi = levels[c[i]];
              xx += xi * xi, xq += xi * qi, qq += qi * qi;
            }
            const double t = xq > 0.0 ? xx / xq : 0.0;
            const double err = xx - 2.0 * t * xq + t * t * qq;
            if (k == 0 || err < best_err) {
              best_err = err, best_t = t;
              std::memcpy(best.data(), c.data(), block);
            }
          }
          float t = (float)best_t;
          if (std::isfinite(t)) t = coding_scale(t, scale_fmt, true);  // (fp16 / fp32 only)
          if (!(t <= max_scale) && std::isfinite(a)) ++bad;  // (a non-finite block is counted above)
          absmax_out[r * nb + b] = std::isfinite(a) ? t : a;  // a NaN / Inf block: for the caller's check
          std::memcpy(c.data(), best.data(), block);
        } else {
          if (a <= max_scale) a = coding_scale(a, scale_fmt, false);  // (else kept for the caller's error)
          absmax_out[r * nb + b] = a;
          const float s = a > 0.f ? a : 1.f;
          for (int64_t i = 0; i < block; ++i) y[i] = y[i] / s;
          for (int64_t i = 0; i < block; ++i) c[i] = 0;
          for (int t = 0; t < n_thr; ++t) {  // a vectorised count of midpoints below each element
            const float th = thresholds[t];
            for (int64_t i = 0; i < block; ++i) c[i] += y[i] > th;
          }
        }
        const int64_t d0 = b * block;
        for (int64_t i = 0; i < block; ++i) put_code(out, bits, row_len, d0 + i, c[i]);
      }
    }
  }
  return bad;
}

// Inverse of nqkv_quantize_rows: codebook[code] * absmax into fp32 (out_bf16 = 0) or bf16 bits.
// absmax: fp16 bits (scale_fmt = 1) or fp32, one per block, rows contiguous.
void nqkv_dequantize_rows(const uint8_t* codes, const void* absmax, int scale_fmt, const float* codebook,
                          int bits, int64_t rows, int64_t row_len, int64_t block, void* out, int out_bf16,
                          int threads) {
  const int64_t row_bytes = row_len * bits / 8, nb = row_len / block;
  float cb[16] = {0};
  if (bits <= 4) std::memcpy(cb, codebook, sizeof(float) << bits);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scales(nb);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b = 0; b < nb; ++b) scales[b] = load_scale(absmax, r * nb + b, scale_fmt);
      decode_row(codes + r * row_bytes, scales.data(), bits == 8 ? codebook : cb, bits, row_len, block,
                 out_bf16 ? nullptr : (float*)out + r * row_len, out_bf16 ? (uint16_t*)out + r * row_len : nullptr);
    }
  }
}

// Decode attention: every query row of a KV head against its whole cache, with one exact softmax.
//
// q: (B, Hkv, R, D) fp32 contiguous, already multiplied by the softmax scale; the R = G * Tq rows
// of a KV head are its G query heads' Tq queries, row g * Tq + i. Keys are the T_hist packed tokens
// followed by T_tail full-precision tokens (k_tail / v_tail: (B, Hkv, T_tail, D / Dv) fp32
// contiguous, or null). mask: additive fp32 with element strides (b, query head, query, key = 1),
// or null; mask_hides: the mask is a boolean one as 0 / -inf, whose -inf replaces a score instead
// of being added to it. Optional key bias (a RoPE-centred cache's score offset, docs/design.md):
// bias_w (B, Hkv, R, D) fp32 contiguous, bias_table (P, D) fp32 contiguous and bias_pos (Tk) int64;
// key j's score gains bias_w[r] . bias_table[bias_pos[j]]; or the same table held compactly,
// bias_starts (P / 16, D) and bias_offsets (D, 16) fp32 contiguous (RopeCompact; P = 16 x the
// starts' rows), with bias_table null. causal: query i sees key j iff
// j <= Tk - Tq + i. out: (B, Hkv, R, Dv) fp32. Rows that can see no key get zeros, as torch's SDPA.
// Non-finite numbers as in torch's softmax and product: a NaN score of a key that a row sees
// (hidden: by causality or a boolean mask) makes the row's output NaN, as does a +inf score; an
// infinite value makes its output column non-finite in every row (0 * inf is NaN).
// Work is split over (batch x head x token chunk). Returns 0, or 1 (nothing computed) when a bias
// position is outside [0, P).
int nqkv_attention_decode(const float* q, Packed k, Packed v, int64_t t_hist, const float* k_tail,
                          const float* v_tail, int64_t t_tail, const float* mask, int64_t ms_b, int64_t ms_h,
                          int64_t ms_q, int mask_hides, const float* bias_w, const float* bias_table,
                          const int64_t* bias_pos, int64_t bias_rows, int causal, int64_t B, int64_t Hkv, int64_t G,
                          int64_t Tq, int64_t D, int64_t Dv, float* out, int threads, const float* bias_starts,
                          const float* bias_offsets) {
  return attention_decode(q, k, v, t_hist, k_tail, v_tail, t_tail, mask, ms_b, ms_h, ms_q, mask_hides, bias_w,
                          bias_table, bias_pos, bias_rows, causal, B, Hkv, G, Tq, D, Dv, out, threads,
                          {bias_starts, bias_offsets});
}

// One eager decode step of one cache layer for a single new token at position n_tokens
// (the cache's folded step, whose torch ops are the reference: nqkv_core/cache/step.py). Per (batch, KV
// head):
//   q' = q @ rot_k * scale; with a RoPE-aware centre (mu_k_half set) the bias weights of the
//   query's KV head, w = scale * [q_lo mu_lo + q_hi mu_hi | q_hi mu_lo - q_lo mu_hi] (halves of
//   q and mu_k; rope_bias_weights in nqkv_core/transform.py), elementwise: no per-head matrix to read;
//   k' = (k - centre) @ rot_k, centre = mu_k * cos + mu_k_half * sin (RoPE-aware: cos / sin are the
//   halves of row n_tokens of the [cos | sin] table, each repeated twice, as apply_rope builds
//   them), mu_k (plain) or none; v' = (v - mu_v) @ rot_v (null rot = identity, null mu = none);
// then attention over [n_body packed tokens | S sinks | R ring slots | the new token] (ring and
// sinks read from their buffers, (B, Hkv, slots, D) contiguous, fp32 or with `fp_bf16` bf16, the new
// token rounded as they store it), out = o @ rot_v^T + mu_v, and the
// commit: the ring slot `leave_slot` (>= 0) is quantized into body slot `body_slot` (K and V: the
// packed bodies are written), then k', v' go to sink slot `sink_slot` or ring slot `ring_slot`
// (whichever is >= 0). With bias weights each key's score gains w . table[p] at its position p
// (body slot j: sinks + j; sink i: i; ring slot r: the last position < n_tokens that is r modulo
// n_ring; new: n_tokens), the table held once and compactly (RopeCompact): rope_starts
// (rope_rows / 16, D) and rope_offsets (D, 16).
// Coding as nqkv_quantize_rows: fitted scales with the `n_fit` ratios `fit_ratios` for the sides in
// `fit_sides` (bit 0 keys, bit 1 values; their body codebook is the plain one), and
// keys by error feedback when `k_feedback` ((B * Hkv, D, D) row-major) is set,
// against their plain levels `k_levels`.
// Returns 0, 1 for a position beyond the table, 2 for a non-finite or out-of-range block scale in
// the token being quantized (nothing is written then).
int nqkv_decode_step(const float* q, const float* k_new, const float* v_new, const float* rot_k,
                     const float* rot_v, const float* mu_k, const float* mu_k_half, const float* mu_v,
                     void* k_sink, void* v_sink,
                     int64_t n_sinks, int64_t sink_slots, void* k_ring, void* v_ring, int64_t n_ring,
                     int64_t ring_slots, Packed k_body, Packed v_body, int64_t n_body, const float* k_thresholds,
                     const float* v_thresholds, float max_scale, int64_t leave_slot, int64_t body_slot,
                     int64_t sink_slot, int64_t ring_slot, const float* rope_starts,
                     const float* rope_offsets, int64_t rope_rows, int64_t n_tokens, float scale, int64_t B, int64_t Hkv, int64_t G, int64_t D,
                     float* out, int threads, const float* fit_ratios, int n_fit, int fit_sides,
                     const float* k_levels, const float* k_feedback, int fp_bf16) {
  const int64_t Hq = Hkv * G, BH = B * Hkv, T_tail = n_sinks + n_ring + 1, half = D / 2;
  const bool bias = mu_k && mu_k_half;
  // RoPE-aware centre: the [cos | sin] rows of the new token's position give apply_rope's full rows
  std::vector<float> cos_full(D), sin_full(D);
  const float* cos_row = nullptr;
  const float* sin_row = nullptr;
  if (mu_k_half) {
    if (n_tokens >= rope_rows) return 1;
    std::vector<float> t(D);
    compact_row({rope_starts, rope_offsets}, D, n_tokens, t.data());
    for (int64_t d = 0; d < D; ++d) cos_full[d] = t[d % (D / 2)], sin_full[d] = t[D / 2 + d % (D / 2)];
    cos_row = cos_full.data(), sin_row = sin_full.data();
  }
  // positions of [body | sinks | ring slots | new]: the key bias's table rows (every slot is filled)
  std::vector<int64_t> pos(bias ? n_body + T_tail : 0);
  if (bias) {
    for (int64_t j = 0; j < n_body; ++j) pos[j] = n_sinks + j;
    for (int64_t i = 0; i < n_sinks; ++i) pos[n_body + i] = i;
    for (int64_t r = 0; r < n_ring; ++r)
      pos[n_body + n_sinks + r] = n_tokens - 1 - (((n_tokens - 1 - r) % n_ring) + n_ring) % n_ring;
    pos[n_body + T_tail - 1] = n_tokens;
  }
  std::vector<float> qs(Hq * B * D), ws(bias ? Hq * B * D : 0), kn(BH * D), vn(BH * D), tmp(D);
  std::vector<float> k_tail(BH * T_tail * D), v_tail(BH * T_tail * D), o(B * Hq * D);
  for (int64_t bh = 0; bh < BH; ++bh) {
    const float* k = k_new + bh * D;
    const float* v = v_new + bh * D;
    for (int64_t d = 0; d < D; ++d) {
      float c = 0.f;
      if (mu_k && mu_k_half) c = mu_k[bh * D + d] * cos_row[d] + mu_k_half[bh * D + d] * sin_row[d];
      else if (mu_k) c = mu_k[bh * D + d];
      tmp[d] = k[d] - c;
    }
    float* kd = kn.data() + bh * D;
    row_times(tmp.data(), rot_k, D, D, kd);
    for (int64_t d = 0; d < D; ++d) tmp[d] = v[d] - (mu_v ? mu_v[bh * D + d] : 0.f);
    float* vd = vn.data() + bh * D;
    row_times(tmp.data(), rot_v, D, D, vd);
    round_fp(kd, D, fp_bf16);  // the new token attends as it is stored
    round_fp(vd, D, fp_bf16);
    // the tail the attention reads: sinks, ring slots, the new token
    float* kt = k_tail.data() + bh * T_tail * D;
    float* vt = v_tail.data() + bh * T_tail * D;
    load_fp(k_sink, bh * sink_slots * D, n_sinks * D, fp_bf16, kt);
    load_fp(v_sink, bh * sink_slots * D, n_sinks * D, fp_bf16, vt);
    load_fp(k_ring, bh * ring_slots * D, n_ring * D, fp_bf16, kt + n_sinks * D);
    load_fp(v_ring, bh * ring_slots * D, n_ring * D, fp_bf16, vt + n_sinks * D);
    std::memcpy(kt + (T_tail - 1) * D, kd, D * sizeof(float));
    std::memcpy(vt + (T_tail - 1) * D, vd, D * sizeof(float));
    // the query rows of this KV head (rows in (b, h * G + g) order)
    const float* mu = bias ? mu_k + bh * D : nullptr;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = bh * G + g;
      const float* qr = q + r * D;
      float* qd = qs.data() + r * D;
      row_times(qr, rot_k, D, D, qd);
      for (int64_t e = 0; e < D; ++e) qd[e] *= scale;
      if (!bias) continue;
      float* w = ws.data() + r * D;
      for (int64_t i = 0; i < half; ++i) {
        w[i] = scale * (qr[i] * mu[i] + qr[half + i] * mu[half + i]);
        w[half + i] = scale * (qr[half + i] * mu[i] - qr[i] * mu[half + i]);
      }
    }
  }
  const int status = attention_decode(qs.data(), k_body, v_body, n_body, k_tail.data(), v_tail.data(), T_tail,
                                      nullptr, 0, 0, 0, 0, bias ? ws.data() : nullptr, nullptr, pos.data(),
                                      rope_rows, 0, B, Hkv, G, 1, D, D, o.data(), threads,
                                      {rope_starts, rope_offsets});
  if (status) return status;
  for (int64_t r = 0; r < B * Hq; ++r) {  // out = o @ rot_v^T + mu_v (rows in (b, h * G + g) order)
    const float* orow = o.data() + r * D;
    float* dst = out + r * D;
    const int64_t bh = r / G;
    for (int64_t e = 0; e < D; ++e) dst[e] = rot_v ? dot(orow, rot_v + e * D, D) : orow[e];
    if (mu_v)
      for (int64_t e = 0; e < D; ++e) dst[e] += mu_v[bh * D + e];
  }
  // commit: the leaving ring token into the body (quantized first, written only if it is valid)
  if (leave_slot >= 0) {
    const Packed* bodies[2] = {&k_body, &v_body};
    const void* rings[2] = {k_ring, v_ring};
    const float* thresholds[2] = {k_thresholds, v_thresholds};
    std::vector<uint8_t> codes[2];
    std::vector<float> scales[2];
    for (int side = 0; side < 2; ++side) {
      const Packed& p = *bodies[side];
      const int64_t row_bytes = D * p.bits / 8, nb = D / p.block;
      std::vector<float> rows(BH * D);
      for (int64_t bh = 0; bh < BH; ++bh)
        load_fp(rings[side], (bh * ring_slots + leave_slot) * D, D, fp_bf16, rows.data() + bh * D);
      codes[side].resize(BH * row_bytes);
      scales[side].resize(BH * nb);
      // keys with feedback rounding: one matrix per (b, h) row; they code against the plain levels
      const bool fb = side == 0 && k_feedback, fit = (fit_sides >> side) & 1;
      if (nqkv_quantize_rows(rows.data(), 0, BH, D, p.block, thresholds[side], p.bits, p.scale_fmt, max_scale,
                             codes[side].data(), scales[side].data(), 1, fb ? k_levels : p.codebook,
                             fit ? fit_ratios : nullptr, fit ? n_fit : 0, fb ? k_feedback : nullptr, 1))
        return 2;
    }
    for (int side = 0; side < 2; ++side) {
      const Packed& p = *bodies[side];
      const int64_t row_bytes = D * p.bits / 8, nb = D / p.block;
      for (int64_t bh = 0; bh < BH; ++bh) {
        const int64_t b = bh / Hkv, h = bh % Hkv;
        std::memcpy(const_cast<uint8_t*>(packed_row(p, b, h, body_slot)), codes[side].data() + bh * row_bytes,
                    row_bytes);
        const int64_t si = scale_index(p, b, h, body_slot);
        for (int64_t i = 0; i < nb; ++i) {
          const float a = scales[side][bh * nb + i];
          store_scale(const_cast<void*>(p.absmax), si + i, p.scale_fmt, a);
        }
      }
    }
  }
  for (int64_t bh = 0; bh < BH; ++bh) {
    if (sink_slot >= 0) {
      store_fp(k_sink, (bh * sink_slots + sink_slot) * D, D, fp_bf16, kn.data() + bh * D);
      store_fp(v_sink, (bh * sink_slots + sink_slot) * D, D, fp_bf16, vn.data() + bh * D);
    } else if (ring_slot >= 0) {
      store_fp(k_ring, (bh * ring_slots + ring_slot) * D, D, fp_bf16, kn.data() + bh * D);
      store_fp(v_ring, (bh * ring_slots + ring_slot) * D, D, fp_bf16, vn.data() + bh * D);
    }
  }
  return 0;
}

}  // extern "C"
