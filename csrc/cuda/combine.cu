// combine_ (out = sum_i w_i rows_i) and sub_ (rows -= other) (CUDA).
//
// Both are element-wise, so no summation order across elements exists to fix; combine_ sums
// the rows of each column in row order 0..R-1 in the accumulation dtype with separate rounded
// multiply and add (as the reference's total.add_(rows[i] * w[i])), starting from +0, and
// rounds once to the output dtype. Grid-stride loops over 16-byte groups; the vector path (one
// 16-byte load/store per row and group) is taken when every row start is 16-byte aligned
// (aligned base pointers and N a multiple of the vector width), else a scalar path with the same
// arithmetic. Results cannot depend on the grid size or on the path.
#include "common.cuh"

namespace mtlsam_cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kBlock)
    combine_kernel(T* __restrict__ out, const T* __restrict__ rows,
                   const acc_t<T>* __restrict__ w, int64_t R, int64_t n, bool vec) {
  using A = acc_t<T>;
  constexpr int V = vec_width<T>();
  const int64_t groups = (n + V - 1) / V;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t e0 = g * V;
    A tot[V];
#pragma unroll
    for (int j = 0; j < V; ++j) tot[j] = A(0);
    if (vec && e0 + V <= n) {
      for (int64_t r = 0; r < R; ++r) {
        const Pack<T, V> pr = *reinterpret_cast<const Pack<T, V>*>(rows + r * n + e0);
        const A wr = w[r];
#pragma unroll
        for (int j = 0; j < V; ++j) tot[j] = add_rn(tot[j], mul_rn(to_acc(pr.v[j]), wr));
      }
      Pack<T, V> po;
#pragma unroll
      for (int j = 0; j < V; ++j) po.v[j] = from_acc<T>(tot[j]);
      *reinterpret_cast<Pack<T, V>*>(out + e0) = po;
    } else {
      const int cnt = n - e0 < V ? static_cast<int>(n - e0) : V;
      for (int64_t r = 0; r < R; ++r) {
        const A wr = w[r];
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (j < cnt) tot[j] = add_rn(tot[j], mul_rn(to_acc(rows[r * n + e0 + j]), wr));
      }
#pragma unroll
      for (int j = 0; j < V; ++j)
        if (j < cnt) out[e0 + j] = from_acc<T>(tot[j]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
    sub_kernel(T* __restrict__ a, const T* __restrict__ b, int64_t n, bool vec) {
  constexpr int V = vec_width<T>();
  const int64_t groups = (n + V - 1) / V;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t e0 = g * V;
    if (vec && e0 + V <= n) {
      Pack<T, V> pa = *reinterpret_cast<const Pack<T, V>*>(a + e0);
      const Pack<T, V> pb = *reinterpret_cast<const Pack<T, V>*>(b + e0);
#pragma unroll
      for (int j = 0; j < V; ++j)
        pa.v[j] = from_acc<T>(sub_rn(to_acc(pa.v[j]), to_acc(pb.v[j])));
      *reinterpret_cast<Pack<T, V>*>(a + e0) = pa;
    } else {
      for (int64_t i = e0; i < e0 + V && i < n; ++i)
        a[i] = from_acc<T>(sub_rn(to_acc(a[i]), to_acc(b[i])));
    }
  }
}

}  // namespace

void combine_(Tensor& out, const Tensor& rows, const Tensor& weights) {
  const char* op = "combine_";
  const int32_t dev = device_index(out);
  check_float_tensor(op, "out", out, dev);
  check_flat(op, "out", out);
  check_float_tensor(op, "rows", rows, dev);
  MTLSAM_CHECK(rows.dim() == 2, "mtlsam::combine_ (CUDA): rows must be a 2-D [R, N] matrix, "
               "got shape ", shape_str(rows));
  MTLSAM_CHECK(rows.size(1) == out.numel(), "mtlsam::combine_ (CUDA): rows has ", rows.size(1),
               " columns, expected ", out.numel());
  check_same_dtype(op, "rows", rows, "out", out);
  const int64_t R = rows.size(0);
  const int64_t n = out.numel();
  const Tensor w = coef_as_acc(op, "weights (one per row)", weights, dev,
                               acc_scalar_type(out.scalar_type()), R);
  const DeviceGuard guard(dev);
  if (n == 0) return;
  const cudaStream_t stream = current_stream(dev);
  MTLSAM_DISPATCH_FLOATING(out.scalar_type(), "mtlsam_combine_", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = vec_width<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const scalar_t* rp = rows.const_data_ptr<scalar_t>();
    const bool vec = aligned16(op_) && (R == 0 || aligned16(rp)) && n % V == 0;
    combine_kernel<scalar_t><<<elementwise_blocks((n + V - 1) / V), kBlock, 0, stream>>>(
        op_, rp, w.const_data_ptr<A>(), R, n, vec);
    MTLSAM_CUDA_LAUNCH_CHECK();
  });
}

void sub_(Tensor& rows, const Tensor& other) {
  const char* op = "sub_";
  const int32_t dev = device_index(rows);
  check_float_tensor(op, "rows", rows, dev);
  check_float_tensor(op, "other", other, dev);
  check_same_dtype(op, "other", other, "rows", rows);
  MTLSAM_CHECK(same_shape(rows, other), "mtlsam::sub_ (CUDA): other has shape ",
               shape_str(other), " but rows has shape ", shape_str(rows));
  const DeviceGuard guard(dev);
  const int64_t n = rows.numel();
  if (n == 0) return;
  const cudaStream_t stream = current_stream(dev);
  MTLSAM_DISPATCH_FLOATING(rows.scalar_type(), "mtlsam_sub_", [&] {
    constexpr int V = vec_width<scalar_t>();
    scalar_t* ap = rows.mutable_data_ptr<scalar_t>();
    const scalar_t* bp = other.const_data_ptr<scalar_t>();
    const bool vec = aligned16(ap) && aligned16(bp);
    sub_kernel<scalar_t><<<elementwise_blocks((n + V - 1) / V), kBlock, 0, stream>>>(ap, bp, n,
                                                                                      vec);
    MTLSAM_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace mtlsam_cuda
