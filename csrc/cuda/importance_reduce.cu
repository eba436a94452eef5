// CUDA kernel of pyengine::importance_reduce (schema in csrc/ops.cpp).
//
// x (and g) are viewed as contiguous [N, C]. A block of kTileX x kTileY threads owns kTileX
// consecutive channels (threadIdx.x: a warp reads one coalesced row segment) and walks rows
// grid-stride (threadIdx.y + blockIdx.y * kTileY, step gridDim.y * kTileY), keeping per-channel
// partial sums in registers in the accumulate type (fp32 for fp16/bf16/fp32, fp64 for fp64).
// The kTileY partials of a channel are reduced in shared memory; with several row blocks
// (gridDim.y > 1) they are then added to a zeroed accumulator with atomicAdd, else stored.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE/cuSOLVER
// headers): the extension then builds with a minimal CUDA toolkit (nvcc + cudart + cccl).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "importance_reduce.h"

namespace pyengine {
namespace {

constexpr int kTileX = 32;  // channels per block (one warp wide)
constexpr int kTileY = 8;   // row lanes per block

template <typename acc_t>
__device__ __forceinline__ acc_t abs_(acc_t v) {
  return v < acc_t(0) ? -v : v;
}

template <typename scalar_t, typename acc_t, bool HAS_G>
__global__ void __launch_bounds__(kTileX* kTileY)
    importance_reduce_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                             int64_t N, int64_t C, acc_t* __restrict__ out) {
  __shared__ acc_t s_abs[kTileY][kTileX];
  __shared__ acc_t s_sq[kTileY][kTileX];
  __shared__ acc_t s_absg[kTileY][kTileX];

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTileX + tx;

  acc_t a_abs = acc_t(0), a_sq = acc_t(0), a_absg = acc_t(0);
  if (c < C) {
    const int64_t stride = static_cast<int64_t>(gridDim.y) * kTileY;
    for (int64_t n = static_cast<int64_t>(blockIdx.y) * kTileY + ty; n < N; n += stride) {
      const int64_t i = n * C + c;
      const acc_t v = static_cast<acc_t>(x[i]);
      a_abs += abs_(v);
      a_sq += v * v;
      if constexpr (HAS_G) {
        a_absg += abs_(v * static_cast<acc_t>(g[i]));
      }
    }
  }
  s_abs[ty][tx] = a_abs;
  s_sq[ty][tx] = a_sq;
  s_absg[ty][tx] = a_absg;
  __syncthreads();

  if (ty == 0 && c < C) {
#pragma unroll
    for (int k = 1; k < kTileY; ++k) {
      a_abs += s_abs[k][tx];
      a_sq += s_sq[k][tx];
      a_absg += s_absg[k][tx];
    }
    if (gridDim.y == 1) {
      out[c] = a_abs;
      out[C + c] = a_sq;
      if constexpr (HAS_G) out[2 * C + c] = a_absg;
    } else {
      atomicAdd(out + c, a_abs);
      atomicAdd(out + C + c, a_sq);
      if constexpr (HAS_G) atomicAdd(out + 2 * C + c, a_absg);
    }
  }
}

at::Tensor importance_reduce_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& g_in) {
  TORCH_CHECK(x_in.is_cuda(), "pyengine::importance_reduce (CUDA kernel): x must be a CUDA "
              "tensor, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto [x, g] = importance_reduce_prepare(x_in, g_in);
  const int64_t N = x.size(0);
  const int64_t C = x.size(1);
  const bool has_g = g.defined();
  if (N == 0 || C == 0) {
    return at::zeros({3, C}, x_in.options().dtype(at::kFloat));
  }

  const int64_t grid_x = (C + kTileX - 1) / kTileX;
  TORCH_CHECK(grid_x <= std::numeric_limits<int32_t>::max(),
              "pyengine::importance_reduce: too many channels (", C, ")");
  // Enough row blocks to fill the GPU a few times over, never more than there are row groups.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        static_cast<int>(x.device().index())));
  const int64_t target_blocks = static_cast<int64_t>(sms) * 4;
  const int64_t row_groups = (N + kTileY - 1) / kTileY;
  int64_t grid_y = std::max<int64_t>(1, target_blocks / grid_x);
  grid_y = std::min<int64_t>({grid_y, row_groups, 65535});
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  const dim3 block(kTileX, kTileY);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "pyengine::importance_reduce_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor acc = at::zeros({3, C}, x.options().dtype(acc_dtype));
    if (has_g) {
      importance_reduce_kernel<scalar_t, acc_t, true><<<grid, block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), N, C,
          acc.data_ptr<acc_t>());
    } else {
      importance_reduce_kernel<scalar_t, acc_t, false><<<grid, block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), nullptr, N, C, acc.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    result = acc.to(at::kFloat);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CUDA, m) {
  m.impl("importance_reduce", &importance_reduce_cuda);
}

}  // namespace pyengine
