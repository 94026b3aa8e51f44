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
// Inner products of every pair i <= j of k rows over [0, n), written to out in row-major
// upper-triangle order (k (k + 1) / 2 values). Each pair has its own 8 lanes (lane j % 8) and
// a fixed tree, so the result does not depend on how pairs are grouped into register tiles.
void pair_dots(const float* const* rows, int64_t k, int64_t n, float* out);
void pair_dots(const double* const* rows, int64_t k, int64_t n, double* out);
// d[i] = <v_i, g>, q[i] = <v_i, v_i> for k rows v_i, g read once per four rows; each value has
// 8 lanes and a fixed tree (the grouping does not change the result).
void dots_sumsqs(const float* g, const float* const* v, int64_t k, int64_t n, float* d,
                 float* q);
void dots_sumsqs(const double* g, const double* const* v, int64_t k, int64_t n, double* d,
                 double* q);
// The same two for bfloat16 rows (their bits), widened to float in registers as they are read.
void pair_dots_bf16(const uint16_t* const* rows, int64_t k, int64_t n, float* out);
void dots_sumsqs_bf16(const uint16_t* g, const uint16_t* const* v, int64_t k, int64_t n,
                      float* d, float* q);
// sumsq and sumsq_scaled of bfloat16 / float16 data (their bits) read in place, widened in
// registers; the same lanes and tree as the float versions on the widened values, so the same
// bits as widening first.
float sumsq_bf16(const uint16_t* x, int64_t n);
float sumsq_scaled_bf16(const uint16_t* x, const uint16_t* t, int64_t n);
float sumsq_fp16(const uint16_t* x, int64_t n);
float sumsq_scaled_fp16(const uint16_t* x, const uint16_t* t, int64_t n);
// The same two for float16 rows (their bits), widened in registers: with F16C where the CPU
// has it, by an exact portable conversion otherwise (the same values, so the same bits).
void pair_dots_fp16(const uint16_t* const* rows, int64_t k, int64_t n, float* out);
void dots_sumsqs_fp16(const uint16_t* g, const uint16_t* const* v, int64_t k, int64_t n,
                      float* d, float* q);
// bfloat16 bit patterns to float (exact: the bits shifted into the upper half), vectorised;
// the conversion that bf16 inputs of every reduction go through.
void widen_bf16(const uint16_t* src, int64_t n, float* dst);
// float16 bit patterns to float with the F16C instruction when the AVX2 path is in use (true);
// false otherwise, and the caller converts element by element (the same exact values).
bool widen_fp16(const uint16_t* src, int64_t n, float* dst);
// float to float16 bit patterns (round to nearest even), F16C on the AVX2 path (true); false
// otherwise, and the caller converts element by element (the same values).
bool narrow_fp16(const float* src, int64_t n, uint16_t* dst);
// r := r - o for 16-bit data (bits) in registers, through float, rounded to nearest even as
// c10's conversions do (bf16: NaN -> 0x7FC0). sub_fp16 needs F16C: false without it (the
// caller converts through float scratch then, the same values).
void sub_bf16(uint16_t* r, const uint16_t* o, int64_t n);
// dst := bf16(src) (bits), rounded as sub_bf16 rounds, in registers.
void store_bf16(const float* src, int64_t n, uint16_t* dst);
bool sub_fp16(uint16_t* r, const uint16_t* o, int64_t n);
// "avx2" or "baseline": the code path in use.
const char* simd_isa();

}  // namespace cpu
}  // namespace mtlsam
