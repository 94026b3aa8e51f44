// Library definition and kernel registration in both builds of csrc/tensor_api.h: TORCH_LIBRARY
// (ATen) or STABLE_TORCH_LIBRARY (stable ABI). A header of its own because <torch/library.h> is
// one of the slowest headers to parse and only the registering files need it.
#pragma once

#include "tensor_api.h"

#ifdef MTLSAM_STABLE_ABI
#include <torch/csrc/stable/library.h>
#else
#include <torch/library.h>
#endif

// Library definition and kernel registration: TORCH_LIBRARY / STABLE_TORCH_LIBRARY. Kernels
// are registered as MTLSAM_KERNEL(&fn); the stable build boxes them (TORCH_BOX).
#ifdef MTLSAM_STABLE_ABI
#define MTLSAM_LIBRARY(ns, m) STABLE_TORCH_LIBRARY(ns, m)
#define MTLSAM_LIBRARY_IMPL(ns, key, m) STABLE_TORCH_LIBRARY_IMPL(ns, key, m)
#define MTLSAM_KERNEL(fn) TORCH_BOX(fn)
#else
#define MTLSAM_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define MTLSAM_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define MTLSAM_KERNEL(fn) fn
#endif
