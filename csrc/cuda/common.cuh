// Shared helpers of the CUDA backend of the mtlsam ops (see csrc/registration.cpp for the
// schemas and mtlsam_ext/kernels/torch_ref.py for the reference semantics).
//
// Conventions used by every kernel:
// * Accumulation type: float for Half / BFloat16 / float, double for double (mtlsam::Half and
//   mtlsam::BFloat16 are c10's types, as at::Half / at::BFloat16).
// * Arithmetic that the reference performs as separate tensor ops (multiply, then add) is done
//   with explicit round-to-nearest intrinsics (__fmul_rn, __fadd_rn, ...) so nvcc cannot contract
//   it into FMAs: element-wise results then round exactly like the reference does. Reductions use
//   explicit fma() so the code generated for the vector and scalar paths is the same arithmetic.
// * Indices are int64 everywhere (offsets may exceed 2^31).
// * Reductions are deterministic: a fixed decomposition of the data into chunks (a function of
//   the shapes and the tables only, never of the number of SMs), a fixed assignment of elements to
//   threads, fixed-shape tree reductions inside a block, and per-chunk partials written to a
//   workspace that a second kernel sums in a fixed order. No float atomics are used.
//
// The file builds two ways from this one source (csrc/tensor_api.h): against ATen (default) or,
// with MTLSAM_STABLE_ABI, against libtorch's stable ABI only. In the stable build no c10/ATen
// C++ header may be included (TORCH_TARGET_VERSION makes them an #error), so the CUDA specifics
// the kernels need from torch -- the current stream, a device guard, error checks -- are wrapped
// below, and everything else is plain CUDA runtime calls on raw pointers. The kernels themselves
// are the same code in both builds.
#pragma once

#include "../tensor_api.h"

#include <cuda_runtime.h>

#ifdef MTLSAM_STABLE_ABI
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
// The shim declares this function only under USE_CUDA, which the extension build does not
// define (and the shim may already have been included without it), so it is declared here with
// the shim's signature. It is a C function of libtorch_cuda, present in every release the stable
// build targets (2.10 on); torch::stable::accelerator::Stream::nativeHandle() would do the same
// but exists only from torch 2.13, and the binary must load under older releases.
extern "C" AOTI_TORCH_EXPORT AOTITorchError
aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

namespace mtlsam_cuda {

using mtlsam::acc_scalar_type;
using mtlsam::device_index;
using mtlsam::empty_like_device;
using mtlsam::is_floating;
using mtlsam::OptionalTensor;
using mtlsam::same_shape;
using mtlsam::ScalarType;
using mtlsam::shape_str;
using mtlsam::Tensor;
using mtlsam::to_dtype_contiguous;
using mtlsam::zeros_like_device;

// ---- CUDA runtime glue (the same in both builds) ----
// A failed CUDA runtime call is an error (RuntimeError in Python) naming the call.
#define MTLSAM_CUDA_CHECK(expr)                                                             \
  do {                                                                                      \
    const cudaError_t mtlsam_cuda_err_ = (expr);                                            \
    MTLSAM_CHECK(mtlsam_cuda_err_ == cudaSuccess, "CUDA error: ",                           \
                 cudaGetErrorString(mtlsam_cuda_err_), " (", #expr, ")");                   \
  } while (0)
// After every kernel launch (launch-configuration errors; as C10_CUDA_KERNEL_LAUNCH_CHECK).
#define MTLSAM_CUDA_LAUNCH_CHECK() MTLSAM_CUDA_CHECK(cudaGetLastError())

// The current torch stream of the given device (the tensors' device, not the current device),
// on which every kernel and copy of the ops is enqueued.
inline cudaStream_t current_stream(int32_t device_index) {
#ifdef MTLSAM_STABLE_ABI
  void* stream = nullptr;
  const AOTITorchError err = aoti_torch_get_current_cuda_stream(device_index, &stream);
  STD_TORCH_CHECK(err == AOTI_TORCH_SUCCESS,
                  "mtlsam: could not get the current CUDA stream of cuda:", device_index);
  return static_cast<cudaStream_t>(stream);
#else
  return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_index)).stream();
#endif
}

// Makes the given CUDA device current for its lifetime (allocations and launches of the op go
// to the tensors' device), restoring the previous one on destruction.
class DeviceGuard {
 public:
  explicit DeviceGuard(int32_t device_index)
#ifdef MTLSAM_STABLE_ABI
      : guard_(device_index) {
  }
#else
      : guard_(static_cast<c10::DeviceIndex>(device_index)) {
  }
#endif
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
#ifdef MTLSAM_STABLE_ABI
  torch::stable::accelerator::DeviceGuard guard_;
#else
  c10::cuda::CUDAGuard guard_;
#endif
};

// "cuda:1", "cpu", ... for messages.
inline std::string device_str(const Tensor& t) {
  if (t.is_cuda()) return "cuda:" + std::to_string(device_index(t));
  if (t.is_cpu()) return "cpu";
  return "a non-CUDA device";
}

// Bytes of a contiguous tensor's elements.
inline size_t nbytes(const Tensor& t) {
  return static_cast<size_t>(t.numel()) * static_cast<size_t>(t.element_size());
}

// Threads per block of every kernel.
constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
// Elements of the flat buffer per chunk (one block per chunk in the flat-grid kernels). 8192 =
// 256 threads x 32 elements: 2 x 16-byte loads per thread and stream for fp16/bf16, 8 for fp32,
// 16 for fp64 -- enough bytes in flight per thread to run at memory bandwidth, while a 100M-element
// buffer still gives ~12k blocks (many waves on any GPU) and the partial-sum workspace stays at
// 1/8192 of the data.
constexpr int64_t kChunk = 8192;

// Accumulation type of the kernels: tensor_api.h's (float, or double for double).
template <typename T>
using acc_t = mtlsam::opmath_t<T>;

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
// `dev` is the device index of the op's reference tensor (-1 when that one is not on a CUDA
// device: the dispatcher picks the CUDA kernel when any argument is a CUDA tensor, and the
// reference tensor is checked first, so that case fails at its own check).
inline void check_float_tensor(const char* op, const char* name, const Tensor& t, int32_t dev) {
  MTLSAM_CHECK(t.is_cuda(), "mtlsam::", op, " (CUDA): ", name, " must be a CUDA tensor",
               dev >= 0 ? " on cuda:" + std::to_string(dev) : std::string(),
               ", got a tensor on ", device_str(t));
  MTLSAM_CHECK(device_index(t) == dev, "mtlsam::", op, " (CUDA): ", name, " is on ",
               device_str(t), " but the other tensors are on cuda:", dev);
  const auto st = t.scalar_type();
  MTLSAM_CHECK(is_floating(st), "mtlsam::", op, " (CUDA): ", name,
               " must be float16, bfloat16, float32 or float64, got ", st);
  MTLSAM_CHECK(t.is_contiguous(), "mtlsam::", op, " (CUDA): ", name, " must be contiguous");
}

inline void check_same_dtype(const char* op, const char* name, const Tensor& t,
                             const char* like_name, const Tensor& like) {
  MTLSAM_CHECK(t.scalar_type() == like.scalar_type(), "mtlsam::", op, " (CUDA): ", name,
               " has dtype ", t.scalar_type(), " but ", like_name, " has dtype ",
               like.scalar_type());
}

inline void check_flat(const char* op, const char* name, const Tensor& t, int64_t n = -1) {
  MTLSAM_CHECK(t.dim() == 1, "mtlsam::", op, " (CUDA): ", name,
               " must be 1-D (a flat buffer), got shape ", shape_str(t));
  if (n >= 0) {
    MTLSAM_CHECK(t.numel() == n, "mtlsam::", op, " (CUDA): ", name, " has ", t.numel(),
                 " elements, expected ", n);
  }
}

// Segment tables live in device memory as 1-D contiguous int64 tensors.
inline void check_table(const char* op, const char* name, const Tensor& t, int32_t dev) {
  MTLSAM_CHECK(t.scalar_type() == ScalarType::Long, "mtlsam::", op, " (CUDA): segment table ",
               name, " must be int64, got ", t.scalar_type());
  MTLSAM_CHECK(t.is_cuda() && device_index(t) == dev, "mtlsam::", op, " (CUDA): segment table ",
               name, " must be on cuda:", dev, " (device memory), got ", device_str(t),
               "; mtlsam_ext.kernels.ext copies CPU tables to the device");
  MTLSAM_CHECK(t.dim() == 1, "mtlsam::", op, " (CUDA): segment table ", name,
               " must be 1-D, got shape ", shape_str(t));
  MTLSAM_CHECK(t.is_contiguous(), "mtlsam::", op, " (CUDA): segment table ", name,
               " must be contiguous");
}

// A coefficient / weight vector: any floating dtype on the device, converted to the
// accumulation dtype (as the reference's coef.to(acc)).
inline Tensor coef_as_acc(const char* op, const char* name, const Tensor& c, int32_t dev,
                          ScalarType acc, int64_t n) {
  MTLSAM_CHECK(c.is_cuda() && device_index(c) == dev, "mtlsam::", op, " (CUDA): ", name,
               " must be on cuda:", dev, ", got ", device_str(c));
  MTLSAM_CHECK(is_floating(c.scalar_type()), "mtlsam::", op, " (CUDA): ", name,
               " must be floating, got ", c.scalar_type());
  MTLSAM_CHECK(c.dim() == 1 && c.numel() == n, "mtlsam::", op, " (CUDA): ", name, " must hold ",
               n, " values (1-D), got shape ", shape_str(c));
  return to_dtype_contiguous(c, acc);
}

// Content checks of device tables (offsets start at 0, end at n, non-decreasing; sampled
// ranges inside their buffers). They need a device-to-host read, i.e. a stream synchronisation,
// so they run only when MTLSAM_CUDA_CHECK_TABLES=1; otherwise the Python layer validates the CPU
// tables before mtlsam_ext.kernels.ext copies them over, and every kernel clamps table values to
// its buffers, so a malformed device table can give wrong numbers but never an out-of-bounds
// memory access.
bool check_tables_enabled();
void check_offsets_content(const char* op, const Tensor& offsets, int64_t n);
void check_sampled_content(const char* op, const Tensor& starts, const Tensor& lengths,
                           const Tensor& local_starts, int64_t n, int64_t m);

// ---- the ops (defined in reduce.cu, perturb.cu, gram.cu, combine.cu) ----
// Signatures equal the CPU kernels' (csrc/cpu/register_cpu.cpp), see register_cuda.cu.
Tensor segment_sumsq(const Tensor& x, const Tensor& offsets, const OptionalTensor& scale);
std::tuple<Tensor, Tensor> gl_layer_stats(const Tensor& g0, const Tensor& local,
                                          const Tensor& starts, const Tensor& lengths,
                                          const Tensor& local_starts,
                                          const OptionalTensor& scale);
void mix_perturb_(Tensor& param, Tensor& backup, const Tensor& g0, const Tensor& coef,
                  const Tensor& offsets, const OptionalTensor& local,
                  const OptionalTensor& local_coef, const OptionalTensor& starts,
                  const OptionalTensor& lengths, const OptionalTensor& local_starts,
                  bool adaptive, bool save_backup);
void perturb_points_(Tensor& out, const Tensor& theta, const Tensor& directions,
                     const Tensor& coefs, const Tensor& offsets, const OptionalTensor& local,
                     const OptionalTensor& local_coefs, const OptionalTensor& starts,
                     const OptionalTensor& lengths, const OptionalTensor& local_starts,
                     bool adaptive);
void restore_(Tensor& param, const Tensor& backup);
Tensor gram(const Tensor& rows);
void combine_(Tensor& out, const Tensor& rows, const Tensor& weights);
void sub_(Tensor& rows, const Tensor& other);

}  // namespace mtlsam_cuda
