// gram: G = M M^T of a [K, N] matrix in the accumulation dtype, exactly symmetric (CUDA).
//
// The rows are cut into blocks of RB rows (RB = 4, or 8 for fp32/fp16/bf16 with K > 4) and the
// columns into chunks of `chunk` columns. One CUDA block computes one (row-block pair, chunk):
// each of its 256 threads walks the chunk's columns with a stride of 256 (coalesced loads, two
// columns in flight per iteration), keeps the RB x RB products of its columns in registers
// (fma, in column order) and the block then reduces them (warp butterflies, then the 8 warps in
// order) into one partial per (pair, chunk) in a workspace; a second kernel sums a pair's
// partials in chunk order and writes G[i, j] and G[j, i] (exactly symmetric).
//
// Why this shape: the first kernel (a shared-memory tile of all K rows, one (pair, lane) item
// per thread) ran at 0.13 of a device-to-device copy on an H200 (471 GB/s, K = 4, ResNet-18's
// 11.2 M columns): two barriers per tile and one 4-byte shared load per multiply-add left too
// few bytes in flight. Here every thread issues 2 RB independent global loads per iteration and
// does RB^2 multiply-adds per column from registers. The blocks of one chunk are consecutive
// in the grid (row-block pair fastest), so the rows a chunk needs are read from memory once
// and from L2 by the other pairs of the same chunk.
//
// Determinism: the chunk width is a function of N only, the assignment of columns to threads
// and every reduction order are fixed, and no atomics are used: the result is a function of
// (K, N, dtype) and the data, never of the GPU or the launch.
#include "common.cuh"

namespace mtlsam_cuda {
namespace {

// Chunks: at most kMaxGramChunks, each at least kMinGramChunk columns (a multiple of the 512
// columns one iteration of a block covers), so a 11.2 M-column matrix gets 1024 chunks of
// ~11 k columns (44 per thread) and the per-block reduction stays a small part of the work.
constexpr int64_t kMaxGramChunks = 1024;
constexpr int64_t kMinGramChunk = 4096;
constexpr int kColsPerIter = 2 * kBlock;

// Row-block pairs (bi, bj), bi <= bj, in row-major order of the upper triangle.
__device__ __forceinline__ void block_pair(int p, int nb, int* bi, int* bj) {
  int i = 0;
  while (p >= nb - i) {
    p -= nb - i;
    ++i;
  }
  *bi = i;
  *bj = i + p;
}

// Index of pair (i, j), i <= j, in row-major order of the upper triangle of a K x K matrix.
__device__ __forceinline__ int64_t pair_index(int64_t i, int64_t j, int64_t K) {
  return i * K - i * (i - 1) / 2 + (j - i);
}

// Two blocks per SM at least: caps the RB = 8 kernels at 128 registers (126-138 uncapped with
// nvcc 13.0 for sm_90, no spills either way), so 16 warps per SM hide the loads' latency.
template <typename T, int RB>
__global__ void __launch_bounds__(kBlock, 2)
    gram_pairs(const T* __restrict__ rows, int64_t K, int64_t n, int64_t chunk,
               int64_t num_chunks, int num_block_pairs, acc_t<T>* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ A red[kWarps][RB * RB];
  const int nb = static_cast<int>((K + RB - 1) / RB);
  const int p = static_cast<int>(blockIdx.x % num_block_pairs);
  const int64_t c = static_cast<int64_t>(blockIdx.x / num_block_pairs);
  int bi, bj;
  block_pair(p, nb, &bi, &bj);
  const int64_t r0 = static_cast<int64_t>(bi) * RB;
  const int64_t s0 = static_cast<int64_t>(bj) * RB;
  const bool diag = bi == bj;
  // Rows past K read row K - 1 (in bounds, results discarded), so the loops need no branches.
  const T* pi[RB];
  const T* pj[RB];
#pragma unroll
  for (int a = 0; a < RB; ++a) {
    pi[a] = rows + (r0 + a < K ? r0 + a : K - 1) * n;
    pj[a] = rows + (s0 + a < K ? s0 + a : K - 1) * n;
  }
  A acc[RB][RB];
#pragma unroll
  for (int a = 0; a < RB; ++a)
#pragma unroll
    for (int b = 0; b < RB; ++b) acc[a][b] = A(0);

  const int64_t c0 = c * chunk;
  const int64_t c1 = c0 + chunk < n ? c0 + chunk : n;
  for (int64_t col = c0 + threadIdx.x; col < c1; col += kColsPerIter) {
    const int64_t col2 = col + kBlock;
    const bool two = col2 < c1;
    A xi[RB], yi[RB], xj[RB], yj[RB];
#pragma unroll
    for (int a = 0; a < RB; ++a) {
      xi[a] = to_acc(pi[a][col]);
      yi[a] = two ? to_acc(pi[a][col2]) : A(0);
      if (!diag) {
        xj[a] = to_acc(pj[a][col]);
        yj[a] = two ? to_acc(pj[a][col2]) : A(0);
      } else {
        xj[a] = xi[a];
        yj[a] = yi[a];
      }
    }
#pragma unroll
    for (int a = 0; a < RB; ++a)
#pragma unroll
      for (int b = 0; b < RB; ++b) acc[a][b] = fma_(xi[a], xj[b], acc[a][b]);
#pragma unroll
    for (int a = 0; a < RB; ++a)
#pragma unroll
      for (int b = 0; b < RB; ++b) acc[a][b] = fma_(yi[a], yj[b], acc[a][b]);
  }

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int a = 0; a < RB; ++a)
#pragma unroll
    for (int b = 0; b < RB; ++b) {
      const A v = warp_sum(acc[a][b]);
      if (lane == 0) red[warp][a * RB + b] = v;
    }
  __syncthreads();
  for (int e = threadIdx.x; e < RB * RB; e += kBlock) {
    const int a = e / RB;
    const int b = e % RB;
    const int64_t i = r0 + a;
    const int64_t j = s0 + b;
    if (i >= K || j >= K || (diag && b < a)) continue;
    A v = A(0);
    for (int w = 0; w < kWarps; ++w) v += red[w][e];
    ws[pair_index(i, j, K) * num_chunks + c] = v;
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
  // The pair index of the workspace and of gram_finish is an int.
  MTLSAM_CHECK(K <= 8192, "mtlsam::gram (CUDA): at most 8192 rows are supported, got ", K);
  const DeviceGuard guard(dev);
  const auto acc = acc_scalar_type(rows.scalar_type());
  auto out = empty_like_device(rows, {K, K}, acc);
  if (K == 0) return out;
  if (n == 0) return zeros_like_device(rows, {K, K}, acc);
  const int pairs = static_cast<int>(K * (K + 1) / 2);
  int64_t chunk = (n + kMaxGramChunks - 1) / kMaxGramChunks;
  chunk = chunk < kMinGramChunk ? kMinGramChunk : chunk;
  chunk = (chunk + kColsPerIter - 1) / kColsPerIter * kColsPerIter;
  const int64_t num_chunks = (n + chunk - 1) / chunk;
  const cudaStream_t stream = current_stream(dev);
  MTLSAM_DISPATCH_FLOATING(rows.scalar_type(), "mtlsam_gram", [&] {
    using A = acc_t<scalar_t>;
    auto ws = empty_like_device(rows, {static_cast<int64_t>(pairs) * num_chunks}, acc);
    // RB = 8 halves the re-reads of the rows for K > 4 at 64 accumulators per thread; with
    // double accumulators that would be 128 registers, so fp64 keeps RB = 4.
    auto launch = [&](auto rb_tag) {
      constexpr int RB = decltype(rb_tag)::value;
      const int64_t nb = (K + RB - 1) / RB;
      const int block_pairs = static_cast<int>(nb * (nb + 1) / 2);
      const int64_t grid = static_cast<int64_t>(block_pairs) * num_chunks;
      MTLSAM_CHECK(grid < (int64_t{1} << 31), "mtlsam::gram (CUDA): too many rows for one "
                   "launch (", K, " rows x ", num_chunks, " column chunks)");
      gram_pairs<scalar_t, RB><<<static_cast<unsigned int>(grid), kBlock, 0, stream>>>(
          rows.const_data_ptr<scalar_t>(), K, n, chunk, num_chunks, block_pairs,
          ws.mutable_data_ptr<A>());
    };
    constexpr int kWideRB = sizeof(A) == 4 ? 8 : 4;
    if (K > 4) {
      launch(std::integral_constant<int, kWideRB>{});
    } else {
      launch(std::integral_constant<int, 4>{});
    }
    MTLSAM_CUDA_LAUNCH_CHECK();
    gram_finish<A><<<static_cast<unsigned int>((pairs + kWarps - 1) / kWarps), kBlock, 0,
                     stream>>>(ws.const_data_ptr<A>(), num_chunks, K, pairs,
                               out.mutable_data_ptr<A>());
    MTLSAM_CUDA_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace mtlsam_cuda
