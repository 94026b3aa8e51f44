// mix_perturb_ and restore_ (CUDA).
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
// The sampled table may be in any order (and, although the flat layout never produces it,
// overlapping): it is sorted by start on the device (a stable sort, asynchronous, see
// sort_sampled_kernel) together with a running maximum of the ends, and an element's covering
// segments are found by a binary search followed by a walk back while the running maximum end
// still passes the element.
// Element-wise work has no summation order to fix, so vectorisation (16-byte loads and stores
// when param, backup and g0 are all 16-byte aligned) cannot change any bits.
#include "common.cuh"

namespace mtlsam_cuda {
namespace {

template <typename T>
struct LocalPart {
  const T* local;            // 1-D local row, or nullptr
  int64_t m;                 // its length
  const acc_t<T>* coef;      // local_coef, sorted by start
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

template <typename T>
__global__ void __launch_bounds__(kBlock)
    mix_perturb_kernel(T* __restrict__ param, T* __restrict__ backup, const T* __restrict__ g0,
                       const acc_t<T>* __restrict__ coef, const int64_t* __restrict__ off,
                       int64_t num_segments, int64_t n, LocalPart<T> lp, bool adaptive,
                       bool save_backup, bool vec) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  __shared__ int64_t seg_range[2];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t hi = lo + kChunk < n ? lo + kChunk : n;
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
      Pack<T, V> pb = *reinterpret_cast<const Pack<T, V>*>(save_backup ? param + e0
                                                                          : backup + e0);
      const Pack<T, V> pg = *reinterpret_cast<const Pack<T, V>*>(g0 + e0);
      if (save_backup) *reinterpret_cast<Pack<T, V>*>(backup + e0) = pb;
      Pack<T, V> po;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t i = e0 + j;
        while (s < s_hi && off[s + 1] <= i) ++s;
        po.v[j] = from_acc<T>(perturb_one<T>(to_acc(pb.v[j]), to_acc(pg.v[j]), coef[s], lp, i,
                                             adaptive));
      }
      *reinterpret_cast<Pack<T, V>*>(param + e0) = po;
    } else {
      for (int j = 0; j < V && e0 + j < hi; ++j) {
        const int64_t i = e0 + j;
        while (s < s_hi && off[s + 1] <= i) ++s;
        const T b = save_backup ? param[i] : backup[i];
        if (save_backup) backup[i] = b;
        param[i] = from_acc<T>(perturb_one<T>(to_acc(b), to_acc(g0[i]), coef[s], lp, i,
                                              adaptive));
      }
    }
  }
}

// Stable sort of the sampled table by start, in one block, with a running maximum of the ends:
//   out position of entry i = #{j : start[j] < start[i] or (start[j] == start[i] and j < i)},
// a permutation (the (start, index) pairs are distinct), i.e. exactly the order of a stable
// ascending sort of the starts; length, local_start and coef move with their start, lengths are
// clamped at 0 as they are stored, and max_end[r] = max_{q <= r} (start_q + length_q) is then
// the inclusive running maximum over the sorted, clamped entries (thread 0, in order).
// Why a kernel of its own: the stable ABI has no sort / cummax wrapper, and P (the number of
// sampled layers, tens to hundreds) is small, so the O(P^2 / kBlock) rank count in one block is
// a few microseconds; both builds use it, so they sort identically and stay asynchronous.
template <typename A>
__global__ void __launch_bounds__(kBlock)
    sort_sampled_kernel(const int64_t* __restrict__ start, const int64_t* __restrict__ length,
                        const int64_t* __restrict__ lstart, const A* __restrict__ coef, int64_t P,
                        int64_t* __restrict__ s_start, int64_t* __restrict__ s_len,
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
    s_coef[r] = coef[i];
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
  check_table(op, "offsets", offsets, dev);
  MTLSAM_CHECK(offsets.numel() >= 1, "mtlsam::mix_perturb_ (CUDA): offsets must hold S + 1 >= 1 "
               "entries");
  const int64_t num_segments = offsets.numel() - 1;
  const auto acc = acc_scalar_type(param.scalar_type());
  const Tensor coef_acc = coef_as_acc(op, "coef (one value per segment)", coef, dev, acc,
                                      num_segments);
  const bool has_local = local.has_value() && local->defined();
  // The sampled part (valid when has_local): local row, table and local_coef in acc dtype.
  const Tensor* loc = nullptr;
  const Tensor* st = nullptr;
  const Tensor* ln = nullptr;
  const Tensor* ls = nullptr;
  OptionalTensor lcoef;
  if (has_local) {
    loc = &*local;
    check_float_tensor(op, "local", *loc, dev);
    check_flat(op, "local", *loc);
    check_same_dtype(op, "local", *loc, "param", param);
    MTLSAM_CHECK(local_coef.has_value() && local_coef->defined() && starts.has_value() &&
                     starts->defined() && lengths.has_value() && lengths->defined() &&
                     local_starts.has_value() && local_starts->defined(),
                 "mtlsam::mix_perturb_ (CUDA): local needs local_coef, starts, lengths and "
                 "local_starts");
    st = &*starts;
    ln = &*lengths;
    ls = &*local_starts;
    check_table(op, "starts", *st, dev);
    check_table(op, "lengths", *ln, dev);
    check_table(op, "local_starts", *ls, dev);
    MTLSAM_CHECK(st->numel() == ln->numel() && st->numel() == ls->numel(),
                 "mtlsam::mix_perturb_ (CUDA): sampled starts, lengths and local_starts must "
                 "have equal length, got ", st->numel(), ", ", ln->numel(), " and ", ls->numel());
    lcoef = coef_as_acc(op, "local_coef (one value per sampled segment)", *local_coef, dev, acc,
                        st->numel());
  }
  const DeviceGuard guard(dev);
  if (check_tables_enabled()) {
    check_offsets_content(op, offsets, n);
    if (has_local) check_sampled_content(op, *st, *ln, *ls, n, loc->numel());
  }
  if (n == 0 || num_segments == 0) return;
  const cudaStream_t stream = current_stream(dev);
  const int64_t P = has_local ? st->numel() : 0;
  // Sorted sampled table (see sort_sampled_kernel): int64 [start | length | local_start |
  // max_end], P entries each, and local_coef in the acc dtype; on the device, asynchronous.
  OptionalTensor s_table, s_coef;
  if (P > 0) {
    s_table = empty_like_device(*st, {4 * P}, ScalarType::Long);
    s_coef = empty_like_device(*st, {P}, acc);
  }
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  MTLSAM_DISPATCH_FLOATING(param.scalar_type(), "mtlsam_mix_perturb_", [&] {
    using A = acc_t<scalar_t>;
    LocalPart<scalar_t> lp{};
    if (P > 0) {
      int64_t* tp = s_table->mutable_data_ptr<int64_t>();
      A* cp = s_coef->mutable_data_ptr<A>();
      sort_sampled_kernel<A><<<1, kBlock, 0, stream>>>(
          st->const_data_ptr<int64_t>(), ln->const_data_ptr<int64_t>(),
          ls->const_data_ptr<int64_t>(), lcoef->const_data_ptr<A>(), P, tp, tp + P, tp + 2 * P,
          cp, tp + 3 * P);
      MTLSAM_CUDA_LAUNCH_CHECK();
      lp.local = loc->const_data_ptr<scalar_t>();
      lp.m = loc->numel();
      lp.coef = cp;
      lp.start = tp;
      lp.length = tp + P;
      lp.lstart = tp + 2 * P;
      lp.max_end = tp + 3 * P;
      lp.num = P;
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
