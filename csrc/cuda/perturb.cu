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
// overlapping): it is sorted by start on the device (stable torch sort, asynchronous) together
// with a running maximum of the ends, and an element's covering segments are found by a binary
// search followed by a walk back while the running maximum end still passes the element.
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

}  // namespace

void mix_perturb_(at::Tensor& param, at::Tensor& backup, const at::Tensor& g0,
                  const at::Tensor& coef, const at::Tensor& offsets,
                  const c10::optional<at::Tensor>& local,
                  const c10::optional<at::Tensor>& local_coef,
                  const c10::optional<at::Tensor>& starts,
                  const c10::optional<at::Tensor>& lengths,
                  const c10::optional<at::Tensor>& local_starts, bool adaptive,
                  bool save_backup) {
  const char* op = "mix_perturb_";
  const at::Device dev = param.device();
  check_float_tensor(op, "param", param, dev);
  check_flat(op, "param", param);
  const int64_t n = param.numel();
  check_float_tensor(op, "backup", backup, dev);
  check_flat(op, "backup", backup, n);
  check_same_dtype(op, "backup", backup, "param", param);
  check_float_tensor(op, "g0", g0, dev);
  check_flat(op, "g0", g0, n);
  check_same_dtype(op, "g0", g0, "param", param);
  TORCH_CHECK(n == 0 || param.data_ptr() != backup.data_ptr(),
              "mtlsam::mix_perturb_ (CUDA): param and backup must be different buffers");
  check_table(op, "offsets", offsets, dev);
  TORCH_CHECK(offsets.numel() >= 1, "mtlsam::mix_perturb_ (CUDA): offsets must hold S + 1 >= 1 "
              "entries");
  const int64_t num_segments = offsets.numel() - 1;
  const auto acc = acc_scalar_type(param.scalar_type());
  const at::Tensor coef_acc = coef_as_acc(op, "coef (one value per segment)", coef, dev, acc,
                                          num_segments);
  const bool has_local = local.has_value() && local->defined();
  at::Tensor loc, lcoef, st, ln, ls;
  if (has_local) {
    loc = *local;
    check_float_tensor(op, "local", loc, dev);
    check_flat(op, "local", loc);
    check_same_dtype(op, "local", loc, "param", param);
    TORCH_CHECK(local_coef.has_value() && local_coef->defined() && starts.has_value() &&
                    starts->defined() && lengths.has_value() && lengths->defined() &&
                    local_starts.has_value() && local_starts->defined(),
                "mtlsam::mix_perturb_ (CUDA): local needs local_coef, starts, lengths and "
                "local_starts");
    st = *starts;
    ln = *lengths;
    ls = *local_starts;
    check_table(op, "starts", st, dev);
    check_table(op, "lengths", ln, dev);
    check_table(op, "local_starts", ls, dev);
    TORCH_CHECK(st.numel() == ln.numel() && st.numel() == ls.numel(),
                "mtlsam::mix_perturb_ (CUDA): sampled starts, lengths and local_starts must have "
                "equal length, got ", st.numel(), ", ", ln.numel(), " and ", ls.numel());
    lcoef = coef_as_acc(op, "local_coef (one value per sampled segment)", *local_coef, dev, acc,
                        st.numel());
  }
  const c10::cuda::CUDAGuard guard(dev);
  if (check_tables_enabled()) {
    check_offsets_content(op, offsets, n);
    if (has_local) check_sampled_content(op, st, ln, ls, n, loc.numel());
  }
  if (n == 0 || num_segments == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Sort the sampled table by start (asynchronous torch ops on the current stream).
  at::Tensor s_start, s_len, s_lstart, s_coef, s_max_end;
  const int64_t P = has_local ? st.numel() : 0;
  if (P > 0) {
    auto sorted = at::sort(st, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    s_start = std::get<0>(sorted).contiguous();
    const auto perm = std::get<1>(sorted);
    s_len = ln.index_select(0, perm).clamp_min(0).contiguous();
    s_lstart = ls.index_select(0, perm).contiguous();
    s_coef = lcoef.index_select(0, perm).contiguous();
    s_max_end = std::get<0>(at::cummax(s_start + s_len, 0)).contiguous();
  }
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(),
                                  "mtlsam_mix_perturb_", [&] {
    using A = acc_t<scalar_t>;
    LocalPart<scalar_t> lp{};
    if (P > 0) {
      lp.local = loc.data_ptr<scalar_t>();
      lp.m = loc.numel();
      lp.coef = s_coef.data_ptr<A>();
      lp.start = s_start.data_ptr<int64_t>();
      lp.length = s_len.data_ptr<int64_t>();
      lp.lstart = s_lstart.data_ptr<int64_t>();
      lp.max_end = s_max_end.data_ptr<int64_t>();
      lp.num = P;
    }
    scalar_t* pp = param.data_ptr<scalar_t>();
    scalar_t* bp = backup.data_ptr<scalar_t>();
    const scalar_t* gp = g0.data_ptr<scalar_t>();
    const bool vec = aligned16(pp) && aligned16(bp) && aligned16(gp);
    mix_perturb_kernel<scalar_t><<<static_cast<unsigned int>(num_chunks), kBlock, 0, stream>>>(
        pp, bp, gp, coef_acc.data_ptr<A>(), offsets.data_ptr<int64_t>(), num_segments, n, lp,
        adaptive, save_backup, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void restore_(at::Tensor& param, const at::Tensor& backup) {
  const char* op = "restore_";
  const at::Device dev = param.device();
  check_float_tensor(op, "param", param, dev);
  check_float_tensor(op, "backup", backup, dev);
  check_flat(op, "param", param);
  check_flat(op, "backup", backup, param.numel());
  check_same_dtype(op, "backup", backup, "param", param);
  const c10::cuda::CUDAGuard guard(dev);
  if (param.numel() == 0 || param.data_ptr() == backup.data_ptr()) return;
  // A byte copy: bit-exact by construction.
  C10_CUDA_CHECK(cudaMemcpyAsync(param.data_ptr(), backup.data_ptr(), param.nbytes(),
                                 cudaMemcpyDeviceToDevice, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace mtlsam_cuda
