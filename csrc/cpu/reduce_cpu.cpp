// Segmented reductions: per-segment sums of squares and the global-local layer statistics.
#include "common.h"
#include "simd_sums.h"

#include <algorithm>
#include <type_traits>

namespace mtlsam {
namespace cpu {

namespace {

// sum (t x)^2 over one chunk (t == nullptr: sum x^2), the data read in place: fp16/bf16 are
// widened in registers (widening each chunk into a buffer first held them at 0.45-0.48 of
// torch.dot's read bandwidth, ops_bench resnet18, measured alternating with the dot).
float chunk_sumsq(const float* x, const float* t, int64_t n) {
  return t ? sumsq_scaled(x, t, n) : sumsq(x, n);
}
double chunk_sumsq(const double* x, const double* t, int64_t n) {
  return t ? sumsq_scaled(x, t, n) : sumsq(x, n);
}
float chunk_sumsq(const BFloat16* x, const BFloat16* t, int64_t n) {
  const auto* xb = reinterpret_cast<const uint16_t*>(x);
  return t ? sumsq_scaled_bf16(xb, reinterpret_cast<const uint16_t*>(t), n)
           : sumsq_bf16(xb, n);
}
float chunk_sumsq(const Half* x, const Half* t, int64_t n) {
  const auto* xh = reinterpret_cast<const uint16_t*>(x);
  return t ? sumsq_scaled_fp16(xh, reinterpret_cast<const uint16_t*>(t), n)
           : sumsq_fp16(xh, n);
}

}  // namespace

Tensor segment_sumsq(const Tensor& x, const Tensor& offsets,
                         const OptionalTensor& scale) {
  check_flat(x, "x");
  check_offsets(offsets, x.numel());
  if (scale.has_value()) check_like(*scale, x, "scale");
  const int64_t nseg = offsets.numel() - 1;
  const auto acc_type = acc_scalar_type(x.scalar_type());
  Tensor out = zeros_like_device(x, {nseg}, acc_type);
  const std::vector<Chunk> chunks = chunks_of_offsets(offsets);
  MTLSAM_DISPATCH_FLOATING(x.scalar_type(), "segment_sumsq",
                                  [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = scale.has_value() ? scale->const_data_ptr<scalar_t>() : nullptr;
    std::vector<acc_t> partial(chunks.size());
    parallel_for(0, static_cast<int64_t>(chunks.size()), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const int64_t s0 = chunks[c].begin, n = chunks[c].end - s0;
        partial[c] = chunk_sumsq(xp + s0, tp ? tp + s0 : nullptr, n);
      }
    });
    acc_t* op = out.mutable_data_ptr<acc_t>();
    for (size_t c = 0; c < chunks.size(); ++c) op[chunks[c].seg] += partial[c];
  });
  return out;
}

namespace {

// gl_layer_stats of one chunk without a scale, rows read in place: done for bfloat16 and
// float16 (widened in registers; a converted copy per task held bf16 at 0.35 and fp16 at 0.41
// of torch.dot's bandwidth), declined (false) for the other dtypes, which go through as_acc.
template <typename scalar_t, typename acc_t>
bool stats_in_place(const scalar_t*, const scalar_t*, int64_t, int64_t, int64_t,
                    std::vector<const uint16_t*>&, acc_t*, acc_t*) {
  return false;
}

bool stats_in_place(const BFloat16* g, const BFloat16* v0, int64_t stride, int64_t k,
                    int64_t n, std::vector<const uint16_t*>& vh, float* d, float* q) {
  for (int64_t i = 0; i < k; ++i) vh[i] = reinterpret_cast<const uint16_t*>(v0 + i * stride);
  dots_sumsqs_bf16(reinterpret_cast<const uint16_t*>(g), vh.data(), k, n, d, q);
  return true;
}

bool stats_in_place(const Half* g, const Half* v0, int64_t stride, int64_t k, int64_t n,
                    std::vector<const uint16_t*>& vh, float* d, float* q) {
  for (int64_t i = 0; i < k; ++i) vh[i] = reinterpret_cast<const uint16_t*>(v0 + i * stride);
  dots_sumsqs_fp16(reinterpret_cast<const uint16_t*>(g), vh.data(), k, n, d, q);
  return true;
}

}  // namespace

std::tuple<Tensor, Tensor> gl_layer_stats(const Tensor& g0, const Tensor& local,
                                                  const Tensor& starts,
                                                  const Tensor& lengths,
                                                  const Tensor& local_starts,
                                                  const OptionalTensor& scale) {
  check_flat(g0, "g0");
  MTLSAM_CHECK(local.is_cpu() && local.dim() == 2 && local.is_contiguous(),
              "local must be a contiguous 2-D [K, M] CPU tensor");
  MTLSAM_CHECK(local.scalar_type() == g0.scalar_type(), "local has dtype ", local.scalar_type(),
              ", expected ", g0.scalar_type());
  if (scale.has_value()) check_like(*scale, g0, "scale");
  const int64_t k = local.size(0), m = local.size(1);
  check_sampled(starts, lengths, local_starts, g0.numel(), m);
  const int64_t np = starts.numel();
  const auto acc_type = acc_scalar_type(g0.scalar_type());
  Tensor dots = zeros_like_device(g0, {k, np}, acc_type);
  Tensor sq = zeros_like_device(g0, {k, np}, acc_type);
  const int64_t* st = starts.const_data_ptr<int64_t>();
  const int64_t* ls = local_starts.const_data_ptr<int64_t>();
  const std::vector<Chunk> chunks = make_chunks(st, lengths.const_data_ptr<int64_t>(), np);
  MTLSAM_DISPATCH_FLOATING(g0.scalar_type(), "gl_layer_stats",
                                  [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* gp = g0.const_data_ptr<scalar_t>();
    const scalar_t* lp = local.const_data_ptr<scalar_t>();
    const scalar_t* tp = scale.has_value() ? scale->const_data_ptr<scalar_t>() : nullptr;
    // partial[c][i] = dot of task i over chunk c, partial[c][k + i] = its sum of squares
    std::vector<acc_t> partial(chunks.size() * 2 * k);
    parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> tg(kChunk), vb(k * kChunk), tb(tp ? kChunk : 0);
      std::vector<const acc_t*> v(k);
      std::vector<const uint16_t*> vh(k);
      for (int64_t c = b; c < e; ++c) {
        const Chunk& ch = chunks[c];
        const int64_t n = ch.end - ch.begin;
        // T g0 and T local_i for this chunk (for fp32/fp64 without a scale, the data itself);
        // then every task's dot and square sum in one sweep per four tasks.
        const acc_t* t = tp ? as_acc(tp + ch.begin, n, tb.data()) : nullptr;
        const int64_t loff = ls[ch.seg] + (ch.begin - st[ch.seg]);
        if (t == nullptr && stats_in_place(gp + ch.begin, lp + loff, m, k, n, vh,
                                           &partial[c * 2 * k], &partial[c * 2 * k + k])) {
          continue;
        }
        const acc_t* g = as_acc(gp + ch.begin, n, tg.data());
        if (t != nullptr) {
          if (g != tg.data()) std::copy(g, g + n, tg.data());
          for (int64_t j = 0; j < n; ++j) tg[j] *= t[j];
          g = tg.data();
        }
        for (int64_t i = 0; i < k; ++i) {
          acc_t* buf = vb.data() + i * kChunk;
          v[i] = as_acc(lp + i * m + loff, n, buf);
          if (t != nullptr) {
            if (v[i] != buf) std::copy(v[i], v[i] + n, buf);
            for (int64_t j = 0; j < n; ++j) buf[j] *= t[j];
            v[i] = buf;
          }
        }
        dots_sumsqs(g, v.data(), k, n, &partial[c * 2 * k], &partial[c * 2 * k + k]);
      }
    });
    acc_t* dp = dots.mutable_data_ptr<acc_t>();
    acc_t* qp = sq.mutable_data_ptr<acc_t>();
    for (size_t c = 0; c < chunks.size(); ++c) {
      for (int64_t i = 0; i < k; ++i) {
        dp[i * np + chunks[c].seg] += partial[c * 2 * k + i];
        qp[i * np + chunks[c].seg] += partial[c * 2 * k + k + i];
      }
    }
  });
  return {dots, sq};
}

}  // namespace cpu
}  // namespace mtlsam
