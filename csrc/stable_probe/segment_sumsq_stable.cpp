// Probe of libtorch's stable ABI (torch >= 2.10): mtlsam::segment_sumsq's CPU kernel written
// against torch/csrc/stable only (no ATen, no c10 C++ types), registered as
// mtlsam_stable::segment_sumsq so it can sit beside the regular extension. Built with
// TORCH_TARGET_VERSION = 2.10 by python/stable_abi_probe.py, which loads the one binary under
// several torch releases and compares it with the torch backend. Not part of the package.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "../cpu/simd_sums.h"

namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

// The same fixed chunking as csrc/cpu/common.h (kChunk = 4096 elements per chunk, chunks never
// straddle a segment), so the result is independent of the thread count.
constexpr int64_t kChunk = 4096;

struct Chunk {
  int64_t seg, begin, end;
};

template <typename T>
void run(const Tensor& x, const int64_t* offs, int64_t nseg, const T* tp, Tensor& out) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < nseg; ++s)
    for (int64_t b = offs[s]; b < offs[s + 1]; b += kChunk)
      chunks.push_back({s, b, std::min(b + kChunk, offs[s + 1])});
  const T* xp = x.const_data_ptr<T>();
  std::vector<T> partial(chunks.size());
  torch::stable::parallel_for(0, static_cast<int64_t>(chunks.size()), 1,
                              [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t s0 = chunks[c].begin, n = chunks[c].end - s0;
      partial[c] = tp ? mtlsam::cpu::sumsq_scaled(xp + s0, tp + s0, n)
                      : mtlsam::cpu::sumsq(xp + s0, n);
    }
  });
  T* op = out.mutable_data_ptr<T>();
  for (int64_t s = 0; s < nseg; ++s) op[s] = 0;
  for (size_t c = 0; c < chunks.size(); ++c) op[chunks[c].seg] += partial[c];
}

Tensor segment_sumsq(Tensor x, Tensor offsets, std::optional<Tensor> scale) {
  STD_TORCH_CHECK(x.is_cpu() && x.dim() == 1 && x.is_contiguous(),
                  "x must be a contiguous 1-D CPU tensor");
  STD_TORCH_CHECK(offsets.is_cpu() && offsets.dim() == 1 && offsets.numel() >= 1 &&
                      offsets.scalar_type() == ScalarType::Long,
                  "offsets must be a 1-D int64 CPU tensor");
  const ScalarType dt = x.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Double,
                  "the stable-ABI probe handles float32 and float64 only");
  if (scale.has_value())
    STD_TORCH_CHECK(scale->scalar_type() == dt && scale->numel() == x.numel() &&
                        scale->is_contiguous(), "scale must be like x");
  const int64_t nseg = offsets.numel() - 1;
  const int64_t* offs = offsets.const_data_ptr<int64_t>();
  STD_TORCH_CHECK(offs[0] == 0 && offs[nseg] == x.numel(), "offsets must span x");
  Tensor out = torch::stable::new_empty(x, {nseg});
  if (dt == ScalarType::Float)
    run<float>(x, offs, nseg, scale ? scale->const_data_ptr<float>() : nullptr, out);
  else
    run<double>(x, offs, nseg, scale ? scale->const_data_ptr<double>() : nullptr, out);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY(mtlsam_stable, m) {
  m.def("segment_sumsq(Tensor x, Tensor offsets, Tensor? scale) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(mtlsam_stable, CPU, m) {
  m.impl("segment_sumsq", TORCH_BOX(&segment_sumsq));
}
