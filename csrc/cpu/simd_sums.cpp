// Definitions of simd_sums.h: one generic body per reduction, instantiated for float and
// double, compiled once for AVX2 and once for the x86-64 baseline, chosen at first use.
#include "simd_sums.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MTLSAM_X86 1
#define MTLSAM_AVX2 __attribute__((target("avx2")))
#else
#define MTLSAM_AVX2
#endif
// The generic bodies are forced inline, so each entry point is compiled for its own target.
#define MTLSAM_INLINE inline __attribute__((always_inline))
// GCC warns that a 64-byte vector (Vec8<double>) returned by value has a different ABI with and
// without AVX-512. Every function that does so is forced inline into one entry point compiled
// for a single target, so no such value ever crosses a call boundary: the warning is noise.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace mtlsam {
namespace cpu {

namespace {

template <typename T>
MTLSAM_INLINE T tree(const T* a) {
  // Fixed pairwise order over the 32 lanes.
  T b[16];
  for (int l = 0; l < 16; ++l) b[l] = a[l] + a[l + 16];
  for (int l = 0; l < 8; ++l) b[l] = b[l] + b[l + 8];
  for (int l = 0; l < 4; ++l) b[l] = b[l] + b[l + 4];
  return (b[0] + b[2]) + (b[1] + b[3]);
}

template <typename T>
MTLSAM_INLINE T sumsq_t(const T* x, int64_t n) {
  T a[kWide] = {};
  int64_t j = 0;
  for (; j + kWide <= n; j += kWide) {
    for (int l = 0; l < kWide; ++l) a[l] += x[j + l] * x[j + l];
  }
  for (int l = 0; j < n; ++j, ++l) a[l] += x[j] * x[j];
  return tree(a);
}

template <typename T>
MTLSAM_INLINE T sumsq_scaled_t(const T* x, const T* t, int64_t n) {
  T a[kWide] = {};
  int64_t j = 0;
  for (; j + kWide <= n; j += kWide) {
    for (int l = 0; l < kWide; ++l) {
      const T v = t[j + l] * x[j + l];
      a[l] += v * v;
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    const T v = t[j] * x[j];
    a[l] += v * v;
  }
  return tree(a);
}

template <typename T>
MTLSAM_INLINE T tree8(const T* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// Register tiles of the Gram: A rows against B rows, every element of each row loaded once per
// tile. With `upper`, a and b are the same rows and only pairs p <= q are formed (A (A + 1) / 2
// accumulators). Tiles of at most 10 pairs keep the fp32 accumulators (one AVX2 register each)
// and the row loads within the 16 vector registers. The gram used to take each pair as its own
// dot (two loads per pair from L2): 0.59 of torch.dot's read bandwidth at K = 4 (ops_bench,
// resnet18 layout); one sweep per tile reads each row piece once per tile instead.
template <typename T>
struct Vec8Of;
template <>
struct Vec8Of<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec8Of<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using Vec8 = typename Vec8Of<T>::type;

// Eight consecutive elements as a vector of the accumulation type, and one element: float and
// double as they are; bfloat16 (its bits as uint16_t) widened exactly in registers, so bf16
// inputs need no converted copy (which held bf16 gram at 0.24 of torch.dot's bandwidth).
MTLSAM_INLINE Vec8<float> load8(const float* p) {
  Vec8<float> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
MTLSAM_INLINE Vec8<double> load8(const double* p) {
  Vec8<double> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));
// bfloat16 bits to float: each element zero-extended and shifted into the upper half. Built
// element by element, which GCC compiles to one vpmovzxwd from memory on the AVX2 path;
// __builtin_convertvector of a 16-byte vector became two 128-bit extends, a byte shift and an
// insert (4 shuffle-port uops per 8 elements), and bf16 segment_sumsq ran at 14 GB/s where
// fp16 (F16C) reached 20 (0.64 vs 0.92 of torch.dot's read bandwidth, 11.7M elements).
MTLSAM_INLINE Vec8<float> load8(const uint16_t* p) {
  const U32x8 w = U32x8{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]} << 16;
  Vec8<float> v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
// float16 bits, tagged by how they are widened: HalfSw in portable code (any x86-64),
// HalfHw with the F16C instruction (only inside functions compiled for it). Both conversions
// are exact, so the same arithmetic on them gives the same bits.
struct HalfSw {
  uint16_t bits;
};
struct HalfHw {
  uint16_t bits;
};
static_assert(sizeof(HalfSw) == 2 && sizeof(HalfHw) == 2, "fp16 tags are the bits");

MTLSAM_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu, bits;
  if (exp == 0x1fu) {  // inf / nan
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {  // normal: rebias 15 -> 127
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal man * 2^-24: normalise
    uint32_t e = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

MTLSAM_INLINE Vec8<float> load8(const HalfSw* p) {
  float f[8];
  for (int l = 0; l < 8; ++l) f[l] = half_to_float(p[l].bits);
  return load8(f);
}
MTLSAM_INLINE float load1(const HalfSw* p) { return half_to_float(p->bits); }
#ifdef MTLSAM_X86
// vcvtph2ps as inline assembly: the intrinsic carries target("f16c"), which GCC refuses to
// inline through the target-less generic tile it is called from; the instruction is only
// ever reached from the entry points compiled for AVX2 + F16C (MTLSAM_FP16_ENTRY_POINTS).
MTLSAM_INLINE Vec8<float> load8(const HalfHw* p) {
  U16x8 h;
  std::memcpy(&h, p, sizeof(h));
  Vec8<float> v;
  asm("vcvtph2ps %1, %0" : "=x"(v) : "x"(h));
  return v;
}
MTLSAM_INLINE float load1(const HalfHw* p) { return half_to_float(p->bits); }  // (tails)
#endif

MTLSAM_INLINE float load1(const float* p) { return *p; }
MTLSAM_INLINE double load1(const double* p) { return *p; }
MTLSAM_INLINE float load1(const uint16_t* p) {
  const uint32_t bits = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T, int A, int B, bool upper, typename S>
MTLSAM_INLINE void tile(const S* const* a, const S* const* b, int64_t n, T* out) {
  // GCC vector types, so that the accumulators are registers rather than an array in memory
  // (the plain-array form kept them on the stack). No FMA: the target never enables it.
  using V = Vec8<T>;
  V acc[A][B];
#pragma GCC unroll 16
  for (int p = 0; p < A; ++p) {
#pragma GCC unroll 16
    for (int q = 0; q < B; ++q) acc[p][q] = V{};
  }
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    V x[A], y[B];
#pragma GCC unroll 16
    for (int p = 0; p < A; ++p) x[p] = load8(a[p] + j);
#pragma GCC unroll 16
    for (int q = 0; q < B; ++q) {
      if (upper) {
        y[q] = x[q < A ? q : 0];
      } else {
        y[q] = load8(b[q] + j);
      }
    }
#pragma GCC unroll 16
    for (int p = 0; p < A; ++p) {
#pragma GCC unroll 16
      for (int q = upper ? p : 0; q < B; ++q) acc[p][q] += x[p] * y[q];
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    for (int p = 0; p < A; ++p) {
      for (int q = upper ? p : 0; q < B; ++q) acc[p][q][l] += load1(a[p] + j) * load1(b[q] + j);
    }
  }
  for (int p = 0; p < A; ++p) {
    for (int q = upper ? p : 0; q < B; ++q) {
      T lanes[8];
      std::memcpy(lanes, &acc[p][q], sizeof(V));
      out[p * B + q] = tree8(lanes);
    }
  }
}

// <v_i, g> and <v_i, v_i> for B rows v_i against one g, each row and g loaded once: the
// global-local layer statistics of B tasks (2 B accumulators + B + 1 loads <= 16 registers).
template <typename T, int B, typename S>
MTLSAM_INLINE void dots_sumsqs_tile(const S* g, const S* const* v, int64_t n, T* d, T* q) {
  using V = Vec8<T>;
  V ad[B], aq[B];
#pragma GCC unroll 16
  for (int i = 0; i < B; ++i) ad[i] = aq[i] = V{};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const V x = load8(g + j);
#pragma GCC unroll 16
    for (int i = 0; i < B; ++i) {
      const V y = load8(v[i] + j);
      ad[i] += y * x;
      aq[i] += y * y;
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    for (int i = 0; i < B; ++i) {
      const T y = load1(v[i] + j);
      ad[i][l] += y * load1(g + j);
      aq[i][l] += y * y;
    }
  }
  for (int i = 0; i < B; ++i) {
    T lanes[8];
    std::memcpy(lanes, &ad[i], sizeof(V));
    d[i] = tree8(lanes);
    std::memcpy(lanes, &aq[i], sizeof(V));
    q[i] = tree8(lanes);
  }
}

template <typename T, typename S>
MTLSAM_INLINE void dots_sumsqs_t(const S* g, const S* const* v, int64_t k, int64_t n, T* d,
                                 T* q) {
  for (int64_t i = 0; i < k; i += 4) {
    switch (std::min<int64_t>(4, k - i)) {
      case 1: dots_sumsqs_tile<T, 1, S>(g, v + i, n, d + i, q + i); break;
      case 2: dots_sumsqs_tile<T, 2, S>(g, v + i, n, d + i, q + i); break;
      case 3: dots_sumsqs_tile<T, 3, S>(g, v + i, n, d + i, q + i); break;
      default: dots_sumsqs_tile<T, 4, S>(g, v + i, n, d + i, q + i); break;
    }
  }
}

template <typename T, int A, typename S>
MTLSAM_INLINE void tile_rows(const S* const* a, const S* const* b, int64_t nb, int64_t n,
                             T* out) {
  switch (nb) {
    case 1: tile<T, A, 1, false>(a, b, n, out); break;
    case 2: tile<T, A, 2, false>(a, b, n, out); break;
    case 3: tile<T, A, 3, false>(a, b, n, out); break;
    default: tile<T, A, 4, false>(a, b, n, out); break;
  }
}

template <typename T, typename S>
MTLSAM_INLINE void pair_dots_t(const S* const* rows, int64_t k, int64_t n, T* out) {
  T t[16];
  // out index of pair (i, j), i <= j, in row-major upper-triangle order
  auto at = [k](int64_t i, int64_t j) { return i * k - i * (i - 1) / 2 + (j - i); };
  for (int64_t i0 = 0; i0 < k; i0 += 4) {
    const int64_t ni = std::min<int64_t>(4, k - i0);
    const S* const* a = rows + i0;
    switch (ni) {  // the diagonal block
      case 1: tile<T, 1, 1, true, S>(a, a, n, t); break;
      case 2: tile<T, 2, 2, true, S>(a, a, n, t); break;
      case 3: tile<T, 3, 3, true, S>(a, a, n, t); break;
      default: tile<T, 4, 4, true, S>(a, a, n, t); break;
    }
    for (int64_t p = 0; p < ni; ++p) {
      for (int64_t q = p; q < ni; ++q) out[at(i0 + p, i0 + q)] = t[p * ni + q];
    }
    for (int64_t j0 = i0 + 4; j0 < k; j0 += 4) {  // blocks right of it, two rows at a time
      const int64_t nj = std::min<int64_t>(4, k - j0);
      for (int64_t p0 = 0; p0 < ni; p0 += 2) {
        const int64_t np = std::min<int64_t>(2, ni - p0);
        if (np == 2) {
          tile_rows<T, 2, S>(a + p0, rows + j0, nj, n, t);
        } else {
          tile_rows<T, 1, S>(a + p0, rows + j0, nj, n, t);
        }
        for (int64_t p = 0; p < np; ++p) {
          for (int64_t q = 0; q < nj; ++q) out[at(i0 + p0 + p, j0 + q)] = t[p * nj + q];
        }
      }
    }
  }
}

// sum (t x)^2 of 16-bit x (and t) read in place, widened in registers: the same 32 lanes
// (lane l takes the elements j with j % 32 == l, in order) and the same tree as sumsq_t on the
// widened floats, so the same bits as converting first (exact) and summing the copy.
template <bool Scaled, typename S>
MTLSAM_INLINE float sumsq16_t(const S* x, const S* t, int64_t n) {
  using V = Vec8<float>;
  V acc[4] = {V{}, V{}, V{}, V{}};
  int64_t j = 0;
  for (; j + kWide <= n; j += kWide) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      V v = load8(x + j + 8 * q);
      if (Scaled) v = load8(t + j + 8 * q) * v;
      acc[q] += v * v;
    }
  }
  float a[kWide];
  std::memcpy(a, acc, sizeof(a));
  for (int l = 0; j < n; ++j, ++l) {
    float v = load1(x + j);
    if (Scaled) v = load1(t + j) * v;
    a[l] += v * v;
  }
  return tree(a);
}

// r := bf16(float(r) - float(o)) in registers; float -> bf16 rounds to nearest even and maps
// NaN to 0x7FC0, as c10's BFloat16 conversion does (the torch reference's .to(bfloat16)).
MTLSAM_INLINE uint16_t narrow_bf16(float f) {
  if (f != f) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

// 8 floats to bf16 bit patterns: round to nearest even, NaN -> 0x7FC0.
MTLSAM_INLINE U16x8 narrow8_bf16(Vec8<float> d) {
  U32x8 u;
  std::memcpy(&u, &d, sizeof(u));
  const U32x8 nan = (U32x8)(d != d);  // all ones where NaN
  const U32x8 rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const U32x8 bits = (rounded & ~nan) | ((U32x8{} + 0x7FC0u) & nan);
  return __builtin_convertvector(bits, U16x8);
}

MTLSAM_INLINE void sub_bf16_t(uint16_t* r, const uint16_t* o, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const U16x8 out = narrow8_bf16(load8(r + j) - load8(o + j));
    std::memcpy(r + j, &out, sizeof(out));
  }
  for (; j < n; ++j) r[j] = narrow_bf16(load1(r + j) - load1(o + j));
}

// dst := bf16(src), the rounding of sub_bf16_t (a combine's accumulator stored as bf16: the
// element-by-element c10 conversion held bf16 combine_ at 7-10 GB/s).
MTLSAM_INLINE void store_bf16_t(const float* src, int64_t n, uint16_t* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    Vec8<float> d;
    std::memcpy(&d, src + j, sizeof(d));
    const U16x8 out = narrow8_bf16(d);
    std::memcpy(dst + j, &out, sizeof(out));
  }
  for (; j < n; ++j) dst[j] = narrow_bf16(src[j]);
}

MTLSAM_INLINE void widen_bf16_t(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = static_cast<uint32_t>(src[j]) << 16;
    std::memcpy(dst + j, &bits, sizeof(float));
  }
}

}  // namespace

// One set of entry points per instruction set; the same source, so the same results.
#define MTLSAM_ENTRY_POINTS(ATTR)                                                          \
  ATTR float sumsq(const float* x, int64_t n) { return sumsq_t(x, n); }                    \
  ATTR double sumsq(const double* x, int64_t n) { return sumsq_t(x, n); }                  \
  ATTR float sumsq_scaled(const float* x, const float* t, int64_t n) {                     \
    return sumsq_scaled_t(x, t, n);                                                        \
  }                                                                                        \
  ATTR double sumsq_scaled(const double* x, const double* t, int64_t n) {                  \
    return sumsq_scaled_t(x, t, n);                                                        \
  }                                                                                        \
  ATTR void pair_dots(const float* const* r, int64_t k, int64_t n, float* out) {           \
    pair_dots_t(r, k, n, out);                                                             \
  }                                                                                        \
  ATTR void pair_dots(const double* const* r, int64_t k, int64_t n, double* out) {         \
    pair_dots_t(r, k, n, out);                                                             \
  }                                                                                        \
  ATTR void dots_sumsqs(const float* g, const float* const* v, int64_t k, int64_t n,       \
                        float* d, float* q) {                                              \
    dots_sumsqs_t(g, v, k, n, d, q);                                                       \
  }                                                                                        \
  ATTR void dots_sumsqs(const double* g, const double* const* v, int64_t k, int64_t n,     \
                        double* d, double* q) {                                            \
    dots_sumsqs_t(g, v, k, n, d, q);                                                       \
  }                                                                                        \
  ATTR void pair_dots_bf16(const uint16_t* const* r, int64_t k, int64_t n, float* out) {  \
    pair_dots_t(r, k, n, out);                                                             \
  }                                                                                        \
  ATTR void dots_sumsqs_bf16(const uint16_t* g, const uint16_t* const* v, int64_t k,       \
                             int64_t n, float* d, float* q) {                              \
    dots_sumsqs_t(g, v, k, n, d, q);                                                       \
  }                                                                                        \
  ATTR void widen_bf16(const uint16_t* src, int64_t n, float* dst) {                       \
    widen_bf16_t(src, n, dst);                                                             \
  }                                                                                        \
  ATTR void sub_bf16(uint16_t* r, const uint16_t* o, int64_t n) { sub_bf16_t(r, o, n); }   \
  ATTR void store_bf16(const float* src, int64_t n, uint16_t* dst) {                      \
    store_bf16_t(src, n, dst);                                                             \
  }                                                                                        \
  ATTR float sumsq_bf16(const uint16_t* x, int64_t n) {                                    \
    return sumsq16_t<false>(x, x, n);                                                      \
  }                                                                                        \
  ATTR float sumsq_scaled_bf16(const uint16_t* x, const uint16_t* t, int64_t n) {          \
    return sumsq16_t<true>(x, t, n);                                                       \
  }

// fp16 rows read in place, widened in registers: HalfSw on the baseline, HalfHw with F16C.
#define MTLSAM_FP16_ENTRY_POINTS(ATTR, H)                                                  \
  ATTR void pair_dots_fp16(const uint16_t* const* r, int64_t k, int64_t n, float* out) {  \
    pair_dots_t(reinterpret_cast<const H* const*>(r), k, n, out);                          \
  }                                                                                        \
  ATTR void dots_sumsqs_fp16(const uint16_t* g, const uint16_t* const* v, int64_t k,       \
                             int64_t n, float* d, float* q) {                              \
    dots_sumsqs_t(reinterpret_cast<const H*>(g), reinterpret_cast<const H* const*>(v), k,  \
                  n, d, q);                                                                \
  }                                                                                        \
  ATTR float sumsq_fp16(const uint16_t* x, int64_t n) {                                    \
    return sumsq16_t<false>(reinterpret_cast<const H*>(x), reinterpret_cast<const H*>(x),  \
                            n);                                                            \
  }                                                                                        \
  ATTR float sumsq_scaled_fp16(const uint16_t* x, const uint16_t* t, int64_t n) {          \
    return sumsq16_t<true>(reinterpret_cast<const H*>(x), reinterpret_cast<const H*>(t),   \
                           n);                                                             \
  }

namespace baseline {
MTLSAM_ENTRY_POINTS()
MTLSAM_FP16_ENTRY_POINTS(, HalfSw)
}  // namespace baseline
#ifdef MTLSAM_X86
namespace avx2 {
MTLSAM_ENTRY_POINTS(MTLSAM_AVX2)
MTLSAM_FP16_ENTRY_POINTS(__attribute__((target("avx2,f16c"))), HalfHw)
}  // namespace avx2
#endif

// AVX2 when the CPU has it, unless MTLSAM_CPU_ISA=baseline (the tests run both and compare).
static bool use_avx2() {
  static const bool yes = [] {
    const char* env = std::getenv("MTLSAM_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "baseline") == 0) return false;
#ifdef MTLSAM_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
#else
    return false;
#endif
  }();
  return yes;
}

#ifdef MTLSAM_X86
// fp16 -> fp32 with the F16C conversion instruction (exact, like the scalar conversion).
__attribute__((target("avx2,f16c"))) static void widen_fp16_f16c(const uint16_t* src, int64_t n,
                                                                  float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
  }
  for (; j < n; ++j) dst[j] = _cvtsh_ss(src[j]);
}

// fp32 -> fp16, round to nearest even (as the scalar conversion), with F16C.
__attribute__((target("avx2,f16c"))) static void narrow_fp16_f16c(const float* src, int64_t n,
                                                                   uint16_t* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), h);
  }
  for (; j < n; ++j) dst[j] = _cvtss_sh(src[j], _MM_FROUND_TO_NEAREST_INT);
}

static bool use_f16c() {
  static const bool yes = use_avx2() && __builtin_cpu_supports("f16c") != 0;
  return yes;
}

// r := fp16(float(r) - float(o)) with F16C in registers (round to nearest even, as the
// piecewise conversion through float scratch it replaces).
__attribute__((target("avx2,f16c"))) static void sub_fp16_f16c(uint16_t* r, const uint16_t* o,
                                                               int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j)));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(o + j)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(r + j),
                     _mm256_cvtps_ph(_mm256_sub_ps(a, b), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; j < n; ++j) {
    r[j] = _cvtss_sh(_cvtsh_ss(r[j]) - _cvtsh_ss(o[j]), _MM_FROUND_TO_NEAREST_INT);
  }
}
#endif

#ifdef MTLSAM_X86
bool widen_fp16(const uint16_t* src, int64_t n, float* dst) {
  return use_f16c() && (widen_fp16_f16c(src, n, dst), true);
}
bool narrow_fp16(const float* src, int64_t n, uint16_t* dst) {
  return use_f16c() && (narrow_fp16_f16c(src, n, dst), true);
}
bool sub_fp16(uint16_t* r, const uint16_t* o, int64_t n) {
  return use_f16c() && (sub_fp16_f16c(r, o, n), true);
}
#else
bool sub_fp16(uint16_t*, const uint16_t*, int64_t) { return false; }
bool widen_fp16(const uint16_t*, int64_t, float*) { return false; }
bool narrow_fp16(const float*, int64_t, uint16_t*) { return false; }
#endif

const char* simd_isa() { return use_avx2() ? "avx2" : "baseline"; }

#ifdef MTLSAM_X86
#define MTLSAM_PICK(call) (use_avx2() ? avx2::call : baseline::call)
#else
#define MTLSAM_PICK(call) (baseline::call)
#endif

float sumsq(const float* x, int64_t n) { return MTLSAM_PICK(sumsq(x, n)); }
double sumsq(const double* x, int64_t n) { return MTLSAM_PICK(sumsq(x, n)); }
float sumsq_scaled(const float* x, const float* t, int64_t n) {
  return MTLSAM_PICK(sumsq_scaled(x, t, n));
}
double sumsq_scaled(const double* x, const double* t, int64_t n) {
  return MTLSAM_PICK(sumsq_scaled(x, t, n));
}
void pair_dots(const float* const* r, int64_t k, int64_t n, float* out) {
  MTLSAM_PICK(pair_dots(r, k, n, out));
}
void pair_dots(const double* const* r, int64_t k, int64_t n, double* out) {
  MTLSAM_PICK(pair_dots(r, k, n, out));
}

void dots_sumsqs(const float* g, const float* const* v, int64_t k, int64_t n, float* d,
                 float* q) {
  MTLSAM_PICK(dots_sumsqs(g, v, k, n, d, q));
}
void dots_sumsqs(const double* g, const double* const* v, int64_t k, int64_t n, double* d,
                 double* q) {
  MTLSAM_PICK(dots_sumsqs(g, v, k, n, d, q));
}
void pair_dots_bf16(const uint16_t* const* r, int64_t k, int64_t n, float* out) {
  MTLSAM_PICK(pair_dots_bf16(r, k, n, out));
}
void dots_sumsqs_bf16(const uint16_t* g, const uint16_t* const* v, int64_t k, int64_t n,
                      float* d, float* q) {
  MTLSAM_PICK(dots_sumsqs_bf16(g, v, k, n, d, q));
}
void widen_bf16(const uint16_t* src, int64_t n, float* dst) {
  MTLSAM_PICK(widen_bf16(src, n, dst));
}

#ifdef MTLSAM_X86
#define MTLSAM_PICK_FP16(call) (use_f16c() ? avx2::call : baseline::call)
#else
#define MTLSAM_PICK_FP16(call) (baseline::call)
#endif
void pair_dots_fp16(const uint16_t* const* r, int64_t k, int64_t n, float* out) {
  MTLSAM_PICK_FP16(pair_dots_fp16(r, k, n, out));
}
float sumsq_bf16(const uint16_t* x, int64_t n) { return MTLSAM_PICK(sumsq_bf16(x, n)); }
void sub_bf16(uint16_t* r, const uint16_t* o, int64_t n) { MTLSAM_PICK(sub_bf16(r, o, n)); }
void store_bf16(const float* src, int64_t n, uint16_t* dst) {
  MTLSAM_PICK(store_bf16(src, n, dst));
}
float sumsq_scaled_bf16(const uint16_t* x, const uint16_t* t, int64_t n) {
  return MTLSAM_PICK(sumsq_scaled_bf16(x, t, n));
}
float sumsq_fp16(const uint16_t* x, int64_t n) { return MTLSAM_PICK_FP16(sumsq_fp16(x, n)); }
float sumsq_scaled_fp16(const uint16_t* x, const uint16_t* t, int64_t n) {
  return MTLSAM_PICK_FP16(sumsq_scaled_fp16(x, t, n));
}
void dots_sumsqs_fp16(const uint16_t* g, const uint16_t* const* v, int64_t k, int64_t n,
                      float* d, float* q) {
  MTLSAM_PICK_FP16(dots_sumsqs_fp16(g, v, k, n, d, q));
}

}  // namespace cpu
}  // namespace mtlsam
