// Gram matrix of a [K, N] row matrix and the weighted combine of its rows.
#include <type_traits>

#include "common.h"
#include "simd_sums.h"

namespace mtlsam {
namespace cpu {

namespace {

// The pair sums of one chunk: rows i at base + i * stride, len elements each, read in place
// (bfloat16 and float16 widened in registers: through a converted copy per row, fp16 gram ran
// at 0.26-0.49 of torch.dot's bandwidth, ops_bench resnet18 K = 4).
template <typename scalar_t, typename acc_t>
void chunk_pair_dots(const scalar_t* base, int64_t stride, int64_t k, int64_t len,
                     std::vector<const void*>& ptr, acc_t* out) {
  for (int64_t i = 0; i < k; ++i) ptr[i] = base + i * stride;
  if constexpr (std::is_same<scalar_t, BFloat16>::value) {
    pair_dots_bf16(reinterpret_cast<const uint16_t* const*>(ptr.data()), k, len, out);
  } else if constexpr (std::is_same<scalar_t, Half>::value) {
    pair_dots_fp16(reinterpret_cast<const uint16_t* const*>(ptr.data()), k, len, out);
  } else {
    pair_dots(reinterpret_cast<const acc_t* const*>(ptr.data()), k, len, out);
  }
}

// Per-segment Grams [S, K, K] of the [K, N] rows (segment s spans columns [offsets[s],
// offsets[s + 1]); the whole-matrix Gram is the one-segment case). With `loss`, first
// rows -= loss in place (chunk by chunk, the stored rounded value being the one the Gram sees),
// so F-MTL's flat rows and their Gram take one pass. The chunks never straddle a segment; each
// chunk's K(K+1)/2 partials come from one read of its K row pieces, and each segment sums its
// chunks' partials in chunk order, so the result does not depend on the thread count.
// `offs` holds nseg + 1 checked offsets; `whole` returns [K, K] instead of [1, K, K].
Tensor grams_impl(const Tensor& rows, const Tensor* loss, const int64_t* offs, int64_t nseg,
                  bool whole) {
  MTLSAM_CHECK(rows.is_cpu(), "rows must be a CPU tensor");
  MTLSAM_CHECK(rows.dim() == 2 && rows.is_contiguous(), "rows must be a contiguous [K, N] matrix");
  MTLSAM_CHECK(is_floating(rows.scalar_type()), "rows must be floating point");
  if (loss != nullptr) {
    MTLSAM_CHECK(loss->is_cpu() && loss->is_contiguous(), "loss must be a contiguous "
                "CPU tensor");
    MTLSAM_CHECK(same_shape(*loss, rows) && loss->scalar_type() == rows.scalar_type(),
                 "loss must match the rows' shape and dtype");
  }
  const int64_t k = rows.size(0);
  const auto acc_type = acc_scalar_type(rows.scalar_type());
  Tensor out = whole ? zeros_like_device(rows, {k, k}, acc_type)
                     : zeros_like_device(rows, {nseg, k, k}, acc_type);
  const int64_t n = rows.size(1);
  const std::vector<Chunk> chunks = chunks_of_offsets(offs, nseg);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  const int64_t npairs = k * (k + 1) / 2;
  if (k == 0 || nchunks == 0) return out;
  MTLSAM_DISPATCH_FLOATING(rows.scalar_type(), "gram", [&] {
    using acc_t = opmath_t<scalar_t>;
    scalar_t* rp = rows.mutable_data_ptr<scalar_t>();
    const scalar_t* lp = loss ? loss->const_data_ptr<scalar_t>() : nullptr;
    std::vector<acc_t> partial(nchunks * npairs);
    parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<const void*> ptr(k);
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t b = chunks[c].begin, len = chunks[c].end - b;
        if (lp != nullptr) {  // same arithmetic as sub_
          for (int64_t i = 0; i < k; ++i) sub_range(rp + i * n + b, lp + i * n + b, len);
        }
        chunk_pair_dots<scalar_t, acc_t>(rp + b, n, k, len, ptr, partial.data() + c * npairs);
      }
    });
    acc_t* g = out.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < nchunks; ++c) {  // chunk order: fixed, independent of threads
      acc_t* gs = g + chunks[c].seg * k * k;
      const acc_t* pc = partial.data() + c * npairs;
      int64_t q = 0;
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = i; j < k; ++j, ++q) gs[i * k + j] += pc[q];
      }
    }
    for (int64_t s = 0; s < nseg; ++s) {  // mirror: exactly symmetric
      acc_t* gs = g + s * k * k;
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = i + 1; j < k; ++j) gs[j * k + i] = gs[i * k + j];
      }
    }
  });
  return out;
}

// The whole matrix as one segment: [K, K].
Tensor whole_gram(const Tensor& rows, const Tensor* loss) {
  MTLSAM_CHECK(rows.dim() == 2, "rows must be a contiguous [K, N] matrix");
  const int64_t whole[2] = {0, rows.size(1)};
  return grams_impl(rows, loss, whole, 1, /*whole=*/true);
}

}  // namespace

Tensor gram(const Tensor& rows) { return whole_gram(rows, nullptr); }

Tensor segment_gram(const Tensor& rows, const Tensor& offsets) {
  MTLSAM_CHECK(rows.dim() == 2, "rows must be a contiguous [K, N] matrix");
  check_offsets(offsets, rows.size(1));
  return grams_impl(rows, nullptr, offsets.const_data_ptr<int64_t>(), offsets.numel() - 1,
                    /*whole=*/false);
}

Tensor flat_gram_(Tensor& sam, const Tensor& loss) { return whole_gram(sam, &loss); }

void combine_(Tensor& out, const Tensor& rows, const Tensor& weights) {
  check_flat(out, "out");
  MTLSAM_CHECK(rows.is_cpu() && rows.dim() == 2 && rows.is_contiguous(),
              "rows must be a contiguous [K, N] CPU matrix");
  MTLSAM_CHECK(rows.scalar_type() == out.scalar_type(), "rows has dtype ", rows.scalar_type(),
              ", expected ", out.scalar_type());
  MTLSAM_CHECK(rows.size(1) == out.numel(), "rows has ", rows.size(1), " columns, expected ",
              out.numel());
  MTLSAM_CHECK(weights.dim() == 1 && weights.numel() == rows.size(0), "weights must have ",
              rows.size(0), " entries");
  const int64_t k = rows.size(0), n = rows.size(1);
  const auto acc_type = acc_scalar_type(out.scalar_type());
  const Tensor w = to_cpu_dtype_contiguous(weights, acc_type);
  MTLSAM_DISPATCH_FLOATING(out.scalar_type(), "combine_", [&] {
    using acc_t = opmath_t<scalar_t>;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t* rp = rows.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t cb, int64_t ce) {
      std::vector<acc_t> acc(kChunk), buf(std::is_same<scalar_t, acc_t>::value ? 0 : kChunk);
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t b = c * kChunk, len = std::min(kChunk, n - b);
        std::fill(acc.begin(), acc.begin() + len, acc_t(0));
        // Rows in order 0..K-1, as torch_ref.combine_ defines it.
        for (int64_t i = 0; i < k; ++i) {
          const acc_t* r = as_acc(rp + i * n + b, len, buf.data());
          const acc_t wi = wp[i];
          for (int64_t j = 0; j < len; ++j) acc[j] += r[j] * wi;
        }
        store_acc(acc.data(), len, op + b);
      }
    });
  });
}

}  // namespace cpu
}  // namespace mtlsam
