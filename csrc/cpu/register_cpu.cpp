// CPU implementations of the mtlsam ops (schemas in csrc/registration.cpp).
#include "common.h"
#include "../library_api.h"

namespace mtlsam {
namespace cpu {

Tensor segment_sumsq(const Tensor&, const Tensor&, const OptionalTensor&);
std::tuple<Tensor, Tensor> gl_layer_stats(const Tensor&, const Tensor&,
                                                  const Tensor&, const Tensor&,
                                                  const Tensor&,
                                                  const OptionalTensor&);
void mix_perturb_(Tensor&, Tensor&, const Tensor&, const Tensor&,
                  const Tensor&, const OptionalTensor&,
                  const OptionalTensor&, const OptionalTensor&,
                  const OptionalTensor&, const OptionalTensor&, bool, bool);
void perturb_points_(Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                     const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                     const OptionalTensor&, const OptionalTensor&, bool);
void restore_(Tensor&, const Tensor&);
void sub_(Tensor&, const Tensor&);
Tensor gram(const Tensor&);
Tensor segment_gram(const Tensor&, const Tensor&);
Tensor flat_gram_(Tensor&, const Tensor&);
void combine_(Tensor&, const Tensor&, const Tensor&);

}  // namespace cpu
}  // namespace mtlsam

MTLSAM_LIBRARY_IMPL(mtlsam, CPU, m) {
  m.impl("segment_sumsq", MTLSAM_KERNEL(&mtlsam::cpu::segment_sumsq));
  m.impl("gl_layer_stats", MTLSAM_KERNEL(&mtlsam::cpu::gl_layer_stats));
  m.impl("mix_perturb_", MTLSAM_KERNEL(&mtlsam::cpu::mix_perturb_));
  m.impl("perturb_points_", MTLSAM_KERNEL(&mtlsam::cpu::perturb_points_));
  m.impl("restore_", MTLSAM_KERNEL(&mtlsam::cpu::restore_));
  m.impl("sub_", MTLSAM_KERNEL(&mtlsam::cpu::sub_));
  m.impl("gram", MTLSAM_KERNEL(&mtlsam::cpu::gram));
  m.impl("segment_gram", MTLSAM_KERNEL(&mtlsam::cpu::segment_gram));
  m.impl("flat_gram_", MTLSAM_KERNEL(&mtlsam::cpu::flat_gram_));
  m.impl("combine_", MTLSAM_KERNEL(&mtlsam::cpu::combine_));
}
