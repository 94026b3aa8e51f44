// Segmented reductions: per-segment sums of squares and the global-local layer statistics.
#include "common.h"

namespace mtlsam {
namespace cpu {

namespace {

// sum_j (t_j x_j)^2 over [b, e) with kLanes accumulators (t = 1 when scale is null).
template <typename scalar_t, typename acc_t>
acc_t sumsq_range(const scalar_t* x, const scalar_t* t, int64_t b, int64_t e) {
  acc_t a[kLanes] = {};
  int64_t j = b;
  if (t == nullptr) {
    for (; j + kLanes <= e; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t v = static_cast<acc_t>(x[j + l]);
        a[l] += v * v;
      }
    }
    for (int l = 0; j < e; ++j, ++l) {
      const acc_t v = static_cast<acc_t>(x[j]);
      a[l] += v * v;
    }
  } else {
    for (; j + kLanes <= e; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t v = static_cast<acc_t>(t[j + l]) * static_cast<acc_t>(x[j + l]);
        a[l] += v * v;
      }
    }
    for (int l = 0; j < e; ++j, ++l) {
      const acc_t v = static_cast<acc_t>(t[j]) * static_cast<acc_t>(x[j]);
      a[l] += v * v;
    }
  }
  return lane_sum(a);
}

}  // namespace

at::Tensor segment_sumsq(const at::Tensor& x, const at::Tensor& offsets,
                         const c10::optional<at::Tensor>& scale) {
  check_flat(x, "x");
  check_offsets(offsets, x.numel());
  if (scale.has_value()) check_like(*scale, x, "scale");
  const int64_t nseg = offsets.numel() - 1;
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({nseg}, x.options().dtype(acc_type));
  const std::vector<Chunk> chunks = chunks_of_offsets(offsets);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_sumsq",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* tp = scale.has_value() ? scale->data_ptr<scalar_t>() : nullptr;
    std::vector<acc_t> partial(chunks.size());
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), kGrain, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        partial[c] = sumsq_range<scalar_t, acc_t>(xp, tp, chunks[c].begin, chunks[c].end);
      }
    });
    acc_t* op = out.data_ptr<acc_t>();
    for (size_t c = 0; c < chunks.size(); ++c) op[chunks[c].seg] += partial[c];
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gl_layer_stats(const at::Tensor& g0, const at::Tensor& local,
                                                  const at::Tensor& starts,
                                                  const at::Tensor& lengths,
                                                  const at::Tensor& local_starts,
                                                  const c10::optional<at::Tensor>& scale) {
  check_flat(g0, "g0");
  TORCH_CHECK(local.device().is_cpu() && local.dim() == 2 && local.is_contiguous(),
              "local must be a contiguous 2-D [K, M] CPU tensor");
  TORCH_CHECK(local.scalar_type() == g0.scalar_type(), "local has dtype ", local.scalar_type(),
              ", expected ", g0.scalar_type());
  if (scale.has_value()) check_like(*scale, g0, "scale");
  const int64_t k = local.size(0), m = local.size(1);
  check_sampled(starts, lengths, local_starts, g0.numel(), m);
  const int64_t np = starts.numel();
  const auto acc_type = g0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dots = at::zeros({k, np}, g0.options().dtype(acc_type));
  at::Tensor sq = at::zeros({k, np}, g0.options().dtype(acc_type));
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* ls = local_starts.data_ptr<int64_t>();
  const std::vector<Chunk> chunks = make_chunks(st, lengths.data_ptr<int64_t>(), np);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g0.scalar_type(), "gl_layer_stats",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g0.data_ptr<scalar_t>();
    const scalar_t* lp = local.data_ptr<scalar_t>();
    const scalar_t* tp = scale.has_value() ? scale->data_ptr<scalar_t>() : nullptr;
    // partial[c][2 * i] = dot of task i over chunk c, partial[c][2 * i + 1] = its sum of squares
    std::vector<acc_t> partial(chunks.size() * 2 * k);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> tg(kChunk);
      for (int64_t c = b; c < e; ++c) {
        const Chunk& ch = chunks[c];
        const int64_t n = ch.end - ch.begin;
        // T g0 for this chunk once (the chunk stays in L1 while every task re-reads it).
        for (int64_t j = 0; j < n; ++j) {
          const acc_t g = static_cast<acc_t>(gp[ch.begin + j]);
          tg[j] = tp ? static_cast<acc_t>(tp[ch.begin + j]) * g : g;
        }
        const int64_t loff = ls[ch.seg] + (ch.begin - st[ch.seg]);
        for (int64_t i = 0; i < k; ++i) {
          const scalar_t* row = lp + i * m + loff;
          acc_t ad[kLanes] = {}, aq[kLanes] = {};
          int64_t j = 0;
          for (; j + kLanes <= n; j += kLanes) {
            for (int l = 0; l < kLanes; ++l) {
              acc_t v = static_cast<acc_t>(row[j + l]);
              if (tp) v *= static_cast<acc_t>(tp[ch.begin + j + l]);
              ad[l] += v * tg[j + l];
              aq[l] += v * v;
            }
          }
          for (int l = 0; j < n; ++j, ++l) {
            acc_t v = static_cast<acc_t>(row[j]);
            if (tp) v *= static_cast<acc_t>(tp[ch.begin + j]);
            ad[l] += v * tg[j];
            aq[l] += v * v;
          }
          partial[(c * k + i) * 2] = lane_sum(ad);
          partial[(c * k + i) * 2 + 1] = lane_sum(aq);
        }
      }
    });
    acc_t* dp = dots.data_ptr<acc_t>();
    acc_t* qp = sq.data_ptr<acc_t>();
    for (size_t c = 0; c < chunks.size(); ++c) {
      for (int64_t i = 0; i < k; ++i) {
        dp[i * np + chunks[c].seg] += partial[(c * k + i) * 2];
        qp[i * np + chunks[c].seg] += partial[(c * k + i) * 2 + 1];
      }
    }
  });
  return {dots, sq};
}

}  // namespace cpu
}  // namespace mtlsam
