// CPU implementations of the mtlsam ops (schemas in csrc/registration.cpp).
#include "common.h"

namespace mtlsam {
namespace cpu {

at::Tensor segment_sumsq(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&);
std::tuple<at::Tensor, at::Tensor> gl_layer_stats(const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&,
                                                  const c10::optional<at::Tensor>&);
void mix_perturb_(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, const c10::optional<at::Tensor>&,
                  const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                  const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool, bool);
void restore_(at::Tensor&, const at::Tensor&);
void sub_(at::Tensor&, const at::Tensor&);
at::Tensor gram(const at::Tensor&);
at::Tensor segment_gram(const at::Tensor&, const at::Tensor&);
at::Tensor flat_gram_(at::Tensor&, const at::Tensor&);
void combine_(at::Tensor&, const at::Tensor&, const at::Tensor&);

}  // namespace cpu
}  // namespace mtlsam

TORCH_LIBRARY_IMPL(mtlsam, CPU, m) {
  m.impl("segment_sumsq", &mtlsam::cpu::segment_sumsq);
  m.impl("gl_layer_stats", &mtlsam::cpu::gl_layer_stats);
  m.impl("mix_perturb_", &mtlsam::cpu::mix_perturb_);
  m.impl("restore_", &mtlsam::cpu::restore_);
  m.impl("sub_", &mtlsam::cpu::sub_);
  m.impl("gram", &mtlsam::cpu::gram);
  m.impl("segment_gram", &mtlsam::cpu::segment_gram);
  m.impl("flat_gram_", &mtlsam::cpu::flat_gram_);
  m.impl("combine_", &mtlsam::cpu::combine_);
}
