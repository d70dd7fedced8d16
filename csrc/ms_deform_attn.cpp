// Multi-scale deformable attention: operator schema and input validation.
//
// The schema is defined once here; the CPU kernels live in ms_deform_attn_cpu.cpp and the CUDA
// kernels in ms_deform_attn_cuda.cu, each registered with its own TORCH_LIBRARY_IMPL. The fake
// (meta) implementation and the autograd formula are registered from Python (ddetr_cli/ops/msda.py).
// Shapes and the shared declarations: ms_deform_attn.h.

#include "ms_deform_attn.h"

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>

namespace ddetr {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + ")";
}

}  // namespace

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                  const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(value.defined(), "ms_deform_attn: value is undefined");
  TORCH_CHECK_VALUE(value.dim() == 4, "ms_deform_attn: value must be 4-D (N, S, M, D), got shape ",
                    shape_str(value));
  TORCH_CHECK_VALUE(at::isFloatingType(value.scalar_type()),
                    "ms_deform_attn: value must be a floating tensor, got ", value.scalar_type());
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);

  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "ms_deform_attn: spatial_shapes must have shape (L, 2), got ",
                    shape_str(spatial_shapes));
  TORCH_CHECK_VALUE(spatial_shapes.scalar_type() == at::kLong,
                    "ms_deform_attn: spatial_shapes must be int64, got ",
                    spatial_shapes.scalar_type());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(L >= 1, "ms_deform_attn: spatial_shapes must have at least one level");
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == L,
                    "ms_deform_attn: level_start_index must have shape (L,) = (", L, ",), got ",
                    shape_str(level_start_index));
  TORCH_CHECK_VALUE(level_start_index.scalar_type() == at::kLong,
                    "ms_deform_attn: level_start_index must be int64, got ",
                    level_start_index.scalar_type());

  TORCH_CHECK_VALUE(sampling_locations.dim() == 6,
                    "ms_deform_attn: sampling_locations must be 6-D (N, Lq, M, L, P, 2), got shape ",
                    shape_str(sampling_locations));
  const int64_t Lq = sampling_locations.size(1), P = sampling_locations.size(4);
  TORCH_CHECK_VALUE(sampling_locations.size(0) == N && sampling_locations.size(2) == M &&
                        sampling_locations.size(3) == L && sampling_locations.size(5) == 2,
                    "ms_deform_attn: sampling_locations must have shape (N, Lq, M, L, P, 2) with N=",
                    N, ", M=", M, ", L=", L, ", got ", shape_str(sampling_locations));
  TORCH_CHECK_VALUE(attention_weights.dim() == 5,
                    "ms_deform_attn: attention_weights must be 5-D (N, Lq, M, L, P), got shape ",
                    shape_str(attention_weights));
  TORCH_CHECK_VALUE(attention_weights.size(0) == N && attention_weights.size(1) == Lq &&
                        attention_weights.size(2) == M && attention_weights.size(3) == L &&
                        attention_weights.size(4) == P,
                    "ms_deform_attn: attention_weights must have shape (N, Lq, M, L, P) = (", N,
                    ", ", Lq, ", ", M, ", ", L, ", ", P, "), got ", shape_str(attention_weights));

  // The CPU forward also takes float32 locations and weights beside a bfloat16 / half value
  // (reduced-precision inference keeps the geometry in float32).
  const bool reduced = value.scalar_type() == at::kBFloat16 || value.scalar_type() == at::kHalf;
  const bool mixed_ok = reduced && value.device().is_cpu() && !grad_output.defined();
  const auto dtype_ok = [&](const at::Tensor& t) {
    return t.scalar_type() == value.scalar_type() || (mixed_ok && t.scalar_type() == at::kFloat);
  };
  TORCH_CHECK_VALUE(dtype_ok(sampling_locations),
                    "ms_deform_attn: sampling_locations dtype ", sampling_locations.scalar_type(),
                    " must match value dtype ", value.scalar_type());
  TORCH_CHECK_VALUE(dtype_ok(attention_weights),
                    "ms_deform_attn: attention_weights dtype ", attention_weights.scalar_type(),
                    " must match value dtype ", value.scalar_type());

  const auto dev = value.device();
  TORCH_CHECK_VALUE(spatial_shapes.device() == dev, "ms_deform_attn: spatial_shapes is on ",
                    spatial_shapes.device(), " but value is on ", dev);
  TORCH_CHECK_VALUE(level_start_index.device() == dev, "ms_deform_attn: level_start_index is on ",
                    level_start_index.device(), " but value is on ", dev);
  TORCH_CHECK_VALUE(sampling_locations.device() == dev, "ms_deform_attn: sampling_locations is on ",
                    sampling_locations.device(), " but value is on ", dev);
  TORCH_CHECK_VALUE(attention_weights.device() == dev, "ms_deform_attn: attention_weights is on ",
                    attention_weights.device(), " but value is on ", dev);

  if (grad_output.defined()) {
    TORCH_CHECK_VALUE(grad_output.dim() == 3 && grad_output.size(0) == N &&
                          grad_output.size(1) == Lq && grad_output.size(2) == M * D,
                      "ms_deform_attn_backward: grad_output must have shape (N, Lq, M*D) = (", N,
                      ", ", Lq, ", ", M * D, "), got ", shape_str(grad_output));
    TORCH_CHECK_VALUE(grad_output.scalar_type() == value.scalar_type(),
                      "ms_deform_attn_backward: grad_output dtype ", grad_output.scalar_type(),
                      " must match value dtype ", value.scalar_type());
    TORCH_CHECK_VALUE(grad_output.device() == dev, "ms_deform_attn_backward: grad_output is on ",
                      grad_output.device(), " but value is on ", dev);
  }

  // The level geometry decides every memory offset the kernels compute, so it is checked on the
  // host (a device sync on CUDA; L is tiny).
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = sh[2 * l], W = sh[2 * l + 1];
    TORCH_CHECK_VALUE(H > 0 && W > 0, "ms_deform_attn: spatial_shapes[", l,
                      "] must be positive (H, W), got (", H, ", ", W, ")");
    TORCH_CHECK_VALUE(st[l] == total, "ms_deform_attn: level_start_index[", l, "] is ", st[l],
                      " but the levels before it in spatial_shapes hold ", total, " positions");
    // Division instead of H * W so absurd shapes cannot overflow; total <= S holds here.
    TORCH_CHECK_VALUE(W <= (S - total) / H,
                      "ms_deform_attn: spatial_shapes describe more positions than value holds (S=",
                      S, ")");
    total += H * W;
  }
  TORCH_CHECK_VALUE(total == S, "ms_deform_attn: spatial_shapes sum(H*W) = ", total,
                    " does not match value.size(1) = S = ", S);
}

TORCH_LIBRARY(ddetr, m) {
  // Fake tensors and autograd for these ops are registered by this Python module.
  m.set_python_module("ddetr_cli.ops.msda");
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
}

}  // namespace ddetr
