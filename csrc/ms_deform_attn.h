// Multi-scale deformable attention: what the schema file (ms_deform_attn.cpp), the CPU kernels
// (ms_deform_attn_cpu.cpp) and the CUDA kernels (ms_deform_attn_cuda.cu) share.
//
// Shapes:
//   value               (N, S, M, D)        float
//   spatial_shapes      (L, 2)              int64, rows (H, W), sum(H*W) == S
//   level_start_index   (L,)                int64, exclusive cumulative sum of H*W
//   sampling_locations  (N, Lq, M, L, P, 2) float, normalised (x, y)
//   attention_weights   (N, Lq, M, L, P)    float
//   (locations and weights have value's dtype, or float32 beside a bfloat16 / half value in the
//   CPU forward)
//   output              (N, Lq, M*D)

#pragma once

#include <ATen/ATen.h>

namespace ddetr {

// Validates every argument of ms_deform_attn / ms_deform_attn_backward. Throws ValueError (via
// TORCH_CHECK_VALUE) naming the offending argument. After it returns, kernels can index value with
// any (level, y, x) in range without reading out of bounds. `grad_output` may be undefined.
void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                  const at::Tensor& attention_weights, const at::Tensor& grad_output);

}  // namespace ddetr
