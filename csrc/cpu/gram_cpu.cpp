// Gram matrix of a [K, N] row matrix and the weighted combine of its rows.
#include <cstring>
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

// combine_'s inner loop: a[j] = (((a[j] + r0[j] w0) + r1[j] w1) + ...) over up to kGroup rows
// in order (a[j] starting from 0 when `first`): the reference's sums, one rounding per add
// and per product (no FMA). Grouping the rows cuts the accumulator's loads and stores by
// kGroup; the loops are compiled for AVX2 and for the x86-64 baseline like the reductions.
// Before (one row per pass, baseline only) the fp32 combine ran at 0.55 of a copy of its
// bytes (ops_bench, ResNet-18 layout, K = 4) and took 0.73-0.76 ms for gl-lagged's [10, 148k]
// local rows on the main job's MLP (profiler).
constexpr int kGroup = 4;

template <int G, bool kFirst, typename acc_t>
inline __attribute__((always_inline)) void add_rows_body(acc_t* __restrict__ a,
                                                         const acc_t* const* r,
                                                         const acc_t* w, int64_t len) {
  const acc_t* __restrict__ r0 = r[0];
  const acc_t* __restrict__ r1 = G > 1 ? r[1] : r[0];
  const acc_t* __restrict__ r2 = G > 2 ? r[2] : r[0];
  const acc_t* __restrict__ r3 = G > 3 ? r[3] : r[0];
  const acc_t w0 = w[0], w1 = G > 1 ? w[1] : acc_t(0), w2 = G > 2 ? w[2] : acc_t(0),
              w3 = G > 3 ? w[3] : acc_t(0);
  for (int64_t j = 0; j < len; ++j) {
    acc_t v = kFirst ? acc_t(0) : a[j];
    v = v + r0[j] * w0;
    if (G > 1) v = v + r1[j] * w1;
    if (G > 2) v = v + r2[j] * w2;
    if (G > 3) v = v + r3[j] * w3;
    a[j] = v;
  }
}

template <bool kFirst, typename acc_t>
inline __attribute__((always_inline)) void add_rows_any(acc_t* a, const acc_t* const* r,
                                                        const acc_t* w, int64_t g,
                                                        int64_t len) {
  switch (g) {
    case 4: add_rows_body<4, kFirst>(a, r, w, len); break;
    case 3: add_rows_body<3, kFirst>(a, r, w, len); break;
    case 2: add_rows_body<2, kFirst>(a, r, w, len); break;
    default: add_rows_body<1, kFirst>(a, r, w, len); break;
  }
}

template <typename acc_t>
void add_rows_baseline(acc_t* a, const acc_t* const* r, const acc_t* w, int64_t g,
                       int64_t len, bool first) {
  first ? add_rows_any<true>(a, r, w, g, len) : add_rows_any<false>(a, r, w, g, len);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename acc_t>
__attribute__((target("avx2"))) void add_rows_avx2(acc_t* a, const acc_t* const* r,
                                                   const acc_t* w, int64_t g, int64_t len,
                                                   bool first) {
  first ? add_rows_any<true>(a, r, w, g, len) : add_rows_any<false>(a, r, w, g, len);
}
#endif

template <typename acc_t>
void add_rows(acc_t* a, const acc_t* const* r, const acc_t* w, int64_t g, int64_t len,
              bool first) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = std::strcmp(simd_isa(), "avx2") == 0;
  if (avx2) return add_rows_avx2(a, r, w, g, len, first);
#endif
  add_rows_baseline(a, r, w, g, len, first);
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
  // fp32 / fp64 accumulate in out itself, chunk by chunk: a row sharing its memory would be
  // read after it was overwritten
  check_disjoint(out, rows, "out", "rows");
  const int64_t k = rows.size(0), n = rows.size(1);
  const auto acc_type = acc_scalar_type(out.scalar_type());
  const Tensor w = to_cpu_dtype_contiguous(weights, acc_type);
  MTLSAM_DISPATCH_FLOATING(out.scalar_type(), "combine_", [&] {
    using acc_t = opmath_t<scalar_t>;
    constexpr bool kWide = std::is_same<scalar_t, acc_t>::value;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t* rp = rows.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t cb, int64_t ce) {
      // 16-bit: a float accumulator and up to kGroup widened rows per chunk
      std::vector<acc_t> acc(kWide ? 0 : kChunk), buf(kWide ? 0 : kGroup * kChunk);
      const acc_t* r[kGroup];
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t b = c * kChunk, len = std::min(kChunk, n - b);
        acc_t* a = kWide ? reinterpret_cast<acc_t*>(op + b) : acc.data();
        // Rows in order 0..K-1, as torch_ref.combine_ defines it, kGroup rows per pass over
        // the accumulator (the first pass starts from 0, as the reference's zeros do)
        for (int64_t i = 0; i < k; i += kGroup) {
          const int64_t g = std::min<int64_t>(kGroup, k - i);
          for (int64_t q = 0; q < g; ++q) {
            r[q] = as_acc(rp + (i + q) * n + b, len, buf.data() + q * kChunk);
          }
          add_rows(a, r, wp + i, g, len, i == 0);
        }
        if (k == 0) std::fill(a, a + len, acc_t(0));
        if (!kWide) store_acc(acc.data(), len, op + b);
      }
    });
  });
}

}  // namespace cpu
}  // namespace mtlsam
