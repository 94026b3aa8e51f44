// The tensor API every kernel file is written against, so that one source builds two ways:
//
// * default: ATen (at::Tensor, TORCH_CHECK, at::parallel_for, TORCH_LIBRARY). The module then
//   holds C++ symbols of the torch release it was compiled with and loads only under that
//   major.minor (the load guard in mtlsam_ext/kernels/build_record.py refuses any other).
// * MTLSAM_STABLE_ABI: libtorch's stable ABI (torch/csrc/stable, the headeronly c10 types, the
//   C shim), compiled with TORCH_TARGET_VERSION = 2.10 (setup.py). The module then uses only C
//   functions of libtorch (`nm -D` shows no mangled c10/ATen symbol), so one binary loads under
//   every torch release from 2.10 on; python/results/wheels/stable_abi.md shows it under 2.10,
//   2.11, 2.13 and 2.14.
//
// Only what the kernels need is here: the tensor type, checks, allocation in an accumulation
// dtype, a CPU parallel loop, the floating dtypes and their dispatch (library_api.h: the
// registration macros, for the files that register). Both builds run the same
// arithmetic; tests/test_ops*.py hold them to the same results.
#pragma once

#ifdef MTLSAM_STABLE_ABI
#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>
#else
// The narrow headers, not <ATen/ATen.h> (the declarations of every op): nvcc parses each
// header twice (host and device front ends), so <ATen/ATen.h> cost a .cu file 38 s to compile
// and these 13 s (nvcc 13.0, gram.cu, one arch, this 2-core machine). Only Tensor methods are
// used (TORCH_ASSERT_ONLY_METHOD_OPERATORS makes a free at:: op a compile error).
#ifndef TORCH_ASSERT_ONLY_METHOD_OPERATORS
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#endif

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace mtlsam {

#ifdef MTLSAM_STABLE_ABI
using Tensor = torch::stable::Tensor;
// A failed check throws std::runtime_error (RuntimeError in Python) with the message.
#define MTLSAM_CHECK(cond, ...) STD_TORCH_CHECK(cond, __VA_ARGS__)
#else
using Tensor = at::Tensor;
#define MTLSAM_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
#endif

using OptionalTensor = std::optional<Tensor>;
// c10's ScalarType, Half and BFloat16 are these headeronly types, so kernels use one spelling.
using ScalarType = torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// Accumulation type: float for 16-bit floats and float, double for double (as at::opmath_type).
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<Half> {
  using type = float;
};
template <>
struct OpMath<BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
         t == ScalarType::BFloat16;
}

inline ScalarType acc_scalar_type(ScalarType t) {
  return t == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

inline std::string shape_str(const Tensor& t) {
  std::ostringstream s;
  s << "[";
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  s << "]";
  return s.str();
}

inline bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) return false;
  }
  return true;
}

// Device index of a tensor (-1 for CPU).
inline int32_t device_index(const Tensor& t) {
#ifdef MTLSAM_STABLE_ABI
  return t.get_device_index();
#else
  return t.get_device();
#endif
}

// A new zero-filled / uninitialised tensor of the given shape and dtype on like's device.
inline Tensor zeros_like_device(const Tensor& like, std::initializer_list<int64_t> sizes,
                                ScalarType dtype) {
  const std::vector<int64_t> v(sizes);
#ifdef MTLSAM_STABLE_ABI
  return torch::stable::new_zeros(like, v, dtype);
#else
  return like.new_zeros(v, like.options().dtype(dtype));
#endif
}

inline Tensor empty_like_device(const Tensor& like, std::initializer_list<int64_t> sizes,
                                ScalarType dtype) {
  const std::vector<int64_t> v(sizes);
#ifdef MTLSAM_STABLE_ABI
  return torch::stable::new_empty(like, v, dtype);
#else
  return like.new_empty(v, like.options().dtype(dtype));
#endif
}

// t converted to dtype on its own device, contiguous (no copy when it already is).
inline Tensor to_dtype_contiguous(const Tensor& t, ScalarType dtype) {
#ifdef MTLSAM_STABLE_ABI
  // As in the ATen build, t itself when nothing changes (and no boxed call).
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return torch::stable::contiguous(torch::stable::to(t, dtype));
#else
  return t.to(dtype).contiguous();
#endif
}

// t converted to dtype on the CPU, contiguous (the coefficient vectors of the CPU kernels).
inline Tensor to_cpu_dtype_contiguous(const Tensor& t, ScalarType dtype) {
#ifdef MTLSAM_STABLE_ABI
  // Each stable op is a boxed dispatcher call (~0.5 us): skip both when nothing changes.
  if (t.is_cpu() && t.scalar_type() == dtype && t.is_contiguous()) return t;
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  return torch::stable::contiguous(torch::stable::to(t, dtype, std::nullopt, cpu));
#else
  return t.to(at::kCPU, dtype).contiguous();
#endif
}

// The CPU parallel loop of the running torch (its thread pool and thread count).
template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
#ifdef MTLSAM_STABLE_ABI
  torch::stable::parallel_for(begin, end, grain, f);
#else
  at::parallel_for(begin, end, grain, f);
#endif
}

}  // namespace mtlsam

// Runs the lambda given as the last argument with `scalar_t` bound to the C++ type of TYPE, for
// the four floating dtypes the ops accept (the same set as AT_DISPATCH_FLOATING_TYPES_AND2(Half,
// BFloat16)); any other dtype is an error naming the op.
#define MTLSAM_DISPATCH_CASE(ENUM, CTYPE, ...)  \
  case ::mtlsam::ScalarType::ENUM: {            \
    using scalar_t = CTYPE;                     \
    __VA_ARGS__();                              \
    break;                                      \
  }
#define MTLSAM_DISPATCH_FLOATING(TYPE, NAME, ...)                                         \
  do {                                                                                    \
    const ::mtlsam::ScalarType mtlsam_dispatch_type_ = (TYPE);                            \
    switch (mtlsam_dispatch_type_) {                                                      \
      MTLSAM_DISPATCH_CASE(Double, double, __VA_ARGS__)                                   \
      MTLSAM_DISPATCH_CASE(Float, float, __VA_ARGS__)                                     \
      MTLSAM_DISPATCH_CASE(Half, ::mtlsam::Half, __VA_ARGS__)                             \
      MTLSAM_DISPATCH_CASE(BFloat16, ::mtlsam::BFloat16, __VA_ARGS__)                     \
      default:                                                                            \
        MTLSAM_CHECK(false, NAME, ": expected float16, bfloat16, float32 or float64, got ", \
                     mtlsam_dispatch_type_);                                              \
    }                                                                                     \
  } while (0)
