// Shared helpers of the CUDA backend of the mtlsam ops (see csrc/registration.cpp for the
// schemas and mtlsam_ext/kernels/torch_ref.py for the reference semantics).
//
// Conventions used by every kernel:
// * Accumulation type: float for at::Half / at::BFloat16 / float, double for double.
// * Arithmetic that the reference performs as separate tensor ops (multiply, then add) is done
//   with explicit round-to-nearest intrinsics (__fmul_rn, __fadd_rn, ...) so nvcc cannot contract
//   it into FMAs: element-wise results then round exactly like the reference does. Reductions use
//   explicit fma() so the code generated for the vector and scalar paths is the same arithmetic.
// * Indices are int64 everywhere (offsets may exceed 2^31).
// * Reductions are deterministic: a fixed decomposition of the data into chunks (a function of
//   the shapes and the tables only, never of the number of SMs), a fixed assignment of elements to
//   threads, fixed-shape tree reductions inside a block, and per-chunk partials written to a
//   workspace that a second kernel sums in a fixed order. No float atomics are used.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>

namespace mtlsam_cuda {

// Threads per block of every kernel.
constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
// Elements of the flat buffer per chunk (one block per chunk in the flat-grid kernels). 8192 =
// 256 threads x 32 elements: 2 x 16-byte loads per thread and stream for fp16/bf16, 8 for fp32,
// 16 for fp64 -- enough bytes in flight per thread to run at memory bandwidth, while a 100M-element
// buffer still gives ~12k blocks (many waves on any GPU) and the partial-sum workspace stays at
// 1/8192 of the data.
constexpr int64_t kChunk = 8192;

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Elements per 16-byte vector.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
__host__ __device__ inline bool aligned16(const T* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

// ---- rounding-exact arithmetic (no FMA contraction) ----
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float fma_(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_(double a, double b, double c) { return fma(a, b, c); }

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return static_cast<T>(v);  // round to nearest even, as Tensor.to(dtype)
}

// ---- deterministic reductions ----
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;  // every lane holds the same value, reduced in a fixed butterfly order
}

// Sum over the whole block; the result is valid in thread 0. `scratch` holds kWarps values.
// Must be called by all threads of the block (it synchronises).
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A r = A(0);
  if (warp == 0) {
    r = lane < kWarps ? scratch[lane] : A(0);
    r = warp_sum(r);
  }
  __syncthreads();  // scratch may be reused right after
  return r;
}

// Largest s in [lo, hi] with off[s] <= i (off non-decreasing; lo satisfies it by assumption).
__device__ __forceinline__ int64_t last_le(const int64_t* off, int64_t lo, int64_t hi,
                                           int64_t i) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (off[mid] <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Grid size of grid-stride element-wise kernels (their results do not depend on it).
inline unsigned int elementwise_blocks(int64_t work_items) {
  const int64_t b = (work_items + kBlock - 1) / kBlock;
  return static_cast<unsigned int>(b < 1 ? 1 : (b > 65536 ? 65536 : b));
}

// ---- host-side argument checks ----
inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t,
                               const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), "mtlsam::", op, " (CUDA): ", name, " must be a CUDA tensor on ", dev,
              ", got a tensor on ", t.device());
  TORCH_CHECK(t.device() == dev, "mtlsam::", op, " (CUDA): ", name, " is on ", t.device(),
              " but the other tensors are on ", dev);
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "mtlsam::", op, " (CUDA): ", name,
              " must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(t.is_contiguous(), "mtlsam::", op, " (CUDA): ", name, " must be contiguous");
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const char* like_name, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "mtlsam::", op, " (CUDA): ", name,
              " has dtype ", t.scalar_type(), " but ", like_name, " has dtype ",
              like.scalar_type());
}

inline void check_flat(const char* op, const char* name, const at::Tensor& t, int64_t n = -1) {
  TORCH_CHECK(t.dim() == 1, "mtlsam::", op, " (CUDA): ", name,
              " must be 1-D (a flat buffer), got shape ", t.sizes());
  if (n >= 0)
    TORCH_CHECK(t.numel() == n, "mtlsam::", op, " (CUDA): ", name, " has ", t.numel(),
                " elements, expected ", n);
}

// Segment tables live in device memory as 1-D contiguous int64 tensors.
inline void check_table(const char* op, const char* name, const at::Tensor& t,
                        const at::Device& dev) {
  TORCH_CHECK(t.scalar_type() == at::kLong, "mtlsam::", op, " (CUDA): segment table ", name,
              " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.is_cuda() && t.device() == dev, "mtlsam::", op, " (CUDA): segment table ", name,
              " must be on ", dev, " (device memory), got ", t.device(),
              "; mtlsam_ext.kernels.ext copies CPU tables to the device");
  TORCH_CHECK(t.dim() == 1, "mtlsam::", op, " (CUDA): segment table ", name,
              " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "mtlsam::", op, " (CUDA): segment table ", name,
              " must be contiguous");
}

// A coefficient / weight vector: any floating dtype on the device, converted to the
// accumulation dtype (as the reference's coef.to(acc)).
inline at::Tensor coef_as_acc(const char* op, const char* name, const at::Tensor& c,
                              const at::Device& dev, at::ScalarType acc, int64_t n) {
  TORCH_CHECK(c.is_cuda() && c.device() == dev, "mtlsam::", op, " (CUDA): ", name,
              " must be on ", dev, ", got ", c.device());
  TORCH_CHECK(at::isFloatingType(c.scalar_type()), "mtlsam::", op, " (CUDA): ", name,
              " must be floating, got ", c.scalar_type());
  TORCH_CHECK(c.dim() == 1 && c.numel() == n, "mtlsam::", op, " (CUDA): ", name, " must hold ",
              n, " values (1-D), got shape ", c.sizes());
  return c.to(acc).contiguous();
}

// Content checks of device tables (offsets start at 0, end at n, non-decreasing; sampled
// ranges inside their buffers). They need a device-to-host read, i.e. a stream synchronisation,
// so they run only when MTLSAM_CUDA_CHECK_TABLES=1; otherwise the Python layer validates the CPU
// tables before mtlsam_ext.kernels.ext copies them over, and every kernel clamps table values to
// its buffers, so a malformed device table can give wrong numbers but never an out-of-bounds
// memory access.
bool check_tables_enabled();
void check_offsets_content(const char* op, const at::Tensor& offsets, int64_t n);
void check_sampled_content(const char* op, const at::Tensor& starts, const at::Tensor& lengths,
                           const at::Tensor& local_starts, int64_t n, int64_t m);

// ---- the ops (defined in reduce.cu, perturb.cu, gram.cu, combine.cu) ----
at::Tensor segment_sumsq(const at::Tensor& x, const at::Tensor& offsets,
                         const c10::optional<at::Tensor>& scale);
std::tuple<at::Tensor, at::Tensor> gl_layer_stats(const at::Tensor& g0, const at::Tensor& local,
                                                  const at::Tensor& starts,
                                                  const at::Tensor& lengths,
                                                  const at::Tensor& local_starts,
                                                  const c10::optional<at::Tensor>& scale);
void mix_perturb_(at::Tensor& param, at::Tensor& backup, const at::Tensor& g0,
                  const at::Tensor& coef, const at::Tensor& offsets,
                  const c10::optional<at::Tensor>& local,
                  const c10::optional<at::Tensor>& local_coef,
                  const c10::optional<at::Tensor>& starts,
                  const c10::optional<at::Tensor>& lengths,
                  const c10::optional<at::Tensor>& local_starts, bool adaptive, bool save_backup);
void restore_(at::Tensor& param, const at::Tensor& backup);
at::Tensor gram(const at::Tensor& rows);
void combine_(at::Tensor& out, const at::Tensor& rows, const at::Tensor& weights);
void sub_(at::Tensor& rows, const at::Tensor& other);

}  // namespace mtlsam_cuda
