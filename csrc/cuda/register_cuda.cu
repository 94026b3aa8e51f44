// Registers the CUDA kernels of the mtlsam ops (schemas in csrc/registration.cpp).
// Each kernel's C++ signature must equal the CPU kernel's (csrc/cpu/register_cpu.cpp): the
// dispatcher compares them when the module loads and aborts the process on a mismatch
// ("Mismatch in kernel C++ signatures"), so mutated arguments are Tensor& on both. The stable
// build boxes the kernels (MTLSAM_KERNEL, csrc/tensor_api.h).
#include "common.cuh"
#include "../library_api.h"

MTLSAM_LIBRARY_IMPL(mtlsam, CUDA, m) {
  m.impl("segment_sumsq", MTLSAM_KERNEL(&mtlsam_cuda::segment_sumsq));
  m.impl("gl_layer_stats", MTLSAM_KERNEL(&mtlsam_cuda::gl_layer_stats));
  m.impl("mix_perturb_", MTLSAM_KERNEL(&mtlsam_cuda::mix_perturb_));
  m.impl("perturb_points_", MTLSAM_KERNEL(&mtlsam_cuda::perturb_points_));
  m.impl("restore_", MTLSAM_KERNEL(&mtlsam_cuda::restore_));
  m.impl("gram", MTLSAM_KERNEL(&mtlsam_cuda::gram));
  m.impl("combine_", MTLSAM_KERNEL(&mtlsam_cuda::combine_));
  m.impl("sub_", MTLSAM_KERNEL(&mtlsam_cuda::sub_));
}
