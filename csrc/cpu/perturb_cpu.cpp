// Element-wise kernels: fused mix-and-perturb with backup, all K points at once, bit-exact
// restore, in-place sub.
#include <algorithm>
#include <cstring>

#include "common.h"

namespace mtlsam {
namespace cpu {

namespace {

// theta = theta0 + T^2 (a g0 + bl * l) over n elements; l == nullptr: no local part. The
// operation order matches torch_ref.mix_perturb_. One loop per combination of the three
// switches, with the buffers declared unaliased (the op refuses a written buffer that shares
// memory with another), compiled for AVX2 and for the x86-64 baseline like the reductions
// (simd_sums.h; no FMA, so both give the same bits). On the MLP's 214k fp32 elements the op ran
// at 1.65x torch.add's time with the switches tested per element, 1.5x as separate loops and
// 1.3x with the AVX2 version (same run, hot cache).
template <bool kSave, bool kLocal, bool kAdaptive, typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void mix_body(
    scalar_t* __restrict__ p, scalar_t* __restrict__ bk, const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ l, int64_t n, acc_t av, acc_t bl) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t x0 = kSave ? p[j] : bk[j];
    if (kSave) bk[j] = x0;
    const acc_t base = static_cast<acc_t>(x0);
    acc_t eps = av * static_cast<acc_t>(g[j]);
    if (kLocal) eps += bl * static_cast<acc_t>(l[j]);
    if (kAdaptive) eps *= base * base;
    p[j] = static_cast<scalar_t>(base + eps);
  }
}

template <bool kSave, bool kLocal, bool kAdaptive, typename scalar_t, typename acc_t>
void mix_loop_baseline(scalar_t* p, scalar_t* bk, const scalar_t* g, const scalar_t* l,
                       int64_t n, acc_t av, acc_t bl) {
  mix_body<kSave, kLocal, kAdaptive>(p, bk, g, l, n, av, bl);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <bool kSave, bool kLocal, bool kAdaptive, typename scalar_t, typename acc_t>
__attribute__((target("avx2"))) void mix_loop_avx2(scalar_t* p, scalar_t* bk,
                                                   const scalar_t* g, const scalar_t* l,
                                                   int64_t n, acc_t av, acc_t bl) {
  mix_body<kSave, kLocal, kAdaptive>(p, bk, g, l, n, av, bl);
}
#endif

template <bool kSave, bool kLocal, bool kAdaptive, typename scalar_t, typename acc_t>
void mix_loop(scalar_t* p, scalar_t* bk, const scalar_t* g, const scalar_t* l, int64_t n,
              acc_t av, acc_t bl) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = std::strcmp(simd_isa(), "avx2") == 0;
  if (avx2) return mix_loop_avx2<kSave, kLocal, kAdaptive>(p, bk, g, l, n, av, bl);
#endif
  mix_loop_baseline<kSave, kLocal, kAdaptive>(p, bk, g, l, n, av, bl);
}

template <bool kSave, typename scalar_t, typename acc_t>
void mix_range_s(scalar_t* p, scalar_t* bk, const scalar_t* g, const scalar_t* l, int64_t n,
                 acc_t av, acc_t bl, bool adaptive) {
  if (l != nullptr) {
    adaptive ? mix_loop<kSave, true, true>(p, bk, g, l, n, av, bl)
             : mix_loop<kSave, true, false>(p, bk, g, l, n, av, bl);
  } else {
    adaptive ? mix_loop<kSave, false, true>(p, bk, g, l, n, av, bl)
             : mix_loop<kSave, false, false>(p, bk, g, l, n, av, bl);
  }
}

template <typename scalar_t, typename acc_t>
void mix_range(scalar_t* p, scalar_t* bk, const scalar_t* g, const scalar_t* l, int64_t n,
               acc_t av, acc_t bl, bool save_backup, bool adaptive) {
  save_backup ? mix_range_s<true>(p, bk, g, l, n, av, bl, adaptive)
              : mix_range_s<false>(p, bk, g, l, n, av, bl, adaptive);
}

// fp16: the same arithmetic on float pieces, converted with F16C where available (one element
// at a time, the c10 conversions held fp16 mix_perturb_ at 3.8 GB/s).
void mix_range(Half* p, Half* bk, const Half* g, const Half* l, int64_t n,
               float av, float bl, bool save_backup, bool adaptive) {
  constexpr int64_t kPiece = 1024;
  float x[kPiece], e[kPiece], t[kPiece];
  for (int64_t s = 0; s < n; s += kPiece) {
    const int64_t m = std::min(kPiece, n - s);
    if (save_backup) std::memcpy(bk + s, p + s, m * sizeof(Half));
    const float* base = as_acc(bk + s, m, x);
    const float* gv = as_acc(g + s, m, t);
    for (int64_t j = 0; j < m; ++j) e[j] = av * gv[j];
    if (l != nullptr) {
      const float* lv = as_acc(l + s, m, t);
      for (int64_t j = 0; j < m; ++j) e[j] += bl * lv[j];
    }
    if (adaptive) {
      for (int64_t j = 0; j < m; ++j) e[j] *= base[j] * base[j];
    }
    for (int64_t j = 0; j < m; ++j) e[j] = base[j] + e[j];
    store_acc(e, m, p + s);
  }
}

// One chunk of one point: param[u..v) from backup (and g0, and the local row where a sampled
// segment covers it); av is the chunk's segment coefficient. The sampled ranges are sorted and
// disjoint (checked by the ops), so the ones overlapping the chunk are walked in order.
template <typename scalar_t, typename acc_t>
void mix_chunk(const Chunk& ch, scalar_t* pp, scalar_t* bp, const scalar_t* gp, acc_t av,
               const scalar_t* lp, const acc_t* bq, const int64_t* st, const int64_t* ln,
               const int64_t* ls, int64_t np, bool save_backup, bool adaptive) {
  auto piece = [&](int64_t u, int64_t v, const scalar_t* l, acc_t bl) {
    mix_range(pp + u, bp + u, gp + u, l, v - u, av, bl, save_backup, adaptive);
  };
  if (lp == nullptr || np == 0) {
    piece(ch.begin, ch.end, nullptr, acc_t(0));
    return;
  }
  int64_t p = std::upper_bound(st, st + np, ch.begin) - st - 1;
  if (p < 0) p = 0;
  int64_t pos = ch.begin;
  for (; p < np && st[p] < ch.end && pos < ch.end; ++p) {
    const int64_t s0 = std::max(st[p], pos), s1 = std::min(st[p] + ln[p], ch.end);
    if (s1 <= s0) continue;
    if (pos < s0) piece(pos, s0, nullptr, acc_t(0));
    piece(s0, s1, lp + ls[p] + (s0 - st[p]), bq[p]);
    pos = s1;
  }
  if (pos < ch.end) piece(pos, ch.end, nullptr, acc_t(0));
}

// The sampled part's pointers (all null without a local part); b holds the local
// coefficients in the accumulation dtype.
template <typename scalar_t, typename acc_t>
struct Sampled {
  const scalar_t* l = nullptr;
  const acc_t* b = nullptr;
  const int64_t* st = nullptr;
  const int64_t* ln = nullptr;
  const int64_t* ls = nullptr;
  Sampled(bool has, const OptionalTensor& local, const OptionalTensor& coefs,
          const OptionalTensor& starts, const OptionalTensor& lengths,
          const OptionalTensor& local_starts) {
    if (!has) return;
    l = local->const_data_ptr<scalar_t>();
    b = coefs->const_data_ptr<acc_t>();
    st = starts->const_data_ptr<int64_t>();
    ln = lengths->const_data_ptr<int64_t>();
    ls = local_starts->const_data_ptr<int64_t>();
  }
};

}  // namespace

void mix_perturb_(Tensor& param, Tensor& backup, const Tensor& g0,
                  const Tensor& coef, const Tensor& offsets,
                  const OptionalTensor& local,
                  const OptionalTensor& local_coef,
                  const OptionalTensor& starts,
                  const OptionalTensor& lengths,
                  const OptionalTensor& local_starts, bool adaptive,
                  bool save_backup) {
  check_flat(param, "param");
  check_like(backup, param, "backup");
  check_like(g0, param, "g0");
  check_offsets(offsets, param.numel());
  check_disjoint(param, backup, "param", "backup");
  check_disjoint(param, g0, "param", "g0");
  if (save_backup) check_disjoint(backup, g0, "backup", "g0");
  const int64_t nseg = offsets.numel() - 1;
  MTLSAM_CHECK(coef.dim() == 1 && coef.numel() == nseg, "coef must hold one value per segment (",
              nseg, "), got ", coef.numel());
  const bool has_local = local.has_value();
  int64_t np = 0;
  if (has_local) {
    MTLSAM_CHECK(local_coef.has_value() && starts.has_value() && lengths.has_value() &&
                    local_starts.has_value(),
                "local needs local_coef, starts, lengths and local_starts");
    check_flat(*local, "local");
    check_disjoint(param, *local, "param", "local");
    if (save_backup) check_disjoint(backup, *local, "backup", "local");
    MTLSAM_CHECK(local->scalar_type() == param.scalar_type(), "local has dtype ",
                local->scalar_type(), ", expected ", param.scalar_type());
    check_sampled(*starts, *lengths, *local_starts, param.numel(), local->numel());
    np = starts->numel();
    MTLSAM_CHECK(local_coef->dim() == 1 && local_coef->numel() == np,
                "local_coef must hold one value per sampled segment (", np, ")");
  }
  const auto acc_type = acc_scalar_type(param.scalar_type());
  const Tensor a = to_cpu_dtype_contiguous(coef, acc_type);
  const OptionalTensor b =
      has_local ? OptionalTensor(to_cpu_dtype_contiguous(*local_coef, acc_type)) : std::nullopt;
  const std::vector<Chunk> chunks = chunks_of_offsets(offsets);
  MTLSAM_DISPATCH_FLOATING(param.scalar_type(), "mix_perturb_",
                                  [&] {
    using acc_t = opmath_t<scalar_t>;
    scalar_t* pp = param.mutable_data_ptr<scalar_t>();
    scalar_t* bp = backup.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = g0.const_data_ptr<scalar_t>();
    const acc_t* ap = a.const_data_ptr<acc_t>();
    const Sampled<scalar_t, acc_t> sp(has_local, local, b, starts, lengths, local_starts);
    parallel_for(0, static_cast<int64_t>(chunks.size()), kGrain, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        mix_chunk(chunks[c], pp, bp, gp, ap[chunks[c].seg], sp.l, sp.b, sp.st, sp.ln, sp.ls, np,
                  save_backup, adaptive);
      }
    });
  });
}

// All K points in one call: row i of out is what mix_perturb_(out[i], theta, d_i, coefs[i], ...,
// save_backup = false) writes, from the same loops (the same bits). The chunks are the outer
// loop and the rows the inner one, so a chunk of theta (16 KiB of fp32) is read from memory
// once and from cache by the other K - 1 rows, and one parallel region covers all rows.
void perturb_points_(Tensor& out, const Tensor& theta, const Tensor& directions,
                     const Tensor& coefs, const Tensor& offsets, const OptionalTensor& local,
                     const OptionalTensor& local_coefs, const OptionalTensor& starts,
                     const OptionalTensor& lengths, const OptionalTensor& local_starts,
                     bool adaptive) {
  MTLSAM_CHECK(out.is_cpu() && out.dim() == 2 && out.is_contiguous(),
               "out must be a contiguous [K, N] CPU matrix");
  MTLSAM_CHECK(is_floating(out.scalar_type()), "out must be floating point, got ",
               out.scalar_type());
  const int64_t k = out.size(0), n = out.size(1);
  check_flat(theta, "theta");
  MTLSAM_CHECK(theta.scalar_type() == out.scalar_type() && theta.numel() == n,
               "theta must be a flat ", out.scalar_type(), " buffer of ", n, " elements");
  MTLSAM_CHECK(directions.is_cpu() && directions.dim() == 2 && directions.is_contiguous() &&
                   (directions.size(0) == 1 || directions.size(0) == k) &&
                   directions.size(1) == n && directions.scalar_type() == out.scalar_type(),
               "directions must be contiguous [1, ", n, "] or [", k, ", ", n, "] ",
               out.scalar_type(), " rows, got ", shape_str(directions));
  check_offsets(offsets, n);
  const int64_t nseg = offsets.numel() - 1;
  MTLSAM_CHECK(coefs.dim() == 2 && coefs.size(0) == k && coefs.size(1) == nseg,
               "coefs must be [", k, ", ", nseg, "] (task x segment), got ", shape_str(coefs));
  check_disjoint(out, theta, "out", "theta");
  check_disjoint(out, directions, "out", "directions");
  const bool has_local = local.has_value();
  int64_t np = 0, m = 0;
  if (has_local) {
    MTLSAM_CHECK(local_coefs.has_value() && starts.has_value() && lengths.has_value() &&
                     local_starts.has_value(),
                 "local needs local_coefs, starts, lengths and local_starts");
    MTLSAM_CHECK(local->is_cpu() && local->dim() == 2 && local->is_contiguous() &&
                     local->size(0) == k && local->scalar_type() == out.scalar_type(),
                 "local must be contiguous [", k, ", M] ", out.scalar_type(), " rows, got ",
                 shape_str(*local));
    m = local->size(1);
    check_disjoint(out, *local, "out", "local");
    check_sampled(*starts, *lengths, *local_starts, n, m);
    np = starts->numel();
    MTLSAM_CHECK(local_coefs->dim() == 2 && local_coefs->size(0) == k &&
                     local_coefs->size(1) == np,
                 "local_coefs must be [", k, ", ", np, "] (task x sampled segment), got ",
                 shape_str(*local_coefs));
  }
  if (k == 0 || n == 0) return;
  const auto acc_type = acc_scalar_type(out.scalar_type());
  const Tensor a = to_cpu_dtype_contiguous(coefs, acc_type);
  const OptionalTensor b =
      has_local ? OptionalTensor(to_cpu_dtype_contiguous(*local_coefs, acc_type)) : std::nullopt;
  const std::vector<Chunk> chunks = chunks_of_offsets(offsets);
  const int64_t dstride = directions.size(0) == 1 ? 0 : n;
  MTLSAM_DISPATCH_FLOATING(out.scalar_type(), "perturb_points_", [&] {
    using acc_t = opmath_t<scalar_t>;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // theta is the "backup" of every row's mix (never written: save_backup is false)
    scalar_t* tp = const_cast<scalar_t*>(theta.const_data_ptr<scalar_t>());
    const scalar_t* dp = directions.const_data_ptr<scalar_t>();
    const acc_t* ap = a.const_data_ptr<acc_t>();
    const Sampled<scalar_t, acc_t> sp(has_local, local, b, starts, lengths, local_starts);
    parallel_for(0, static_cast<int64_t>(chunks.size()), kGrain, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        for (int64_t i = 0; i < k; ++i) {
          mix_chunk(ch, op + i * n, tp, dp + i * dstride, ap[i * nseg + ch.seg],
                    has_local ? sp.l + i * m : nullptr, has_local ? sp.b + i * np : nullptr,
                    sp.st, sp.ln, sp.ls, np, false, adaptive);
        }
      }
    });
  });
}

void restore_(Tensor& param, const Tensor& backup) {
  check_flat(param, "param");
  check_like(backup, param, "backup");
  const int64_t bytes = param.numel() * param.element_size();
  char* dst = static_cast<char*>(param.mutable_data_ptr());
  const char* src = static_cast<const char*>(backup.const_data_ptr());
  constexpr int64_t kBytes = 1 << 16;  // 64 KiB per task: large enough to amortise scheduling
  parallel_for(0, (bytes + kBytes - 1) / kBytes, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t off = c * kBytes;
      std::memcpy(dst + off, src + off, std::min(kBytes, bytes - off));
    }
  });
}

void sub_(Tensor& rows, const Tensor& other) {
  MTLSAM_CHECK(rows.is_cpu() && rows.is_contiguous() && other.is_contiguous(),
              "sub_ needs contiguous CPU tensors");
  MTLSAM_CHECK(same_shape(rows, other) && rows.scalar_type() == other.scalar_type(),
              "sub_ needs two tensors of equal shape and dtype");
  MTLSAM_CHECK(is_floating(rows.scalar_type()), "sub_ needs floating-point tensors");
  const int64_t n = rows.numel();
  MTLSAM_DISPATCH_FLOATING(rows.scalar_type(), "sub_", [&] {
    scalar_t* r = rows.mutable_data_ptr<scalar_t>();
    const scalar_t* o = other.const_data_ptr<scalar_t>();
    parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) { sub_range(r + b, o + b, e - b); });
  });
}

}  // namespace cpu
}  // namespace mtlsam
