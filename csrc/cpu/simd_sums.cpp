// Definitions of simd_sums.h: one generic body per reduction, instantiated for float and
// double, compiled once for AVX2 and once for the x86-64 baseline, chosen at first use.
#include "simd_sums.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define MTLSAM_X86 1
#define MTLSAM_AVX2 __attribute__((target("avx2")))
#else
#define MTLSAM_AVX2
#endif
// The generic bodies are forced inline, so each entry point is compiled for its own target.
#define MTLSAM_INLINE inline __attribute__((always_inline))

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
MTLSAM_INLINE T dot_t(const T* x, const T* y, int64_t n) {
  T a[kWide] = {};
  int64_t j = 0;
  for (; j + kWide <= n; j += kWide) {
    for (int l = 0; l < kWide; ++l) a[l] += x[j + l] * y[j + l];
  }
  for (int l = 0; j < n; ++j, ++l) a[l] += x[j] * y[j];
  return tree(a);
}

template <typename T>
MTLSAM_INLINE void dot_sumsq_t(const T* v, const T* g, int64_t n, T* d, T* q) {
  T a[kWide] = {}, b[kWide] = {};
  int64_t j = 0;
  for (; j + kWide <= n; j += kWide) {
    for (int l = 0; l < kWide; ++l) {
      a[l] += v[j + l] * g[j + l];
      b[l] += v[j + l] * v[j + l];
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    a[l] += v[j] * g[j];
    b[l] += v[j] * v[j];
  }
  *d = tree(a);
  *q = tree(b);
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
  ATTR float dot(const float* x, const float* y, int64_t n) { return dot_t(x, y, n); }     \
  ATTR double dot(const double* x, const double* y, int64_t n) { return dot_t(x, y, n); }  \
  ATTR void dot_sumsq(const float* v, const float* g, int64_t n, float* d, float* q) {     \
    dot_sumsq_t(v, g, n, d, q);                                                            \
  }                                                                                        \
  ATTR void dot_sumsq(const double* v, const double* g, int64_t n, double* d, double* q) { \
    dot_sumsq_t(v, g, n, d, q);                                                            \
  }

namespace baseline {
MTLSAM_ENTRY_POINTS()
}  // namespace baseline
#ifdef MTLSAM_X86
namespace avx2 {
MTLSAM_ENTRY_POINTS(MTLSAM_AVX2)
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
float dot(const float* x, const float* y, int64_t n) { return MTLSAM_PICK(dot(x, y, n)); }
double dot(const double* x, const double* y, int64_t n) { return MTLSAM_PICK(dot(x, y, n)); }
void dot_sumsq(const float* v, const float* g, int64_t n, float* d, float* q) {
  MTLSAM_PICK(dot_sumsq(v, g, n, d, q));
}
void dot_sumsq(const double* v, const double* g, int64_t n, double* d, double* q) {
  MTLSAM_PICK(dot_sumsq(v, g, n, d, q));
}

}  // namespace cpu
}  // namespace mtlsam
