// gram: G = M M^T of a [K, N] matrix in the accumulation dtype, exactly symmetric (CUDA).
//
// One read of the matrix: the columns are cut into tiles of TC columns; a block loads a K x TC
// tile (all K rows) into shared memory, converted to the accumulation type, and accumulates all
// K (K + 1) / 2 pairs i <= j from it. Work items are (pair, lane) with L = max(1, 256 / pairs)
// lanes per pair; lane l of pair q accumulates columns l, l + L, ... of every tile of the block
// with fma, in order. At the end the L lanes of each pair are summed in lane order and the
// block's partial goes to ws[q][block]; a second kernel sums the blocks of each pair in block
// order and writes the value to both G[i, j] and G[j, i], so G is exactly symmetric.
// The tile width TC (about 24 KiB of shared memory), the tiles per block (at most ~1024 blocks)
// and hence the whole summation order are functions of (K, N, dtype) only.
#include "common.cuh"

namespace mtlsam_cuda {
namespace {

// Items (pair, lane) per thread: supports K (K + 1) / 2 <= kMaxItems * kBlock, i.e. K <= 67.
constexpr int kMaxItems = 9;
constexpr int64_t kMaxGramBlocks = 1024;
constexpr int64_t kTileBytes = 24 * 1024;

template <typename T>
__global__ void __launch_bounds__(kBlock)
    gram_blocks(const T* __restrict__ rows, int64_t K, int64_t n, int64_t tc,
                int64_t tiles_per_block, int64_t num_tiles, int pairs, int lanes,
                acc_t<T>* __restrict__ ws) {
  using A = acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  A* tile = reinterpret_cast<A*>(smem_raw);
  const int items = pairs * lanes;
  // Decode this thread's items: (i, j, lane).
  int it_i[kMaxItems], it_j[kMaxItems], it_l[kMaxItems];
  A acc[kMaxItems];
#pragma unroll
  for (int t = 0; t < kMaxItems; ++t) {
    acc[t] = A(0);
    it_i[t] = it_j[t] = it_l[t] = 0;
    const int w = static_cast<int>(threadIdx.x) + t * kBlock;
    if (w < items) {
      int q = w / lanes;
      it_l[t] = w % lanes;
      int i = 0;
      while (q >= static_cast<int>(K) - i) {  // row i holds pairs (i, i..K-1)
        q -= static_cast<int>(K) - i;
        ++i;
      }
      it_i[t] = i;
      it_j[t] = i + q;
    }
  }
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * tiles_per_block;
  const int64_t t1 = t0 + tiles_per_block < num_tiles ? t0 + tiles_per_block : num_tiles;
  for (int64_t tt = t0; tt < t1; ++tt) {
    const int64_t c0 = tt * tc;
    const int64_t valid = n - c0 < tc ? n - c0 : tc;
    __syncthreads();  // previous tile fully consumed
    for (int64_t idx = threadIdx.x; idx < K * tc; idx += kBlock) {
      const int64_t r = idx / tc;
      const int64_t col = idx % tc;
      tile[idx] = col < valid ? to_acc(rows[r * n + c0 + col]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kMaxItems; ++t) {
      const int w = static_cast<int>(threadIdx.x) + t * kBlock;
      if (w < items) {
        const A* ri = tile + it_i[t] * tc;
        const A* rj = tile + it_j[t] * tc;
        A a = acc[t];
        for (int64_t col = it_l[t]; col < valid; col += lanes) a = fma_(ri[col], rj[col], a);
        acc[t] = a;
      }
    }
  }
  // Sum the lanes of each pair in lane order.
  __syncthreads();
  A* red = tile;  // shared memory holds max(K * tc, pairs * lanes) values (see the host code)
#pragma unroll
  for (int t = 0; t < kMaxItems; ++t) {
    const int w = static_cast<int>(threadIdx.x) + t * kBlock;
    if (w < items) red[w] = acc[t];
  }
  __syncthreads();
  for (int q = threadIdx.x; q < pairs; q += kBlock) {
    A v = A(0);
    for (int l = 0; l < lanes; ++l) v += red[q * lanes + l];
    ws[static_cast<int64_t>(q) * gridDim.x + blockIdx.x] = v;
  }
}

template <typename A>
__global__ void __launch_bounds__(kBlock)
    gram_finish(const A* __restrict__ ws, int64_t num_blocks, int64_t K, int pairs,
                A* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (q0 >= pairs) return;
  A v = A(0);
  for (int64_t b = lane; b < num_blocks; b += 32) v += ws[q0 * num_blocks + b];
  v = warp_sum(v);
  if (lane == 0) {
    int64_t q = q0, i = 0;
    while (q >= K - i) {
      q -= K - i;
      ++i;
    }
    const int64_t j = i + q;
    out[i * K + j] = v;
    out[j * K + i] = v;
  }
}

}  // namespace

Tensor gram(const Tensor& rows) {
  const char* op = "gram";
  const int32_t dev = device_index(rows);
  check_float_tensor(op, "rows", rows, dev);
  MTLSAM_CHECK(rows.dim() == 2, "mtlsam::gram (CUDA): rows must be a 2-D [K, N] matrix, got "
               "shape ", shape_str(rows));
  const int64_t K = rows.size(0);
  const int64_t n = rows.size(1);
  const int64_t pairs64 = K * (K + 1) / 2;
  MTLSAM_CHECK(pairs64 <= static_cast<int64_t>(kMaxItems) * kBlock,
               "mtlsam::gram (CUDA): at most 67 rows are supported, got ", K);
  const DeviceGuard guard(dev);
  const auto acc = acc_scalar_type(rows.scalar_type());
  auto out = zeros_like_device(rows, {K, K}, acc);
  if (K == 0 || n == 0) return out;
  const int pairs = static_cast<int>(pairs64);
  const int lanes = pairs >= kBlock ? 1 : kBlock / pairs;
  const cudaStream_t stream = current_stream(dev);
  MTLSAM_DISPATCH_FLOATING(rows.scalar_type(), "mtlsam_gram", [&] {
    using A = acc_t<scalar_t>;
    const int64_t elem = static_cast<int64_t>(sizeof(A));
    // Tile width: a multiple of 32 columns, ~kTileBytes of shared memory, 32..1024 columns.
    int64_t tc = kTileBytes / (K * elem) / 32 * 32;
    tc = tc < 32 ? 32 : (tc > 1024 ? 1024 : tc);
    const int64_t num_tiles = (n + tc - 1) / tc;
    const int64_t tiles_per_block = (num_tiles + kMaxGramBlocks - 1) / kMaxGramBlocks;
    const int64_t num_blocks = (num_tiles + tiles_per_block - 1) / tiles_per_block;
    const int64_t red_items = static_cast<int64_t>(pairs) * lanes;
    const int64_t smem_elems = K * tc > red_items ? K * tc : red_items;
    const size_t smem = static_cast<size_t>(smem_elems * elem);
    if (smem > 48 * 1024) {
      MTLSAM_CUDA_CHECK(cudaFuncSetAttribute(gram_blocks<scalar_t>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
    }
    auto ws = empty_like_device(rows, {static_cast<int64_t>(pairs) * num_blocks}, acc);
    gram_blocks<scalar_t><<<static_cast<unsigned int>(num_blocks), kBlock, smem, stream>>>(
        rows.const_data_ptr<scalar_t>(), K, n, tc, tiles_per_block, num_tiles, pairs, lanes,
        ws.mutable_data_ptr<A>());
    MTLSAM_CUDA_LAUNCH_CHECK();
    gram_finish<A><<<static_cast<unsigned int>((pairs + kWarps - 1) / kWarps), kBlock, 0,
                     stream>>>(ws.const_data_ptr<A>(), num_blocks, K, pairs,
                               out.mutable_data_ptr<A>());
    MTLSAM_CUDA_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace mtlsam_cuda
