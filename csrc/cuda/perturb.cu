// mix_perturb_, perturb_points_ and restore_ (CUDA).
//
// mix_perturb_ is one pass over the flat buffer: a flat grid over kChunk-element chunks (as
// segment_sumsq, see reduce.cu); thread 0 finds the segment range of its chunk by binary search in
// the device offsets table, each thread finds the segment of each 16-byte group by binary search
// within that range. Every element reads param (save_backup) or backup, g0 and, when it lies in a
// sampled segment, the local row once, and writes param (and backup) once:
//   base = save_backup ? param : backup;  if save_backup: backup = param (bit copy)
//   e = coef[s] * g0;  e = e + local_coef[p] * local[ls_p + i - start_p]  (each covering p)
//   if adaptive: e = e * (base * base);   param = round(base + e)
// with the reference's rounding steps (explicit _rn intrinsics, no FMA contraction).
// perturb_points_ writes all K perturbed points [K, N] of one theta in one launch: row r is what
// mix_perturb_(out[r], theta, d_r, coefs[r], ..., local[r], local_coefs[r], save_backup=False)
// writes, computed by the same chunk body (perturb_chunk) over the same chunks, one block per
// (chunk, row); the sampled table is sorted once for all rows (see perturb_points_kernel). Before
// it, the ops layer called mix_perturb_ once per row: K launches and K sorts of the same table.
// The sampled table may be in any order (and, although the flat layout never produces it,
// overlapping): it is sorted by start on the device (a stable sort, asynchronous, see
// sort_sampled_kernel) together with a running maximum of the ends, and an element's covering
// segments are found by a binary search followed by a walk back while the running maximum end
// still passes the element.
// Element-wise work has no summation order to fix, so vectorisation (16-byte loads and stores
// when param, backup and g0 are all 16-byte aligned; for perturb_points_ every row start of out
// and directions too) cannot change any bits.
#include "common.cuh"

namespace mtlsam_cuda {
namespace {

template <typename T>
struct LocalPart {
  const T* local;            // 1-D local row (of one point), or nullptr
  int64_t m;                 // its length
  const acc_t<T>* coef;      // local_coef (of that point), sorted by start
  const int64_t* start;      // sorted starts
  const int64_t* length;     // lengths in the same order
  const int64_t* lstart;     // local_starts in the same order
  const int64_t* max_end;    // running maximum of start + length
  int64_t num;               // P
};

template <typename T>
__device__ __forceinline__ acc_t<T> perturb_one(acc_t<T> base, acc_t<T> g, acc_t<T> c,
                                                const LocalPart<T>& lp, int64_t i,
                                                bool adaptive) {
  using A = acc_t<T>;
  A e = mul_rn(c, g);
  if (lp.local != nullptr && lp.num > 0) {
    // Last sorted segment starting at or before i, then walk back over the ones whose
    // running maximum end still passes i.
    int64_t j;
    if (lp.start[0] > i) {
      j = -1;
    } else {
      j = last_le(lp.start, 0, lp.num - 1, i);
    }
    for (; j >= 0 && lp.max_end[j] > i; --j) {
      const int64_t st = lp.start[j];
      const int64_t ln = lp.length[j];
      if (ln > 0 && i >= st && i - st < ln) {
        const int64_t li = lp.lstart[j] + (i - st);
        if (li >= 0 && li < lp.m) e = add_rn(e, mul_rn(lp.coef[j], to_acc(lp.local[li])));
      }
    }
  }
  if (adaptive) e = mul_rn(e, mul_rn(base, base));
  return add_rn(base, e);
}

// One kChunk-element chunk [lo, hi) of one point, the body shared by mix_perturb_kernel and
// perturb_points_kernel (so both write the same bits for the same inputs):
//   dst[i] = round(perturb_one(src[i], g[i], coef[segment of i], lp, i)),
//   and copy[i] = src[i] (a bit copy) first when copy is not null.
// src may be dst (mix_perturb_ with save_backup reads param and writes it back): each element is
// read before it is written, by the same thread, so the parameters are deliberately not
// __restrict__ here (the kernels' own parameters carry the no-alias promise where it holds).
// vec: 16-byte loads / stores, legal when dst, copy, src and g are 16-byte aligned at element lo
// (lo is a multiple of kChunk, hence of V). seg_range: two int64 of shared memory. Must be
// called by every thread of the block (it synchronises).
template <typename T>
__device__ __forceinline__ void perturb_chunk(T* dst, T* copy, const T* src, const T* g,
                                              const acc_t<T>* coef, const int64_t* off,
                                              int64_t num_segments, int64_t lo, int64_t hi,
                                              const LocalPart<T>& lp, bool adaptive, bool vec,
                                              int64_t* seg_range) {
  constexpr int V = vec_width<T>();
  if (threadIdx.x == 0) {
    seg_range[0] = last_le(off, 0, num_segments - 1, lo);
    seg_range[1] = last_le(off, seg_range[0], num_segments - 1, hi - 1);
  }
  __syncthreads();
  const int64_t s_lo = seg_range[0];
  const int64_t s_hi = seg_range[1];
  // kChunk is a multiple of V, so groups never straddle chunks.
  for (int64_t e0 = lo + static_cast<int64_t>(threadIdx.x) * V; e0 < hi;
       e0 += static_cast<int64_t>(kBlock) * V) {
    int64_t s = last_le(off, s_lo, s_hi, e0);
    if (vec && e0 + V <= hi) {
      const Pack<T, V> pb = *reinterpret_cast<const Pack<T, V>*>(src + e0);
      const Pack<T, V> pg = *reinterpret_cast<const Pack<T, V>*>(g + e0);
      if (copy != nullptr) *reinterpret_cast<Pack<T, V>*>(copy + e0) = pb;
      Pack<T, V> po;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t i = e0 + j;
        while (s < s_hi && off[s + 1] <= i) ++s;
        po.v[j] = from_acc<T>(perturb_one<T>(to_acc(pb.v[j]), to_acc(pg.v[j]), coef[s], lp, i,
                                             adaptive));
      }
      *reinterpret_cast<Pack<T, V>*>(dst + e0) = po;
    } else {
      for (int j = 0; j < V && e0 + j < hi; ++j) {
        const int64_t i = e0 + j;
        while (s < s_hi && off[s + 1] <= i) ++s;
        const T b = src[i];
        if (copy != nullptr) copy[i] = b;
        dst[i] = from_acc<T>(perturb_one<T>(to_acc(b), to_acc(g[i]), coef[s], lp, i, adaptive));
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
    mix_perturb_kernel(T* __restrict__ param, T* __restrict__ backup, const T* __restrict__ g0,
                       const acc_t<T>* __restrict__ coef, const int64_t* __restrict__ off,
                       int64_t num_segments, int64_t n, LocalPart<T> lp, bool adaptive,
                       bool save_backup, bool vec) {
  __shared__ int64_t seg_range[2];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t hi = lo + kChunk < n ? lo + kChunk : n;
  // base = param (saved to backup first) or backup (the rebuild).
  perturb_chunk<T>(param, save_backup ? backup : nullptr, save_backup ? param : backup, g0, coef,
                   off, num_segments, lo, hi, lp, adaptive, vec, seg_range);
}

// All K points in one launch: block b handles chunk b / K of row b % K, i.e. the K rows of a
// chunk are consecutive blocks, which the hardware dispatches close together (in index order),
// so theta's chunk (read by every row), a shared direction's chunk and the chunk's offsets are
// mostly L2 hits after the first row, not K reads from memory. Row r is exactly
// mix_perturb_(out[r], theta, dir_r, coefs[r], ..., local[r], local_coefs[r],
// save_backup=False): the same chunk body with
//   dst = out + r n,  src = theta,  g = dirs + (dir_rows == 1 ? 0 : r n),  coef = coefs + r S,
//   local row = local + r M,  sorted local_coef row = lp.coef + r P,
// and the same chunk decomposition of [0, n) (chunk boundaries, and so the element -> thread
// assignment, are the single-point kernel's; element-wise work does not depend on them anyway).
// lp holds row 0's local row and sorted coefficients; the table itself is shared by all rows.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    perturb_points_kernel(T* __restrict__ out, const T* __restrict__ theta,
                          const T* __restrict__ dirs, bool shared_dir,
                          const acc_t<T>* __restrict__ coefs, const int64_t* __restrict__ off,
                          int64_t num_segments, int64_t n, int64_t K, LocalPart<T> lp,
                          bool adaptive, bool vec) {
  __shared__ int64_t seg_range[2];
  const int64_t b = static_cast<int64_t>(blockIdx.x);
  const int64_t row = b % K;
  const int64_t lo = (b / K) * kChunk;
  const int64_t hi = lo + kChunk < n ? lo + kChunk : n;
  LocalPart<T> lr = lp;
  if (lr.local != nullptr) {
    lr.local += row * lr.m;
    lr.coef += row * lr.num;
  }
  perturb_chunk<T>(out + row * n, nullptr, theta, shared_dir ? dirs : dirs + row * n,
                   coefs + row * num_segments, off, num_segments, lo, hi, lr, adaptive, vec,
                   seg_range);
}

// Stable sort of the sampled table by start, in one block, with a running maximum of the ends:
//   out position of entry i = #{j : start[j] < start[i] or (start[j] == start[i] and j < i)},
// a permutation (the (start, index) pairs are distinct), i.e. exactly the order of a stable
// ascending sort of the starts; length, local_start and coef move with their start, lengths are
// clamped at 0 as they are stored, and max_end[r] = max_{q <= r} (start_q + length_q) is then
// the inclusive running maximum over the sorted, clamped entries (thread 0, in order).
// coef is a [rows, P] row-major matrix (one row for mix_perturb_, K for perturb_points_): every
// row is permuted by the one rank of each entry, so all rows of s_coef stay in the order of the
// shared sorted table, and the table is sorted once per call, not once per row.
// Why a kernel of its own: the stable ABI has no sort / cummax wrapper, and P (the number of
// sampled layers, tens to hundreds) is small, so the O(P^2 / kBlock) rank count in one block is
// a few microseconds; both builds use it, so they sort identically and stay asynchronous.
template <typename A>
__global__ void __launch_bounds__(kBlock)
    sort_sampled_kernel(const int64_t* __restrict__ start, const int64_t* __restrict__ length,
                        const int64_t* __restrict__ lstart, const A* __restrict__ coef, int64_t P,
                        int64_t rows, int64_t* __restrict__ s_start, int64_t* __restrict__ s_len,
                        int64_t* __restrict__ s_lstart, A* __restrict__ s_coef,
                        int64_t* __restrict__ s_max_end) {
  for (int64_t i = threadIdx.x; i < P; i += kBlock) {
    const int64_t si = start[i];
    int64_t r = 0;
    for (int64_t j = 0; j < P; ++j) {
      const int64_t sj = start[j];
      r += (sj < si || (sj == si && j < i)) ? 1 : 0;
    }
    const int64_t li = length[i];
    s_start[r] = si;
    s_len[r] = li > 0 ? li : 0;
    s_lstart[r] = lstart[i];
    for (int64_t k = 0; k < rows; ++k) s_coef[k * P + r] = coef[k * P + i];
  }
  __syncthreads();  // makes the block's global writes visible to thread 0
  if (threadIdx.x == 0) {
    int64_t mx = 0;
    for (int64_t r = 0; r < P; ++r) {
      // start + length with int64 wrap-around, as the torch add it replaces (no signed overflow).
      const int64_t e = static_cast<int64_t>(static_cast<uint64_t>(s_start[r]) +
                                             static_cast<uint64_t>(s_len[r]));
      mx = (r == 0 || e > mx) ? e : mx;
      s_max_end[r] = mx;
    }
  }
}

// The sorted sampled table of a call, on the device: int64 [start | length | local_start |
// max_end] (P entries each) and the local coefficients [rows, P] in the acc dtype, permuted
// alike. Enqueues sort_sampled_kernel (asynchronous) and returns the LocalPart of row 0 over
// them (local row 0 of length m; a caller offsets local and coef for its other rows). The
// tensors must outlive the kernels that read them (the caller keeps them until its launches are
// enqueued; the caching allocator's stream semantics do the rest).
template <typename T>
LocalPart<T> sort_sampled(const Tensor& st, const Tensor& ln, const Tensor& ls,
                          const Tensor& lcoef, int64_t rows, const T* local, int64_t m,
                          Tensor& s_table, Tensor& s_coef, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t P = st.numel();
  int64_t* tp = s_table.mutable_data_ptr<int64_t>();
  A* cp = s_coef.mutable_data_ptr<A>();
  sort_sampled_kernel<A><<<1, kBlock, 0, stream>>>(
      st.const_data_ptr<int64_t>(), ln.const_data_ptr<int64_t>(), ls.const_data_ptr<int64_t>(),
      lcoef.const_data_ptr<A>(), P, rows, tp, tp + P, tp + 2 * P, cp, tp + 3 * P);
  MTLSAM_CUDA_LAUNCH_CHECK();
  LocalPart<T> lp{};
  lp.local = local;
  lp.m = m;
  lp.coef = cp;
  lp.start = tp;
  lp.length = tp + P;
  lp.lstart = tp + 2 * P;
  lp.max_end = tp + 3 * P;
  lp.num = P;
  return lp;
}

// Whether two contiguous tensors' element ranges share any byte.
bool overlaps(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto pa = reinterpret_cast<std::uintptr_t>(a.const_data_ptr());
  const auto pb = reinterpret_cast<std::uintptr_t>(b.const_data_ptr());
  return pa < pb + nbytes(b) && pb < pa + nbytes(a);
}

// A [rows, cols] coefficient matrix (one row per point): any floating dtype on the device,
// converted to the accumulation dtype and made contiguous (row r at r * cols), as coef_as_acc.
Tensor coef_rows_as_acc(const char* op, const char* name, const Tensor& c, int32_t dev,
                        ScalarType acc, int64_t rows, int64_t cols) {
  MTLSAM_CHECK(c.is_cuda() && device_index(c) == dev, "mtlsam::", op, " (CUDA): ", name,
               " must be on cuda:", dev, ", got ", device_str(c));
  MTLSAM_CHECK(is_floating(c.scalar_type()), "mtlsam::", op, " (CUDA): ", name,
               " must be floating, got ", c.scalar_type());
  MTLSAM_CHECK(c.dim() == 2 && c.size(0) == rows && c.size(1) == cols, "mtlsam::", op,
               " (CUDA): ", name, " must be [", rows, ", ", cols, "], got shape ", shape_str(c));
  return to_dtype_contiguous(c, acc);
}

// The segment table argument of the perturbation ops; returns S (offsets holds S + 1 entries).
int64_t check_offsets_arg(const char* op, const Tensor& offsets, int32_t dev) {
  check_table(op, "offsets", offsets, dev);
  MTLSAM_CHECK(offsets.numel() >= 1, "mtlsam::", op, " (CUDA): offsets must hold S + 1 >= 1 "
               "entries");
  return offsets.numel() - 1;
}

// The sampled table given with a local part: all three present, device int64 tables of one
// length. coef_name is the local coefficients' argument, which must be present too.
struct SampledArgs {
  const Tensor* st;
  const Tensor* ln;
  const Tensor* ls;
};

SampledArgs check_sampled_args(const char* op, const char* coef_name,
                               const OptionalTensor& local_coef, const OptionalTensor& starts,
                               const OptionalTensor& lengths, const OptionalTensor& local_starts,
                               int32_t dev) {
  MTLSAM_CHECK(local_coef.has_value() && local_coef->defined() && starts.has_value() &&
                   starts->defined() && lengths.has_value() && lengths->defined() &&
                   local_starts.has_value() && local_starts->defined(),
               "mtlsam::", op, " (CUDA): local needs ", coef_name, ", starts, lengths and "
               "local_starts");
  const SampledArgs sa{&*starts, &*lengths, &*local_starts};
  check_table(op, "starts", *sa.st, dev);
  check_table(op, "lengths", *sa.ln, dev);
  check_table(op, "local_starts", *sa.ls, dev);
  MTLSAM_CHECK(sa.st->numel() == sa.ln->numel() && sa.st->numel() == sa.ls->numel(),
               "mtlsam::", op, " (CUDA): sampled starts, lengths and local_starts must have "
               "equal length, got ", sa.st->numel(), ", ", sa.ln->numel(), " and ",
               sa.ls->numel());
  return sa;
}

}  // namespace

void mix_perturb_(Tensor& param, Tensor& backup, const Tensor& g0, const Tensor& coef,
                  const Tensor& offsets, const OptionalTensor& local,
                  const OptionalTensor& local_coef, const OptionalTensor& starts,
                  const OptionalTensor& lengths, const OptionalTensor& local_starts,
                  bool adaptive, bool save_backup) {
  const char* op = "mix_perturb_";
  const int32_t dev = device_index(param);
  check_float_tensor(op, "param", param, dev);
  check_flat(op, "param", param);
  const int64_t n = param.numel();
  check_float_tensor(op, "backup", backup, dev);
  check_flat(op, "backup", backup, n);
  check_same_dtype(op, "backup", backup, "param", param);
  check_float_tensor(op, "g0", g0, dev);
  check_flat(op, "g0", g0, n);
  check_same_dtype(op, "g0", g0, "param", param);
  MTLSAM_CHECK(n == 0 || param.const_data_ptr() != backup.const_data_ptr(),
               "mtlsam::mix_perturb_ (CUDA): param and backup must be different buffers");
  const int64_t num_segments = check_offsets_arg(op, offsets, dev);
  const auto acc = acc_scalar_type(param.scalar_type());
  const Tensor coef_acc = coef_as_acc(op, "coef (one value per segment)", coef, dev, acc,
                                      num_segments);
  const bool has_local = local.has_value() && local->defined();
  // The sampled part (valid when has_local): local row, table and local_coef in acc dtype.
  const Tensor* loc = nullptr;
  SampledArgs sa{};
  OptionalTensor lcoef;
  if (has_local) {
    loc = &*local;
    check_float_tensor(op, "local", *loc, dev);
    check_flat(op, "local", *loc);
    check_same_dtype(op, "local", *loc, "param", param);
    sa = check_sampled_args(op, "local_coef", local_coef, starts, lengths, local_starts, dev);
    lcoef = coef_as_acc(op, "local_coef (one value per sampled segment)", *local_coef, dev, acc,
                        sa.st->numel());
  }
  const DeviceGuard guard(dev);
  if (check_tables_enabled()) {
    check_offsets_content(op, offsets, n);
    if (has_local) check_sampled_content(op, *sa.st, *sa.ln, *sa.ls, n, loc->numel());
  }
  if (n == 0 || num_segments == 0) return;
  const cudaStream_t stream = current_stream(dev);
  const int64_t P = has_local ? sa.st->numel() : 0;
  OptionalTensor s_table, s_coef;
  if (P > 0) {
    s_table = empty_like_device(*sa.st, {4 * P}, ScalarType::Long);
    s_coef = empty_like_device(*sa.st, {P}, acc);
  }
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  MTLSAM_DISPATCH_FLOATING(param.scalar_type(), "mtlsam_mix_perturb_", [&] {
    using A = acc_t<scalar_t>;
    LocalPart<scalar_t> lp{};
    if (P > 0) {
      lp = sort_sampled<scalar_t>(*sa.st, *sa.ln, *sa.ls, *lcoef, 1,
                                  loc->const_data_ptr<scalar_t>(), loc->numel(), *s_table,
                                  *s_coef, stream);
    }
    scalar_t* pp = param.mutable_data_ptr<scalar_t>();
    scalar_t* bp = backup.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = g0.const_data_ptr<scalar_t>();
    const bool vec = aligned16(pp) && aligned16(bp) && aligned16(gp);
    mix_perturb_kernel<scalar_t><<<static_cast<unsigned int>(num_chunks), kBlock, 0, stream>>>(
        pp, bp, gp, coef_acc.const_data_ptr<A>(), offsets.const_data_ptr<int64_t>(),
        num_segments, n, lp, adaptive, save_backup, vec);
    MTLSAM_CUDA_LAUNCH_CHECK();
  });
}

void perturb_points_(Tensor& out, const Tensor& theta, const Tensor& directions,
                     const Tensor& coefs, const Tensor& offsets, const OptionalTensor& local,
                     const OptionalTensor& local_coefs, const OptionalTensor& starts,
                     const OptionalTensor& lengths, const OptionalTensor& local_starts,
                     bool adaptive) {
  const char* op = "perturb_points_";
  const int32_t dev = device_index(out);
  check_float_tensor(op, "out", out, dev);
  MTLSAM_CHECK(out.dim() == 2, "mtlsam::perturb_points_ (CUDA): out must be a 2-D [K, N] "
               "matrix (one row per point), got shape ", shape_str(out));
  const int64_t K = out.size(0);
  const int64_t n = out.size(1);
  check_float_tensor(op, "theta", theta, dev);
  check_flat(op, "theta", theta, n);
  check_same_dtype(op, "theta", theta, "out", out);
  check_float_tensor(op, "directions", directions, dev);
  MTLSAM_CHECK(directions.dim() == 2 && (directions.size(0) == 1 || directions.size(0) == K) &&
                   directions.size(1) == n,
               "mtlsam::perturb_points_ (CUDA): directions must be [1, ", n, "] (one direction "
               "for every point) or [", K, ", ", n, "] (one per point), got shape ",
               shape_str(directions));
  check_same_dtype(op, "directions", directions, "out", out);
  // Every row of out is written while theta, the directions and the local rows are read by
  // other blocks: an overlap would make the result depend on block scheduling.
  MTLSAM_CHECK(!overlaps(out, theta) && !overlaps(out, directions),
               "mtlsam::perturb_points_ (CUDA): out must not share memory with theta or "
               "directions");
  const int64_t num_segments = check_offsets_arg(op, offsets, dev);
  const auto acc = acc_scalar_type(out.scalar_type());
  const Tensor coefs_acc = coef_rows_as_acc(op, "coefs (one value per point and segment)",
                                            coefs, dev, acc, K, num_segments);
  const bool has_local = local.has_value() && local->defined();
  // The sampled part (valid when has_local): local rows [K, M], table, local_coefs [K, P] in the
  // acc dtype.
  const Tensor* loc = nullptr;
  SampledArgs sa{};
  OptionalTensor lcoefs;
  if (has_local) {
    loc = &*local;
    check_float_tensor(op, "local", *loc, dev);
    MTLSAM_CHECK(loc->dim() == 2 && loc->size(0) == K, "mtlsam::perturb_points_ (CUDA): local "
                 "must be a 2-D [", K, ", M] matrix (one local row per point), got shape ",
                 shape_str(*loc));
    check_same_dtype(op, "local", *loc, "out", out);
    MTLSAM_CHECK(!overlaps(out, *loc), "mtlsam::perturb_points_ (CUDA): out must not share "
                 "memory with local");
    sa = check_sampled_args(op, "local_coefs", local_coefs, starts, lengths, local_starts, dev);
    lcoefs = coef_rows_as_acc(op, "local_coefs (one value per point and sampled segment)",
                              *local_coefs, dev, acc, K, sa.st->numel());
  }
  const DeviceGuard guard(dev);
  if (check_tables_enabled()) {
    check_offsets_content(op, offsets, n);
    if (has_local) check_sampled_content(op, *sa.st, *sa.ln, *sa.ls, n, loc->size(1));
  }
  if (K == 0 || n == 0 || num_segments == 0) return;
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  // One block per (chunk, row); out alone holds K n elements, so this bound is never near.
  MTLSAM_CHECK(num_chunks <= INT32_MAX / K, "mtlsam::perturb_points_ (CUDA): ", K, " rows of ",
               n, " elements need more than 2^31 - 1 blocks");
  const cudaStream_t stream = current_stream(dev);
  const int64_t P = has_local ? sa.st->numel() : 0;
  OptionalTensor s_table, s_coefs;
  if (P > 0) {
    s_table = empty_like_device(*sa.st, {4 * P}, ScalarType::Long);
    s_coefs = empty_like_device(*sa.st, {K * P}, acc);
  }
  MTLSAM_DISPATCH_FLOATING(out.scalar_type(), "mtlsam_perturb_points_", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>();
    LocalPart<scalar_t> lp{};
    if (P > 0) {
      // One sort for all K rows: the shared table once, each row of local_coefs permuted by it.
      lp = sort_sampled<scalar_t>(*sa.st, *sa.ln, *sa.ls, *lcoefs, K,
                                  loc->const_data_ptr<scalar_t>(), loc->size(1), *s_table,
                                  *s_coefs, stream);
    }
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const scalar_t* tp = theta.const_data_ptr<scalar_t>();
    const scalar_t* dp = directions.const_data_ptr<scalar_t>();
    // 16-byte packs need every row start aligned, not only the base pointers: rows of out (and
    // of directions, same stride n) start at r n elements, so with K > 1 the row length must be
    // a multiple of the vector width. theta is one row, read at the same offsets by every row.
    const bool vec = aligned16(op_) && aligned16(tp) && aligned16(dp) && (K == 1 || n % V == 0);
    perturb_points_kernel<scalar_t>
        <<<static_cast<unsigned int>(num_chunks * K), kBlock, 0, stream>>>(
            op_, tp, dp, directions.size(0) == 1, coefs_acc.const_data_ptr<A>(),
            offsets.const_data_ptr<int64_t>(), num_segments, n, K, lp, adaptive, vec);
    MTLSAM_CUDA_LAUNCH_CHECK();
  });
}

void restore_(Tensor& param, const Tensor& backup) {
  const char* op = "restore_";
  const int32_t dev = device_index(param);
  check_float_tensor(op, "param", param, dev);
  check_float_tensor(op, "backup", backup, dev);
  check_flat(op, "param", param);
  check_flat(op, "backup", backup, param.numel());
  check_same_dtype(op, "backup", backup, "param", param);
  const DeviceGuard guard(dev);
  if (param.numel() == 0 || param.const_data_ptr() == backup.const_data_ptr()) return;
  // A byte copy: bit-exact by construction.
  MTLSAM_CUDA_CHECK(cudaMemcpyAsync(param.mutable_data_ptr(), backup.const_data_ptr(),
                                    nbytes(param), cudaMemcpyDeviceToDevice,
                                    current_stream(dev)));
}

}  // namespace mtlsam_cuda
