// Shared pieces of the CPU kernels: argument checks, the fixed chunking that makes every
// reduction independent of the thread count, and lane-split accumulation.
#pragma once

#include "../tensor_api.h"

#include "simd_sums.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mtlsam {
namespace cpu {

// Work is cut into chunks of at most kChunk elements that never straddle a segment. Each
// chunk's partial result is computed by one thread in a fixed order; partials are then summed
// per segment in chunk order, so results do not depend on how chunks are spread over threads.
// 4096 elements (16 KiB of fp32) keeps a chunk of g0 in L1 while it is re-read for each task
// in gl_layer_stats; the CPU benchmark (bench/cpu_ops_bench.py) saw 2048..16384 within 3%.
constexpr int64_t kChunk = 4096;
// Independent accumulators per reduction: lets the compiler keep 8 lanes in SIMD registers
// without reassociating floating-point sums (the lane order is part of the definition).
constexpr int kLanes = 8;

struct Chunk {
  int64_t seg;    // segment index
  int64_t begin;  // element range [begin, end)
  int64_t end;
};

inline void check_flat(const Tensor& t, const char* name) {
  MTLSAM_CHECK(t.is_cpu(), name, " must be a CPU tensor");
  MTLSAM_CHECK(t.dim() == 1, name, " must be 1-D (a flat buffer), got ", t.dim(), "-D");
  MTLSAM_CHECK(t.is_contiguous(), name, " must be contiguous");
  MTLSAM_CHECK(is_floating(t.scalar_type()), name, " must be floating point, got ",
              t.scalar_type());
}

inline void check_like(const Tensor& t, const Tensor& ref, const char* name) {
  check_flat(t, name);
  MTLSAM_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  MTLSAM_CHECK(t.numel() == ref.numel(), name, " has ", t.numel(), " elements, expected ",
              ref.numel());
}

// A buffer a kernel writes must not share memory with another buffer of the same call: the
// element-wise loops are compiled on that promise (__restrict__) so that they vectorise.
inline void check_disjoint(const Tensor& a, const Tensor& b, const char* an, const char* bn) {
  const char* pa = static_cast<const char*>(a.const_data_ptr());
  const char* pb = static_cast<const char*>(b.const_data_ptr());
  const int64_t na = a.numel() * static_cast<int64_t>(a.element_size());
  const int64_t nb = b.numel() * static_cast<int64_t>(b.element_size());
  MTLSAM_CHECK(na == 0 || nb == 0 || pa + na <= pb || pb + nb <= pa, an, " and ", bn,
               " share memory; pass separate buffers");
}

inline void check_table(const Tensor& t, const char* name) {
  MTLSAM_CHECK(t.is_cpu(), name, " must be a CPU int64 tensor");
  MTLSAM_CHECK(t.scalar_type() == ScalarType::Long, name, " must be int64, got ", t.scalar_type());
  MTLSAM_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
}

// Offsets: non-empty, starting at 0, non-decreasing, ending at n.
inline void check_offsets(const Tensor& off, int64_t n) {
  check_table(off, "offsets");
  MTLSAM_CHECK(off.numel() >= 1, "offsets must have at least one entry");
  const int64_t* o = off.const_data_ptr<int64_t>();
  const int64_t s = off.numel() - 1;
  MTLSAM_CHECK(o[0] == 0 && o[s] == n, "offsets must start at 0 and end at ", n, ", got [",
              o[0], ", ..., ", o[s], "]");
  for (int64_t i = 0; i < s; ++i) {
    MTLSAM_CHECK(o[i] <= o[i + 1], "offsets must be non-decreasing (at segment ", i, ")");
  }
}

// Sampled table: equal lengths, ranges inside the flat buffer (n) and the local buffer (m),
// sorted by start and non-overlapping in the flat buffer.
inline void check_sampled(const Tensor& st, const Tensor& ln, const Tensor& ls,
                          int64_t n, int64_t m) {
  check_table(st, "starts");
  check_table(ln, "lengths");
  check_table(ls, "local_starts");
  MTLSAM_CHECK(st.numel() == ln.numel() && st.numel() == ls.numel(),
              "starts, lengths and local_starts must have equal length");
  const int64_t* s = st.const_data_ptr<int64_t>();
  const int64_t* l = ln.const_data_ptr<int64_t>();
  const int64_t* q = ls.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < st.numel(); ++p) {
    MTLSAM_CHECK(s[p] >= 0 && l[p] >= 0 && q[p] >= 0, "sampled segment ", p,
                " has negative entries");
    MTLSAM_CHECK(s[p] + l[p] <= n, "sampled segment ", p, " runs past the flat buffer (", n,
                " elements)");
    MTLSAM_CHECK(q[p] + l[p] <= m, "sampled segment ", p,
                " runs past the local-gradient buffer (", m, " columns)");
    MTLSAM_CHECK(p == 0 || s[p - 1] + l[p - 1] <= s[p],
                "sampled segments must be sorted by start and must not overlap");
  }
}

// Chunks of segments given by (begin, length) pairs.
inline std::vector<Chunk> make_chunks(const int64_t* begin, const int64_t* length,
                                      int64_t nseg) {
  std::vector<Chunk> out;
  for (int64_t s = 0; s < nseg; ++s) {
    const int64_t b = begin[s], e = begin[s] + length[s];
    for (int64_t c = b; c < e; c += kChunk) out.push_back({s, c, std::min(c + kChunk, e)});
  }
  return out;
}

inline std::vector<Chunk> chunks_of_offsets(const int64_t* o, int64_t nseg) {
  std::vector<int64_t> len(nseg);
  for (int64_t s = 0; s < nseg; ++s) len[s] = o[s + 1] - o[s];
  return make_chunks(o, len.data(), nseg);
}

inline std::vector<Chunk> chunks_of_offsets(const Tensor& offsets) {
  return chunks_of_offsets(offsets.const_data_ptr<int64_t>(), offsets.numel() - 1);
}

// Sum the lanes in a fixed tree order.
template <typename acc_t>
inline acc_t lane_sum(const acc_t* a) {
  static_assert(kLanes == 8, "lane_sum assumes 8 lanes");
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// A range in the accumulation type: the data itself when no conversion is needed (the more
// specialised overload wins), else a converted copy in buf (fp16/bf16 -> fp32).
template <typename acc_t>
inline const acc_t* as_acc(const acc_t* src, int64_t, acc_t*) {
  return src;
}

inline const float* as_acc(const BFloat16* src, int64_t len, float* buf) {
  static_assert(sizeof(BFloat16) == sizeof(uint16_t), "bf16 is 16 bits");
  widen_bf16(reinterpret_cast<const uint16_t*>(src), len, buf);
  return buf;
}

inline const float* as_acc(const Half* src, int64_t len, float* buf) {
  static_assert(sizeof(Half) == sizeof(uint16_t), "fp16 is 16 bits");
  if (!widen_fp16(reinterpret_cast<const uint16_t*>(src), len, buf)) {
    for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<float>(src[j]);
  }
  return buf;
}

template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t len, acc_t* buf) {
  for (int64_t j = 0; j < len; ++j) buf[j] = static_cast<acc_t>(src[j]);
  return buf;
}

// Store float results into the tensor's dtype: fp16 narrowed with F16C where available (the
// element-by-element c10 conversion ran fp16 sub_/combine_ at 3 GB/s), bf16 rounded in
// registers (store_bf16), others cast.
inline void store_acc(const float* src, int64_t len, Half* dst) {
  if (!narrow_fp16(src, len, reinterpret_cast<uint16_t*>(dst))) {
    for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<Half>(src[j]);
  }
}

inline void store_acc(const float* src, int64_t len, BFloat16* dst) {
  store_bf16(src, len, reinterpret_cast<uint16_t*>(dst));
}

template <typename scalar_t, typename acc_t>
inline void store_acc(const acc_t* src, int64_t len, scalar_t* dst) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

// r[j] := r[j] - o[j] over [0, len) in the accumulation type. bf16 and fp16 (with F16C) in
// registers (simd_sums); fp16 without F16C through float scratch; fp32/fp64 in the loop.
template <typename scalar_t>
inline void sub_range(scalar_t* r, const scalar_t* o, int64_t len) {
  using acc_t = opmath_t<scalar_t>;
  for (int64_t j = 0; j < len; ++j) {
    r[j] = static_cast<scalar_t>(static_cast<acc_t>(r[j]) - static_cast<acc_t>(o[j]));
  }
}

inline void sub_range(BFloat16* r, const BFloat16* o, int64_t len) {
  sub_bf16(reinterpret_cast<uint16_t*>(r), reinterpret_cast<const uint16_t*>(o), len);
}

inline void sub_range(Half* r, const Half* o, int64_t len) {
  if (sub_fp16(reinterpret_cast<uint16_t*>(r), reinterpret_cast<const uint16_t*>(o), len)) {
    return;
  }
  constexpr int64_t kPiece = 1024;
  float a[kPiece], b[kPiece];
  for (int64_t s = 0; s < len; s += kPiece) {
    const int64_t m = std::min(kPiece, len - s);
    const float* x = as_acc(r + s, m, a);
    const float* y = as_acc(o + s, m, b);
    for (int64_t j = 0; j < m; ++j) a[j] = x[j] - y[j];
    store_acc(a, m, r + s);
  }
}

// Grain for parallel_for over chunks: a few chunks per task keeps scheduling cheap.
constexpr int64_t kGrain = 4;

}  // namespace cpu
}  // namespace mtlsam
