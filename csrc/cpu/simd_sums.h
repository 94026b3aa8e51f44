// Reductions over contiguous float/double ranges, vectorised for the CPU the code runs on.
//
// Each function keeps kWide independent partial sums (lane l takes elements j with
// j % kWide == l) and adds them in a fixed tree at the end, so its result is a function of the
// data alone: the same bits for any thread count (callers cut the work into fixed chunks) and
// for every instruction set it is built for. The definitions (simd_sums.cpp) are compiled for
// AVX2 and for the x86-64 baseline and picked at first use from the CPU's features
// (MTLSAM_CPU_ISA=baseline forces the baseline), so one binary runs on any x86-64 CPU; no FMA
// is used, which is what keeps the AVX2 and baseline versions bit-identical.
#pragma once

#include <cstdint>

namespace mtlsam {
namespace cpu {

// 32 lanes = 4 AVX2 registers of fp32 (8 SSE registers on the baseline): enough independent
// add chains to hide the add latency, which the earlier 8 lanes (one or two registers) did not:
// segment_sumsq ran at 0.31 of torch.dot's read bandwidth with 8 lanes (ops_bench, 11.7M fp32).
constexpr int kWide = 32;

float sumsq(const float* x, int64_t n);
double sumsq(const double* x, int64_t n);
float sumsq_scaled(const float* x, const float* t, int64_t n);
double sumsq_scaled(const double* x, const double* t, int64_t n);
float dot(const float* x, const float* y, int64_t n);
double dot(const double* x, const double* y, int64_t n);
// d = <v, g>, q = <v, v> in one read of v.
void dot_sumsq(const float* v, const float* g, int64_t n, float* d, float* q);
void dot_sumsq(const double* v, const double* g, int64_t n, double* d, double* q);
// "avx2" or "baseline": the code path in use.
const char* simd_isa();

}  // namespace cpu
}  // namespace mtlsam
