// CUDA kernels of multi-scale deformable attention: float32, float16 and bfloat16 computed in
// float (float64 too, computed in double).
//
// One warp per (n, q, m): every lane walks the same L*P sampling points and owns channels
// lane, lane + 32, ... of the head. The backward reduces the per-point dot products (gradients of
// the location and of the attention weight) with warp shuffles and scatters into a float32
// grad_value buffer with atomicAdd (float64 for float64 inputs), cast back to the input dtype
// at the end.

#include "ms_deform_attn.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

namespace ddetr {

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

template <typename acc_t>
struct CornerSet {
  int64_t off[4];  // element offset of each corner row from the (n, m) base, or -1 if outside
  acc_t w[4];
  acc_t fx, fy;
};

// Bilinear corners of normalised (lx, ly) on an H x W level; false when the sample is all zero.
template <typename acc_t>
__device__ __forceinline__ bool corners_of(acc_t lx, acc_t ly, int64_t H, int64_t W,
                                           int64_t level_ofs, int64_t row, CornerSet<acc_t>& c) {
  const acc_t x = lx * static_cast<acc_t>(W) - acc_t(0.5);
  const acc_t y = ly * static_cast<acc_t>(H) - acc_t(0.5);
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(W) &&
        y < static_cast<acc_t>(H))) {
    return false;
  }
  const acc_t xf = floor(x), yf = floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  const acc_t fx = x - xf, fy = y - yf;
  c.fx = fx;
  c.fy = fy;
  c.w[0] = (1 - fx) * (1 - fy);
  c.w[1] = fx * (1 - fy);
  c.w[2] = (1 - fx) * fy;
  c.w[3] = fx * fy;
  const bool vx0 = x0 >= 0, vx1 = x1 < W, vy0 = y0 >= 0, vy1 = y1 < H;
  c.off[0] = (vy0 && vx0) ? level_ofs + (y0 * W + x0) * row : -1;
  c.off[1] = (vy0 && vx1) ? level_ofs + (y0 * W + x1) * row : -1;
  c.off[2] = (vy1 && vx0) ? level_ofs + (y1 * W + x0) * row : -1;
  c.off[3] = (vy1 && vx1) ? level_ofs + (y1 * W + x1) * row : -1;
  return true;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load(const scalar_t* base, int64_t off, int64_t k) {
  return off >= 0 ? static_cast<acc_t>(base[off + k]) : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int s = kWarp / 2; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, scalar_t* __restrict__ out,
                               int64_t total, int64_t S, int64_t M, int64_t D, int64_t Lq,
                               int64_t L, int64_t P) {
  const int64_t i =
      static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;  // (n, q, m)
  const int lane = threadIdx.x % kWarp;
  if (i >= total) return;  // whole warps leave together
  const int64_t n = i / (Lq * M), m = i % M;
  const int64_t row = M * D;
  const scalar_t* vbase = value + n * S * row + m * D;
  const scalar_t* lp = loc + i * L * P * 2;
  const scalar_t* ap = attn + i * L * P;
  for (int64_t k0 = 0; k0 < D; k0 += kWarp) {
    const int64_t k = k0 + lane;
    if (k >= D) break;  // no warp-collective operations below
    acc_t acc = 0;
    CornerSet<acc_t> c;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const int64_t lofs = starts[l] * row;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t j = l * P + p;
        if (!corners_of<acc_t>(static_cast<acc_t>(lp[2 * j]), static_cast<acc_t>(lp[2 * j + 1]),
                               H, W, lofs, row, c)) {
          continue;
        }
        const acc_t s = c.w[0] * load<acc_t>(vbase, c.off[0], k) +
                        c.w[1] * load<acc_t>(vbase, c.off[1], k) +
                        c.w[2] * load<acc_t>(vbase, c.off[2], k) +
                        c.w[3] * load<acc_t>(vbase, c.off[3], k);
        acc += static_cast<acc_t>(ap[j]) * s;
      }
    }
    out[i * D + k] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ loc,
                                const scalar_t* __restrict__ attn,
                                acc_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                                scalar_t* __restrict__ grad_attn, int64_t total, int64_t S,
                                int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= total) return;  // whole warps leave together, so the shuffles below see full warps
  const int64_t n = i / (Lq * M), m = i % M;
  const int64_t row = M * D;
  const int64_t base = n * S * row + m * D;
  const scalar_t* vbase = value + base;
  acc_t* gvbase = grad_value + base;
  const scalar_t* go = grad_out + i * D;
  const scalar_t* lp = loc + i * L * P * 2;
  const scalar_t* ap = attn + i * L * P;
  scalar_t* glp = grad_loc + i * L * P * 2;
  scalar_t* gap = grad_attn + i * L * P;
  CornerSet<acc_t> c;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    const int64_t lofs = starts[l] * row;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t j = l * P + p;
      // Same decision in every lane: the branch is warp-uniform.
      if (!corners_of<acc_t>(static_cast<acc_t>(lp[2 * j]), static_cast<acc_t>(lp[2 * j + 1]), H,
                             W, lofs, row, c)) {
        continue;  // gradients stay at the zeros they were created with
      }
      const acc_t a = static_cast<acc_t>(ap[j]);
      acc_t g[4] = {0, 0, 0, 0};  // <grad_out, corner row>, partial over this lane's channels
      for (int64_t k = lane; k < D; k += kWarp) {
        const acc_t gk = static_cast<acc_t>(go[k]);
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
          if (c.off[cc] >= 0) {
            g[cc] += gk * static_cast<acc_t>(vbase[c.off[cc] + k]);
            atomicAdd(gvbase + c.off[cc] + k, a * c.w[cc] * gk);
          }
        }
      }
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) g[cc] = warp_sum(g[cc]);
      if (lane == 0) {
        const acc_t fx = c.fx, fy = c.fy;
        gap[j] = static_cast<scalar_t>(c.w[0] * g[0] + c.w[1] * g[1] + c.w[2] * g[2] +
                                       c.w[3] * g[3]);
        // d sample / d pixel coordinate; the pixel x is x_norm * W - 0.5.
        const acc_t gx = (1 - fy) * (g[1] - g[0]) + fy * (g[3] - g[2]);
        const acc_t gy = (1 - fx) * (g[2] - g[0]) + fx * (g[3] - g[1]);
        glp[2 * j] = static_cast<scalar_t>(a * static_cast<acc_t>(W) * gx);
        glp[2 * j + 1] = static_cast<scalar_t>(a * static_cast<acc_t>(H) * gy);
      }
    }
  }
}

unsigned int blocks_for(int64_t total) {
  const int64_t b = (total + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(b <= static_cast<int64_t>(0x7fffffff), "ms_deform_attn: problem too large (",
              total, " (n, q, m) triples)");
  return static_cast<unsigned int>(b);
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value_, const at::Tensor& spatial_shapes_,
                               const at::Tensor& level_start_index_,
                               const at::Tensor& sampling_locations_,
                               const at::Tensor& attention_weights_) {
  check_inputs(value_, spatial_shapes_, level_start_index_, sampling_locations_,
               attention_weights_, at::Tensor());
  const c10::cuda::CUDAGuard guard(value_.device());
  const auto value = value_.contiguous();
  const auto shapes = spatial_shapes_.contiguous();
  const auto starts = level_start_index_.contiguous();
  const auto loc = sampling_locations_.contiguous();
  const auto attn = attention_weights_.contiguous();
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = loc.size(1), L = loc.size(3), P = loc.size(4);
  auto out = at::empty({N, Lq, M * D}, value.options());
  const int64_t total = N * Lq * M;
  if (out.numel() == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        forward_kernel<scalar_t, acc_t><<<blocks_for(total), kWarp * kWarpsPerBlock, 0, stream>>>(
            value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
            loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
            total, S, M, D, Lq, L, P);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& value_, const at::Tensor& spatial_shapes_,
    const at::Tensor& level_start_index_, const at::Tensor& sampling_locations_,
    const at::Tensor& attention_weights_) {
  check_inputs(value_, spatial_shapes_, level_start_index_, sampling_locations_,
               attention_weights_, grad_output_);
  const c10::cuda::CUDAGuard guard(value_.device());
  const auto grad_output = grad_output_.contiguous();
  const auto value = value_.contiguous();
  const auto shapes = spatial_shapes_.contiguous();
  const auto starts = level_start_index_.contiguous();
  const auto loc = sampling_locations_.contiguous();
  const auto attn = attention_weights_.contiguous();
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = loc.size(1), L = loc.size(3), P = loc.size(4);
  const auto acc_dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  auto grad_loc = at::zeros_like(loc);
  auto grad_attn = at::zeros_like(attn);
  const int64_t total = N * Lq * M;
  if (total > 0 && D > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          backward_kernel<scalar_t, acc_t><<<blocks_for(total), kWarp * kWarpsPerBlock, 0, stream>>>(
              grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
              shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
              attn.data_ptr<scalar_t>(), grad_value_acc.data_ptr<acc_t>(),
              grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), total, S, M, D, Lq,
              L, P);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  auto grad_value = value.scalar_type() == acc_dtype ? grad_value_acc
                                                     : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace ddetr
