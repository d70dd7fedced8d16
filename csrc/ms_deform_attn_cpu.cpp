// CPU kernels of multi-scale deformable attention (float32 / float64).
//
// Bilinear sampling follows grid_sample(align_corners=False, padding_mode="zeros"): a normalised
// location (x, y) is read at pixel (x * W - 0.5, y * H - 0.5) and corners outside the level read 0.
//
// Forward is parallel over (n, q, m); backward over (n, m) so that each thread owns the slice
// grad_value[n, :, m, :] and accumulates into it without races, in a fixed order (deterministic).
// The channel loops run over contiguous rows value[n, s, m, :] and are written for the compiler to
// vectorise; invalid corners point at a row of zeros instead of branching inside the loop.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace ddetr {

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                  const at::Tensor& attention_weights, const at::Tensor& grad_output);

namespace {

// The four bilinear corners of one sampling point, in the order (y0, x0), (y0, x1), (y1, x0),
// (y1, x1). `ptr[c]` is the value row of corner c, or the zero row when the corner is outside.
template <typename scalar_t>
struct Corners {
  const scalar_t* ptr[4];
  scalar_t w[4];
  bool valid[4];
  scalar_t fx, fy;
};

// Returns false when no corner of the point lies inside the H x W level (the sample is zero).
template <typename scalar_t>
inline bool corners_of(scalar_t lx, scalar_t ly, int64_t H, int64_t W, const scalar_t* level_base,
                       int64_t row_stride, const scalar_t* zero, Corners<scalar_t>& c) {
  const scalar_t x = lx * static_cast<scalar_t>(W) - scalar_t(0.5);
  const scalar_t y = ly * static_cast<scalar_t>(H) - scalar_t(0.5);
  // Written so that NaN locations also take the early exit.
  if (!(x > scalar_t(-1) && y > scalar_t(-1) && x < static_cast<scalar_t>(W) &&
        y < static_cast<scalar_t>(H))) {
    return false;
  }
  const scalar_t xf = std::floor(x), yf = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(xf), y0 = static_cast<int64_t>(yf);
  const int64_t x1 = x0 + 1, y1 = y0 + 1;
  const scalar_t fx = x - xf, fy = y - yf;
  c.fx = fx;
  c.fy = fy;
  c.w[0] = (1 - fx) * (1 - fy);
  c.w[1] = fx * (1 - fy);
  c.w[2] = (1 - fx) * fy;
  c.w[3] = fx * fy;
  const bool vx0 = x0 >= 0, vx1 = x1 < W, vy0 = y0 >= 0, vy1 = y1 < H;
  c.valid[0] = vy0 && vx0;
  c.valid[1] = vy0 && vx1;
  c.valid[2] = vy1 && vx0;
  c.valid[3] = vy1 && vx1;
  c.ptr[0] = c.valid[0] ? level_base + (y0 * W + x0) * row_stride : zero;
  c.ptr[1] = c.valid[1] ? level_base + (y0 * W + x1) * row_stride : zero;
  c.ptr[2] = c.valid[2] ? level_base + (y1 * W + x0) * row_stride : zero;
  c.ptr[3] = c.valid[3] ? level_base + (y1 * W + x1) * row_stride : zero;
  return true;
}

struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

// DC > 0: channel count known at compile time (the accumulator then lives in registers);
// DC == 0: any channel count, accumulated straight into the output row.
template <typename scalar_t, int DC>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* loc, const scalar_t* attn, scalar_t* out, const Dims& d) {
  const int64_t D = DC > 0 ? DC : d.D;
  const int64_t row = d.M * D;
  const int64_t LP = d.L * d.P;
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(LP, 1));
  at::parallel_for(0, d.N * d.Lq * d.M, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> zero(D, scalar_t(0));
    Corners<scalar_t> c;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / (d.Lq * d.M), m = i % d.M;
      const scalar_t* vbase = value + n * d.S * row + m * D;
      const scalar_t* lp = loc + i * LP * 2;
      const scalar_t* ap = attn + i * LP;
      scalar_t* op = out + i * D;
      scalar_t acc_fixed[DC > 0 ? DC : 1];
      scalar_t* acc = DC > 0 ? acc_fixed : op;
      for (int64_t k = 0; k < D; ++k) acc[k] = 0;
      for (int64_t l = 0; l < d.L; ++l) {
        const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
        const scalar_t* lbase = vbase + starts[l] * row;
        for (int64_t p = 0; p < d.P; ++p, lp += 2, ++ap) {
          if (!corners_of(lp[0], lp[1], H, W, lbase, row, zero.data(), c)) continue;
          const scalar_t a = *ap;
          const scalar_t w0 = a * c.w[0], w1 = a * c.w[1], w2 = a * c.w[2], w3 = a * c.w[3];
          const scalar_t* __restrict__ p0 = c.ptr[0];
          const scalar_t* __restrict__ p1 = c.ptr[1];
          const scalar_t* __restrict__ p2 = c.ptr[2];
          const scalar_t* __restrict__ p3 = c.ptr[3];
#pragma omp simd
          for (int64_t k = 0; k < D; ++k) {
            acc[k] += w0 * p0[k] + w1 * p1[k] + w2 * p2[k] + w3 * p3[k];
          }
        }
      }
      if (DC > 0) {
        for (int64_t k = 0; k < D; ++k) op[k] = acc[k];
      }
    }
  });
}

template <typename scalar_t, int DC>
void backward_kernel(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const scalar_t* loc, const scalar_t* attn,
                     scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn,
                     const Dims& d) {
  const int64_t D = DC > 0 ? DC : d.D;
  const int64_t row = d.M * D;
  const int64_t LP = d.L * d.P;
  at::parallel_for(0, d.N * d.M, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> zero(D, scalar_t(0));
    Corners<scalar_t> c;
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / d.M, m = nm % d.M;
      const scalar_t* vbase = value + n * d.S * row + m * D;
      scalar_t* gvbase = grad_value + n * d.S * row + m * D;
      for (int64_t q = 0; q < d.Lq; ++q) {
        const int64_t i = (n * d.Lq + q) * d.M + m;
        const scalar_t* __restrict__ go = grad_out + i * D;
        const scalar_t* lp = loc + i * LP * 2;
        const scalar_t* ap = attn + i * LP;
        scalar_t* glp = grad_loc + i * LP * 2;
        scalar_t* gap = grad_attn + i * LP;
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          const int64_t lofs = starts[l] * row;
          for (int64_t p = 0; p < d.P; ++p, lp += 2, ++ap, glp += 2, ++gap) {
            // Outside points keep the zeros the gradient buffers were created with.
            if (!corners_of(lp[0], lp[1], H, W, vbase + lofs, row, zero.data(), c)) continue;
            const scalar_t* __restrict__ p0 = c.ptr[0];
            const scalar_t* __restrict__ p1 = c.ptr[1];
            const scalar_t* __restrict__ p2 = c.ptr[2];
            const scalar_t* __restrict__ p3 = c.ptr[3];
            scalar_t g0 = 0, g1 = 0, g2 = 0, g3 = 0;  // <grad_out, corner row>
#pragma omp simd reduction(+ : g0, g1, g2, g3)
            for (int64_t k = 0; k < D; ++k) {
              g0 += go[k] * p0[k];
              g1 += go[k] * p1[k];
              g2 += go[k] * p2[k];
              g3 += go[k] * p3[k];
            }
            const scalar_t a = *ap;
            const scalar_t fx = c.fx, fy = c.fy;
            *gap = c.w[0] * g0 + c.w[1] * g1 + c.w[2] * g2 + c.w[3] * g3;
            // d sample / d x_pixel and d y_pixel; x_pixel = x * W - 0.5.
            const scalar_t gx = (1 - fy) * (g1 - g0) + fy * (g3 - g2);
            const scalar_t gy = (1 - fx) * (g2 - g0) + fx * (g3 - g1);
            glp[0] = a * static_cast<scalar_t>(W) * gx;
            glp[1] = a * static_cast<scalar_t>(H) * gy;
            for (int cc = 0; cc < 4; ++cc) {
              if (!c.valid[cc]) continue;
              scalar_t* __restrict__ gv = gvbase + (c.ptr[cc] - vbase);
              const scalar_t s = a * c.w[cc];
#pragma omp simd
              for (int64_t k = 0; k < D; ++k) gv[k] += s * go[k];
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename F>
void with_channels(int64_t D, F&& f) {
  // Common head widths get a compile-time channel count; anything else takes the generic path.
  switch (D) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

Dims dims_of(const at::Tensor& value, const at::Tensor& loc) {
  return Dims{value.size(0), value.size(1), value.size(2), value.size(3),
              loc.size(1),   loc.size(3),   loc.size(4)};
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value_, const at::Tensor& spatial_shapes_,
                              const at::Tensor& level_start_index_,
                              const at::Tensor& sampling_locations_,
                              const at::Tensor& attention_weights_) {
  check_inputs(value_, spatial_shapes_, level_start_index_, sampling_locations_,
               attention_weights_, at::Tensor());
  const auto value = value_.contiguous();
  const auto shapes = spatial_shapes_.contiguous();
  const auto starts = level_start_index_.contiguous();
  const auto loc = sampling_locations_.contiguous();
  const auto attn = attention_weights_.contiguous();
  const Dims d = dims_of(value, loc);
  auto out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_cpu", [&] {
    with_channels<scalar_t>(d.D, [&](auto dc) {
      forward_kernel<scalar_t, decltype(dc)::value>(
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& value_, const at::Tensor& spatial_shapes_,
    const at::Tensor& level_start_index_, const at::Tensor& sampling_locations_,
    const at::Tensor& attention_weights_) {
  check_inputs(value_, spatial_shapes_, level_start_index_, sampling_locations_,
               attention_weights_, grad_output_);
  const auto grad_output = grad_output_.contiguous();
  const auto value = value_.contiguous();
  const auto shapes = spatial_shapes_.contiguous();
  const auto starts = level_start_index_.contiguous();
  const auto loc = sampling_locations_.contiguous();
  const auto attn = attention_weights_.contiguous();
  const Dims d = dims_of(value, loc);
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(loc);
  auto grad_attn = at::zeros_like(attn);
  if (grad_output.numel() == 0) return {grad_value, grad_loc, grad_attn};
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    with_channels<scalar_t>(d.D, [&](auto dc) {
      backward_kernel<scalar_t, decltype(dc)::value>(
          grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
          shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
          attn.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
          grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), d);
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace ddetr
