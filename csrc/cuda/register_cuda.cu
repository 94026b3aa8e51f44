// Registers the CUDA kernels of the mtlsam ops (schemas in csrc/registration.cpp).
// Each kernel's C++ signature must equal the CPU kernel's (csrc/cpu/register_cpu.cpp): the
// dispatcher compares them when the module loads and aborts the process on a mismatch
// ("Mismatch in kernel C++ signatures"), so mutated arguments are at::Tensor& on both.
#include <torch/library.h>

#include "common.cuh"

TORCH_LIBRARY_IMPL(mtlsam, CUDA, m) {
  m.impl("segment_sumsq", &mtlsam_cuda::segment_sumsq);
  m.impl("gl_layer_stats", &mtlsam_cuda::gl_layer_stats);
  m.impl("mix_perturb_", &mtlsam_cuda::mix_perturb_);
  m.impl("restore_", &mtlsam_cuda::restore_);
  m.impl("gram", &mtlsam_cuda::gram);
  m.impl("combine_", &mtlsam_cuda::combine_);
  m.impl("sub_", &mtlsam_cuda::sub_);
}
