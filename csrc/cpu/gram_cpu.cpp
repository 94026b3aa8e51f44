// Gram matrix of a [K, N] row matrix and the weighted combine of its rows.
#include <type_traits>

#include "common.h"
#include "simd_sums.h"

namespace mtlsam {
namespace cpu {

namespace {

// The pair sums of one chunk: rows i at base + i * stride, len elements each. bfloat16 rows are
// read in place (widened in registers), fp16 through a converted copy in buf (k * kChunk),
// fp32/fp64 in place.
template <typename scalar_t, typename acc_t>
void chunk_pair_dots(const scalar_t* base, int64_t stride, int64_t k, int64_t len,
                     std::vector<acc_t>& buf, std::vector<const void*>& ptr, acc_t* out) {
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    for (int64_t i = 0; i < k; ++i) ptr[i] = base + i * stride;
    pair_dots_bf16(reinterpret_cast<const uint16_t* const*>(ptr.data()), k, len, out);
  } else {
    for (int64_t i = 0; i < k; ++i) {
      acc_t* scratch = buf.empty() ? nullptr : buf.data() + i * kChunk;
      ptr[i] = as_acc(base + i * stride, len, scratch);
    }
    pair_dots(reinterpret_cast<const acc_t* const*>(ptr.data()), k, len, out);
  }
}

// Per-segment Grams [S, K, K] of the [K, N] rows (segment s spans columns [offsets[s],
// offsets[s + 1]); the whole-matrix Gram is the one-segment case). With `loss`, first
// rows -= loss in place (chunk by chunk, the stored rounded value being the one the Gram sees),
// so F-MTL's flat rows and their Gram take one pass. The chunks never straddle a segment; each
// chunk's K(K+1)/2 partials come from one read of its K row pieces, and each segment sums its
// chunks' partials in chunk order, so the result does not depend on the thread count.
at::Tensor grams_impl(const at::Tensor& rows, const at::Tensor* loss,
                      const at::Tensor& offsets) {
  TORCH_CHECK(rows.device().is_cpu(), "rows must be a CPU tensor");
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous(), "rows must be a contiguous [K, N] matrix");
  TORCH_CHECK(at::isFloatingType(rows.scalar_type()), "rows must be floating point");
  if (loss != nullptr) {
    TORCH_CHECK(loss->device().is_cpu() && loss->is_contiguous(), "loss must be a contiguous "
                "CPU tensor");
    TORCH_CHECK(loss->sizes() == rows.sizes() && loss->scalar_type() == rows.scalar_type(),
                "loss must match the rows' shape and dtype");
  }
  const int64_t k = rows.size(0), n = rows.size(1);
  check_offsets(offsets, n);
  const int64_t nseg = offsets.numel() - 1;
  const auto acc_type = rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({nseg, k, k}, rows.options().dtype(acc_type));
  const std::vector<Chunk> chunks = chunks_of_offsets(offsets);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  const int64_t npairs = k * (k + 1) / 2;
  if (k == 0 || nchunks == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "gram", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* rp = static_cast<scalar_t*>(rows.data_ptr());
    const scalar_t* lp = loss ? loss->data_ptr<scalar_t>() : nullptr;
    std::vector<acc_t> partial(nchunks * npairs);
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<acc_t> buf;
      if (std::is_same<scalar_t, at::Half>::value) buf.resize(k * kChunk);
      std::vector<const void*> ptr(k);
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t b = chunks[c].begin, len = chunks[c].end - b;
        if (lp != nullptr) {  // same arithmetic as sub_
          for (int64_t i = 0; i < k; ++i) sub_range(rp + i * n + b, lp + i * n + b, len);
        }
        chunk_pair_dots<scalar_t, acc_t>(rp + b, n, k, len, buf, ptr,
                                         partial.data() + c * npairs);
      }
    });
    acc_t* g = out.data_ptr<acc_t>();
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
at::Tensor whole_gram(const at::Tensor& rows, const at::Tensor* loss) {
  TORCH_CHECK(rows.dim() == 2, "rows must be a contiguous [K, N] matrix");
  const at::Tensor whole = at::tensor({int64_t{0}, rows.size(1)}, at::kLong);
  return grams_impl(rows, loss, whole).reshape({rows.size(0), rows.size(0)});
}

}  // namespace

at::Tensor gram(const at::Tensor& rows) { return whole_gram(rows, nullptr); }

at::Tensor segment_gram(const at::Tensor& rows, const at::Tensor& offsets) {
  return grams_impl(rows, nullptr, offsets);
}

at::Tensor flat_gram_(at::Tensor& sam, const at::Tensor& loss) { return whole_gram(sam, &loss); }

void combine_(at::Tensor& out, const at::Tensor& rows, const at::Tensor& weights) {
  check_flat(out, "out");
  TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 2 && rows.is_contiguous(),
              "rows must be a contiguous [K, N] CPU matrix");
  TORCH_CHECK(rows.scalar_type() == out.scalar_type(), "rows has dtype ", rows.scalar_type(),
              ", expected ", out.scalar_type());
  TORCH_CHECK(rows.size(1) == out.numel(), "rows has ", rows.size(1), " columns, expected ",
              out.numel());
  TORCH_CHECK(weights.dim() == 1 && weights.numel() == rows.size(0), "weights must have ",
              rows.size(0), " entries");
  const int64_t k = rows.size(0), n = rows.size(1);
  const auto acc_type = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = weights.to(at::kCPU, acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "combine_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* rp = rows.data_ptr<scalar_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t cb, int64_t ce) {
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
