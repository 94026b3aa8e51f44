// Deterministic segmented reductions: segment_sumsq and gl_layer_stats (CUDA).
//
// Work decomposition of segment_sumsq -- a flat grid over fixed-size chunks of the buffer:
//   block c owns elements [c*kChunk, (c+1)*kChunk) of the flat buffer, whatever segments they
//   belong to. The buffer is already flat, so unlike apex multi_tensor_apply / torch foreach
//   (which pass per-tensor chunk lists as kernel arguments, capped in size and rebuilt on the
//   host every call) the grid size ceil(N / kChunk) is known on the host without reading the
//   segment table, which stays in device memory: thread 0 finds the segment holding the chunk's
//   first element by binary search over the offsets (O(log S) reads, cached), then the block
//   walks the segments of its chunk in order. A precomputed chunk table would need the table
//   contents on the host (a synchronisation) or an extra kernel per call; the search costs a few
//   cached loads per block.
//   Piece (c, s) = segment s inside chunk c is reduced and stored at ws[c + s]: that index is
//   unique (a later segment cannot reach into an earlier chunk), so the workspace has
//   ceil(N / kChunk) + S entries and needs no host-side piece count. The second kernel gives one
//   warp per segment, which sums the partials of chunks c0..c1 of its segment in a fixed order.
//   Pieces longer than kSmallPiece are reduced by the whole block, shorter ones by one warp
//   (round robin over the warps), so layouts with thousands of tiny segments do not cost a block
//   barrier per segment. Which path a piece takes depends on its length only.
//
// Summation order inside a piece: elements are grouped in vectors of V = 16 / sizeof(T)
// elements counted from the segment's first element; thread r of the participating threads
// takes groups r, r + nthr, ... and accumulates each group's elements in increasing order. A
// group is read with one 16-byte load when its address is aligned and it lies wholly inside the
// piece, else element by element -- the same arithmetic in the same order, so the bits never
// depend on buffer alignment. Everything depends only on (N, offsets, dtype), never on the GPU.
//
// gl_layer_stats reads sampled segments in any order (they need not be sorted nor disjoint),
// whose total length is not known on the host without a synchronisation. It therefore uses a
// 2-D decomposition: block (p, x) for sampled segment p and slot x < gx takes chunks
// x, x + gx, ... (kChunk elements each) of segment p, reading the chunk of g0 once and the same
// columns of all K local rows, and keeps 2K accumulators in registers; its block-reduced partials
// go to ws[which][k][p][x] and a second kernel sums the gx slots of each output in order. gx is a
// function of (N, M, P) only (about 4096 blocks in total at most), so results do not depend on
// the GPU either. K > 16 rows are processed in batches of 16 (g0 is then read once per batch).
#include "common.cuh"

#include <cstdlib>
#include <cstring>

namespace mtlsam_cuda {
namespace {

// Pieces up to this many elements are reduced by a single warp.
constexpr int64_t kSmallPiece = 1024;
// Upper bound on the number of blocks of gl_layer_stats' first stage (see gl_slots).
constexpr int64_t kStatsTargetBlocks = 4096;

template <typename T, bool kScale>
__device__ __forceinline__ acc_t<T> sumsq_piece(const T* __restrict__ x,
                                                const T* __restrict__ scale, int64_t org,
                                                int64_t a, int64_t b, int rank, int nthr,
                                                bool vec) {
  constexpr int V = vec_width<T>();
  using A = acc_t<T>;
  A acc = A(0);
  const int64_t g_end = (b - 1 - org) / V + 1;
  for (int64_t g = (a - org) / V + rank; g < g_end; g += nthr) {
    const int64_t e0 = org + g * V;
    if (vec && e0 >= a && e0 + V <= b) {
      const Pack<T, V> px = *reinterpret_cast<const Pack<T, V>*>(x + e0);
      if constexpr (kScale) {
        const Pack<T, V> ps = *reinterpret_cast<const Pack<T, V>*>(scale + e0);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A v = mul_rn(to_acc(px.v[j]), to_acc(ps.v[j]));
          acc = fma_(v, v, acc);
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A v = to_acc(px.v[j]);
          acc = fma_(v, v, acc);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t e = e0 + j;
        if (e >= a && e < b) {
          A v = to_acc(x[e]);
          if constexpr (kScale) v = mul_rn(v, to_acc(scale[e]));
          acc = fma_(v, v, acc);
        }
      }
    }
  }
  return acc;
}

template <typename T, bool kScale>
__global__ void __launch_bounds__(kBlock)
    segment_sumsq_chunks(const T* __restrict__ x, const T* __restrict__ scale,
                         const int64_t* __restrict__ off, int64_t num_segments, int64_t n,
                         acc_t<T>* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ A scratch[kWarps];
  __shared__ int64_t first_segment;
  const int64_t c = blockIdx.x;
  const int64_t lo = c * kChunk;
  const int64_t hi = lo + kChunk < n ? lo + kChunk : n;
  if (threadIdx.x == 0) first_segment = last_le(off, 0, num_segments - 1, lo);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int small = 0;
  for (int64_t s = first_segment; s < num_segments; ++s) {
    const int64_t seg_a = clamp64(off[s], 0, n);
    if (seg_a >= hi) break;
    const int64_t seg_b = clamp64(off[s + 1], seg_a, n);
    const int64_t a = seg_a > lo ? seg_a : lo;
    const int64_t b = seg_b < hi ? seg_b : hi;
    if (b <= a) continue;
    const bool vec = aligned16(x + seg_a) && (!kScale || aligned16(scale + seg_a));
    if (b - a > kSmallPiece) {
      A v = sumsq_piece<T, kScale>(x, scale, seg_a, a, b, threadIdx.x, kBlock, vec);
      v = block_sum(v, scratch);
      if (threadIdx.x == 0) ws[c + s] = v;
    } else {
      if (small % kWarps == warp) {
        A v = sumsq_piece<T, kScale>(x, scale, seg_a, a, b, lane, 32, vec);
        v = warp_sum(v);
        if (lane == 0) ws[c + s] = v;
      }
      ++small;
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kBlock)
    segment_sumsq_finish(const A* __restrict__ ws, const int64_t* __restrict__ off,
                         int64_t num_segments, int64_t n, A* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (s >= num_segments) return;
  const int64_t a = clamp64(off[s], 0, n);
  const int64_t b = clamp64(off[s + 1], a, n);
  A v = A(0);
  if (b > a) {
    const int64_t c1 = (b - 1) / kChunk;
    for (int64_t c = a / kChunk + lane; c <= c1; c += 32) v += ws[c + s];
  }
  v = warp_sum(v);
  if (lane == 0) out[s] = v;
}

// ---- gl_layer_stats ----
template <typename T, int KMAX>
__global__ void __launch_bounds__(kBlock)
    gl_stats_blocks(const T* __restrict__ g0, const T* __restrict__ local,
                    const T* __restrict__ scale, const int64_t* __restrict__ starts,
                    const int64_t* __restrict__ lengths, const int64_t* __restrict__ lstarts,
                    int64_t num_sampled, int64_t n, int64_t m, int64_t K, int64_t k0, int kb,
                    int64_t gx, acc_t<T>* __restrict__ ws) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  __shared__ A scratch[kWarps];
  const int64_t p = blockIdx.x / gx;
  const int64_t x = blockIdx.x % gx;
  // Clamp the table entries to the buffers (memory safety with malformed device tables).
  const int64_t s0 = clamp64(starts[p], 0, n);
  const int64_t l0 = clamp64(lstarts[p], 0, m);
  int64_t len = clamp64(lengths[p], 0, n - s0);
  len = len < m - l0 ? len : m - l0;
  const bool has_scale = scale != nullptr;
  const bool vec_g = aligned16(g0 + s0) && (!has_scale || aligned16(scale + s0));

  A dot[KMAX], sq[KMAX];
#pragma unroll
  for (int k = 0; k < KMAX; ++k) dot[k] = sq[k] = A(0);

  const int64_t num_chunks = (len + kChunk - 1) / kChunk;
  for (int64_t cc = x; cc < num_chunks; cc += gx) {
    const int64_t a = cc * kChunk;
    const int64_t b = a + kChunk < len ? a + kChunk : len;
    for (int64_t e0 = a + static_cast<int64_t>(threadIdx.x) * V; e0 < b;
         e0 += static_cast<int64_t>(kBlock) * V) {
      const int cnt = b - e0 >= V ? V : static_cast<int>(b - e0);
      A gv[V], tv[V];
      if (vec_g && cnt == V) {
        const Pack<T, V> pg = *reinterpret_cast<const Pack<T, V>*>(g0 + s0 + e0);
#pragma unroll
        for (int j = 0; j < V; ++j) gv[j] = to_acc(pg.v[j]);
        if (has_scale) {
          const Pack<T, V> ps = *reinterpret_cast<const Pack<T, V>*>(scale + s0 + e0);
#pragma unroll
          for (int j = 0; j < V; ++j) tv[j] = to_acc(ps.v[j]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          gv[j] = j < cnt ? to_acc(g0[s0 + e0 + j]) : A(0);
          tv[j] = (has_scale && j < cnt) ? to_acc(scale[s0 + e0 + j]) : A(1);
        }
      }
      if (has_scale) {
#pragma unroll
        for (int j = 0; j < V; ++j) gv[j] = mul_rn(gv[j], tv[j]);
      }
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        if (k < kb) {
          const T* row = local + (k0 + k) * m + l0 + e0;
          A lv[V];
          if (cnt == V && aligned16(row)) {
            const Pack<T, V> pl = *reinterpret_cast<const Pack<T, V>*>(row);
#pragma unroll
            for (int j = 0; j < V; ++j) lv[j] = to_acc(pl.v[j]);
          } else {
#pragma unroll
            for (int j = 0; j < V; ++j) lv[j] = j < cnt ? to_acc(row[j]) : A(0);
          }
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (j < cnt) {
              const A l = has_scale ? mul_rn(lv[j], tv[j]) : lv[j];
              dot[k] = fma_(l, gv[j], dot[k]);
              sq[k] = fma_(l, l, sq[k]);
            }
          }
        }
      }
    }
  }
  // ws layout: [2][K][P][gx]
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    if (k < kb) {
      const A d = block_sum(dot[k], scratch);
      const A q = block_sum(sq[k], scratch);
      if (threadIdx.x == 0) {
        ws[((k0 + k) * num_sampled + p) * gx + x] = d;
        ws[((K + k0 + k) * num_sampled + p) * gx + x] = q;
      }
    }
  }
}

// out_o = sum_{x < cnt} ws[o * cnt + x] for o < num_out, one warp per output, fixed order.
template <typename A>
__global__ void __launch_bounds__(kBlock)
    sum_slots(const A* __restrict__ ws, int64_t cnt, int64_t num_out, A* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (o >= num_out) return;
  A v = A(0);
  for (int64_t x = lane; x < cnt; x += 32) v += ws[o * cnt + x];
  v = warp_sum(v);
  if (lane == 0) out[o] = v;
}

inline unsigned int warp_per_item_blocks(int64_t items) {
  return static_cast<unsigned int>((items + kWarps - 1) / kWarps);
}

// ---- device-table content checks (opt-in, see common.cuh) ----
constexpr int kBadStart = 1, kBadEnd = 2, kDecreasing = 4, kNegative = 8, kPastFlat = 16,
              kPastLocal = 32;

__global__ void check_offsets_kernel(const int64_t* off, int64_t num, int64_t n, int* flags) {
  int f = 0;
  if (threadIdx.x == 0) {
    if (off[0] != 0) f |= kBadStart;
    if (off[num - 1] != n) f |= kBadEnd;
  }
  for (int64_t i = 1 + threadIdx.x; i < num; i += blockDim.x)
    if (off[i] < off[i - 1]) f |= kDecreasing;
  if (f) atomicOr(flags, f);
}

__global__ void check_sampled_kernel(const int64_t* st, const int64_t* ln, const int64_t* ls,
                                     int64_t num, int64_t n, int64_t m, int* flags) {
  int f = 0;
  for (int64_t i = threadIdx.x; i < num; i += blockDim.x) {
    if (st[i] < 0 || ln[i] < 0 || ls[i] < 0) {
      f |= kNegative;
    } else {
      if (st[i] > n || ln[i] > n - st[i]) f |= kPastFlat;
      if (ls[i] > m || ln[i] > m - ls[i]) f |= kPastLocal;
    }
  }
  if (f) atomicOr(flags, f);
}

}  // namespace

bool check_tables_enabled() {
  const char* v = std::getenv("MTLSAM_CUDA_CHECK_TABLES");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

namespace {
// The flags word is read back with a copy on the op's stream and a synchronisation of that
// stream (what Tensor.item() does), in both builds.
int read_flags(const Tensor& flags, cudaStream_t stream) {
  int f = 0;
  MTLSAM_CUDA_CHECK(cudaMemcpyAsync(&f, flags.const_data_ptr<int>(), sizeof(int),
                                    cudaMemcpyDeviceToHost, stream));
  MTLSAM_CUDA_CHECK(cudaStreamSynchronize(stream));
  return f;
}
}  // namespace

void check_offsets_content(const char* op, const Tensor& offsets, int64_t n) {
  auto flags = zeros_like_device(offsets, {1}, ScalarType::Int);
  const cudaStream_t stream = current_stream(device_index(offsets));
  check_offsets_kernel<<<1, kBlock, 0, stream>>>(offsets.const_data_ptr<int64_t>(),
                                                 offsets.numel(), n,
                                                 flags.mutable_data_ptr<int>());
  MTLSAM_CUDA_LAUNCH_CHECK();
  const int f = read_flags(flags, stream);
  MTLSAM_CHECK(!(f & kBadStart), "mtlsam::", op, " (CUDA): offsets must start at 0");
  MTLSAM_CHECK(!(f & kBadEnd), "mtlsam::", op, " (CUDA): offsets must end at ", n);
  MTLSAM_CHECK(!(f & kDecreasing), "mtlsam::", op, " (CUDA): offsets must be non-decreasing");
}

void check_sampled_content(const char* op, const Tensor& starts, const Tensor& lengths,
                           const Tensor& local_starts, int64_t n, int64_t m) {
  if (starts.numel() == 0) return;
  auto flags = zeros_like_device(starts, {1}, ScalarType::Int);
  const cudaStream_t stream = current_stream(device_index(starts));
  check_sampled_kernel<<<1, kBlock, 0, stream>>>(
      starts.const_data_ptr<int64_t>(), lengths.const_data_ptr<int64_t>(),
      local_starts.const_data_ptr<int64_t>(), starts.numel(), n, m,
      flags.mutable_data_ptr<int>());
  MTLSAM_CUDA_LAUNCH_CHECK();
  const int f = read_flags(flags, stream);
  MTLSAM_CHECK(!(f & kNegative), "mtlsam::", op,
               " (CUDA): sampled segment table has negative entries");
  MTLSAM_CHECK(!(f & kPastFlat), "mtlsam::", op,
               " (CUDA): a sampled segment runs past the flat buffer (", n, " elements)");
  MTLSAM_CHECK(!(f & kPastLocal), "mtlsam::", op,
               " (CUDA): a sampled segment runs past the local-gradient buffer (", m,
               " columns)");
}

Tensor segment_sumsq(const Tensor& x, const Tensor& offsets, const OptionalTensor& scale) {
  const char* op = "segment_sumsq";
  const int32_t dev = device_index(x);
  check_float_tensor(op, "x", x, dev);
  check_flat(op, "x", x);
  check_table(op, "offsets", offsets, dev);
  MTLSAM_CHECK(offsets.numel() >= 1, "mtlsam::segment_sumsq (CUDA): offsets must hold S + 1 >= 1 "
               "entries");
  const bool has_scale = scale.has_value() && scale->defined();
  if (has_scale) {
    check_float_tensor(op, "scale", *scale, dev);
    check_flat(op, "scale", *scale, x.numel());
    check_same_dtype(op, "scale", *scale, "x", x);
  }
  const DeviceGuard guard(dev);
  const int64_t n = x.numel();
  const int64_t num_segments = offsets.numel() - 1;
  if (check_tables_enabled()) check_offsets_content(op, offsets, n);
  const ScalarType acc = acc_scalar_type(x.scalar_type());
  auto out = zeros_like_device(x, {num_segments}, acc);
  if (n == 0 || num_segments == 0) return out;
  const cudaStream_t stream = current_stream(dev);
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  MTLSAM_DISPATCH_FLOATING(x.scalar_type(), "mtlsam_segment_sumsq", [&] {
    using A = acc_t<scalar_t>;
    auto ws = zeros_like_device(x, {num_chunks + num_segments}, acc);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* op_off = offsets.const_data_ptr<int64_t>();
    if (has_scale) {
      segment_sumsq_chunks<scalar_t, true><<<static_cast<unsigned int>(num_chunks), kBlock, 0,
                                             stream>>>(xp, scale->const_data_ptr<scalar_t>(),
                                                       op_off, num_segments, n,
                                                       ws.mutable_data_ptr<A>());
    } else {
      segment_sumsq_chunks<scalar_t, false><<<static_cast<unsigned int>(num_chunks), kBlock, 0,
                                              stream>>>(xp, nullptr, op_off, num_segments, n,
                                                        ws.mutable_data_ptr<A>());
    }
    MTLSAM_CUDA_LAUNCH_CHECK();
    segment_sumsq_finish<A><<<warp_per_item_blocks(num_segments), kBlock, 0, stream>>>(
        ws.const_data_ptr<A>(), op_off, num_segments, n, out.mutable_data_ptr<A>());
    MTLSAM_CUDA_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> gl_layer_stats(const Tensor& g0, const Tensor& local,
                                          const Tensor& starts, const Tensor& lengths,
                                          const Tensor& local_starts,
                                          const OptionalTensor& scale) {
  const char* op = "gl_layer_stats";
  const int32_t dev = device_index(g0);
  check_float_tensor(op, "g0", g0, dev);
  check_flat(op, "g0", g0);
  check_float_tensor(op, "local", local, dev);
  MTLSAM_CHECK(local.dim() == 2, "mtlsam::gl_layer_stats (CUDA): local must be a 2-D [K, M] "
               "matrix, got shape ", shape_str(local));
  check_same_dtype(op, "local", local, "g0", g0);
  check_table(op, "starts", starts, dev);
  check_table(op, "lengths", lengths, dev);
  check_table(op, "local_starts", local_starts, dev);
  MTLSAM_CHECK(starts.numel() == lengths.numel() && starts.numel() == local_starts.numel(),
               "mtlsam::gl_layer_stats (CUDA): sampled starts, lengths and local_starts must "
               "have equal length, got ", starts.numel(), ", ", lengths.numel(), " and ",
               local_starts.numel());
  const bool has_scale = scale.has_value() && scale->defined();
  if (has_scale) {
    check_float_tensor(op, "scale", *scale, dev);
    check_flat(op, "scale", *scale, g0.numel());
    check_same_dtype(op, "scale", *scale, "g0", g0);
  }
  const DeviceGuard guard(dev);
  const int64_t n = g0.numel();
  const int64_t K = local.size(0);
  const int64_t m = local.size(1);
  const int64_t P = starts.numel();
  if (check_tables_enabled()) check_sampled_content(op, starts, lengths, local_starts, n, m);
  const auto acc = acc_scalar_type(g0.scalar_type());
  auto dots = zeros_like_device(g0, {K, P}, acc);
  auto sq = zeros_like_device(g0, {K, P}, acc);
  if (K == 0 || P == 0 || n == 0 || m == 0) return {dots, sq};
  // Slots per sampled segment: enough to cover the longest possible segment, while keeping the
  // first stage at about kStatsTargetBlocks blocks. A function of (n, m, P) only.
  const int64_t max_len = n < m ? n : m;
  int64_t gx = (max_len + kChunk - 1) / kChunk;
  const int64_t cap = kStatsTargetBlocks / P > 1 ? kStatsTargetBlocks / P : 1;
  gx = gx < cap ? gx : cap;
  gx = gx < 1 ? 1 : gx;
  const cudaStream_t stream = current_stream(dev);
  MTLSAM_DISPATCH_FLOATING(g0.scalar_type(), "mtlsam_gl_layer_stats", [&] {
    using A = acc_t<scalar_t>;
    auto ws = zeros_like_device(g0, {2 * K * P * gx}, acc);
    A* wp = ws.mutable_data_ptr<A>();
    const scalar_t* sp = has_scale ? scale->const_data_ptr<scalar_t>() : nullptr;
    const unsigned int blocks = static_cast<unsigned int>(P * gx);
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int kb = static_cast<int>(K - k0 < 16 ? K - k0 : 16);
      if (kb <= 4) {
        gl_stats_blocks<scalar_t, 4><<<blocks, kBlock, 0, stream>>>(
            g0.const_data_ptr<scalar_t>(), local.const_data_ptr<scalar_t>(), sp,
            starts.const_data_ptr<int64_t>(), lengths.const_data_ptr<int64_t>(),
            local_starts.const_data_ptr<int64_t>(), P, n, m, K, k0, kb, gx, wp);
      } else {
        gl_stats_blocks<scalar_t, 16><<<blocks, kBlock, 0, stream>>>(
            g0.const_data_ptr<scalar_t>(), local.const_data_ptr<scalar_t>(), sp,
            starts.const_data_ptr<int64_t>(), lengths.const_data_ptr<int64_t>(),
            local_starts.const_data_ptr<int64_t>(), P, n, m, K, k0, kb, gx, wp);
      }
      MTLSAM_CUDA_LAUNCH_CHECK();
    }
    // ws is [2][K][P][gx]: outputs 0..KP-1 (the dots) and KP..2KP-1 (the squares) are summed
    // straight into dots and sq ([K, P] contiguous, the same order) by one launch each. Each
    // output is one warp's fixed-order sum of its own gx slots, so this gives the same bits as
    // one launch over all 2KP outputs followed by copies.
    const int64_t kp = K * P;
    sum_slots<A><<<warp_per_item_blocks(kp), kBlock, 0, stream>>>(wp, gx, kp,
                                                                 dots.mutable_data_ptr<A>());
    MTLSAM_CUDA_LAUNCH_CHECK();
    sum_slots<A><<<warp_per_item_blocks(kp), kBlock, 0, stream>>>(wp + kp * gx, gx, kp,
                                                                 sq.mutable_data_ptr<A>());
    MTLSAM_CUDA_LAUNCH_CHECK();
  });
  return {dots, sq};
}

}  // namespace mtlsam_cuda
