// CPU kernels of multi-scale deformable attention (forward: float32 / float64 / bfloat16 / half;
// backward: float32 / float64).
//
// Reduced-precision forward: value is bfloat16 or half and sampling_locations / attention_weights
// are float32 (a bfloat16 location would be off by up to a quarter pixel on a 134-pixel level);
// samples are converted to float and accumulated in float, and the output is rounded once.
//
// Bilinear sampling follows grid_sample(align_corners=False, padding_mode="zeros"): a normalised
// location (x, y) is read at pixel (x * W - 0.5, y * H - 0.5) and corners outside the level read 0.
//
// Forward is parallel over (n, m, q) on a head-major (N, M, S, D) copy of value, one head's rows
// contiguous (measured against (n, q, m) over (N, S, M, D), interleaved in one process on a 2-core
// EPYC: uniform locations 34 -> 20-29 ms, bfloat16 at the encoder shape 27 -> 23 ms, float32 at
// the encoder shape within noise, the copy included). Backward is parallel over (n, m) so that each
// thread owns the slice grad_value[n, :, m, :] and accumulates into it without races, in a fixed
// order (deterministic); it works on head-major (N, M, S, D) copies of value and grad_value so
// that a head's slice is contiguous (measured ~1.4x faster at the encoder shape).
// The channel loops run over contiguous rows (D values of one head at one pixel) and are written
// for the compiler to vectorise; invalid corners point at a row of zeros instead of branching
// inside the loop. The corner geometry of all L*P points of a query is computed first, in a loop
// across points.

#include "ms_deform_attn.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <tuple>
#include <vector>

namespace ddetr {

namespace {

// Per sampling point j = l * P + p, the level it samples: size (as float and int) and the
// position of its first pixel in value.
template <typename scalar_t>
struct LevelTable {
  std::vector<scalar_t> Wf, Hf;
  std::vector<int32_t> Wi, start;

  LevelTable(const int64_t* shapes, const int64_t* starts, int64_t L, int64_t P)
      : Wf(L * P), Hf(L * P), Wi(L * P), start(L * P) {
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t p = 0; p < P; ++p) {
        Hf[l * P + p] = static_cast<scalar_t>(shapes[2 * l]);
        Wf[l * P + p] = static_cast<scalar_t>(shapes[2 * l + 1]);
        Wi[l * P + p] = static_cast<int32_t>(shapes[2 * l + 1]);
        start[l * P + p] = static_cast<int32_t>(starts[l]);
      }
    }
  }
};

// Bilinear corners of the LP points of one (n, q, m), corner c in the order (y0, x0), (y0, x1),
// (y1, x0), (y1, x1): pixel index idx[c][j] in [0, S) or -1 when the corner lies outside its
// level, and weight w[c][j] (0 when outside). fx/fy: fractional position, 0 for points with no
// corner inside. Branch-free so that the compiler vectorises it across points.
template <typename scalar_t>
struct PointBuffers {
  std::vector<int32_t> idx;  // 4 * LP
  std::vector<scalar_t> w;   // 4 * LP
  std::vector<scalar_t> fx, fy;
  explicit PointBuffers(int64_t LP) : idx(4 * LP), w(4 * LP), fx(LP), fy(LP) {}
};

template <typename scalar_t>
inline void prepare_points(const scalar_t* __restrict__ lp, int64_t LP, const LevelTable<scalar_t>& t,
                           PointBuffers<scalar_t>& b) {
  const scalar_t* __restrict__ Wf = t.Wf.data();
  const scalar_t* __restrict__ Hf = t.Hf.data();
  const int32_t* __restrict__ Wi = t.Wi.data();
  const int32_t* __restrict__ st = t.start.data();
  int32_t* __restrict__ i0 = b.idx.data();
  int32_t* __restrict__ i1 = i0 + LP;
  int32_t* __restrict__ i2 = i1 + LP;
  int32_t* __restrict__ i3 = i2 + LP;
  scalar_t* __restrict__ w0 = b.w.data();
  scalar_t* __restrict__ w1 = w0 + LP;
  scalar_t* __restrict__ w2 = w1 + LP;
  scalar_t* __restrict__ w3 = w2 + LP;
  scalar_t* __restrict__ fxs = b.fx.data();
  scalar_t* __restrict__ fys = b.fy.data();
#pragma omp simd
  for (int64_t j = 0; j < LP; ++j) {
    const scalar_t W = Wf[j], H = Hf[j];
    // grid_sample(align_corners=False): normalised 0..1 spans the pixels' outer edges.
    const scalar_t x = lp[2 * j] * W - scalar_t(0.5);
    const scalar_t y = lp[2 * j + 1] * H - scalar_t(0.5);
    const scalar_t xf = std::floor(x), yf = std::floor(y);
    // Validity from the float corner coordinates (false for NaN); & and | keep the loop
    // free of branches.
    const bool vx0 = xf >= 0 & xf <= W - 1, vx1 = xf >= -1 & xf <= W - 2;
    const bool vy0 = yf >= 0 & yf <= H - 1, vy1 = yf >= -1 & yf <= H - 2;
    const bool any = (vx0 | vx1) & (vy0 | vy1);
    const scalar_t fx = any ? x - xf : scalar_t(0), fy = any ? y - yf : scalar_t(0);
    // Clamped before the integer conversion so that NaN/huge coordinates stay defined.
    const scalar_t xc = xf > scalar_t(-1) ? (xf < W ? xf : W) : scalar_t(-1);
    const scalar_t yc = yf > scalar_t(-1) ? (yf < H ? yf : H) : scalar_t(-1);
    const int32_t base = st[j] + static_cast<int32_t>(yc) * Wi[j] + static_cast<int32_t>(xc);
    i0[j] = vy0 & vx0 ? base : -1;
    i1[j] = vy0 & vx1 ? base + 1 : -1;
    i2[j] = vy1 & vx0 ? base + Wi[j] : -1;
    i3[j] = vy1 & vx1 ? base + Wi[j] + 1 : -1;
    w0[j] = vy0 & vx0 ? (1 - fx) * (1 - fy) : scalar_t(0);
    w1[j] = vy0 & vx1 ? fx * (1 - fy) : scalar_t(0);
    w2[j] = vy1 & vx0 ? (1 - fx) * fy : scalar_t(0);
    w3[j] = vy1 & vx1 ? fx * fy : scalar_t(0);
    fxs[j] = fx;
    fys[j] = fy;
  }
}

// acc[k] += a0 * p0[k] + ... + a3 * p3[k] over one channel row, in the accumulator's type.
template <typename scalar_t>
inline void accumulate_corners(scalar_t* __restrict__ acc, const scalar_t* __restrict__ p0,
                               const scalar_t* __restrict__ p1, const scalar_t* __restrict__ p2,
                               const scalar_t* __restrict__ p3, scalar_t a0, scalar_t a1,
                               scalar_t a2, scalar_t a3, int64_t D) {
#pragma omp simd
  for (int64_t k = 0; k < D; ++k) acc[k] += a0 * p0[k] + a1 * p1[k] + a2 * p2[k] + a3 * p3[k];
}

// bfloat16 rows: widened by a shift of the raw bits (exact), which the compiler vectorises; the
// c10::BFloat16 conversion operator goes through a call per element.
inline float bf16_bits_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline void accumulate_corners(float* __restrict__ acc, const c10::BFloat16* p0_,
                               const c10::BFloat16* p1_, const c10::BFloat16* p2_,
                               const c10::BFloat16* p3_, float a0, float a1, float a2, float a3,
                               int64_t D) {
  const uint16_t* __restrict__ p0 = reinterpret_cast<const uint16_t*>(p0_);
  const uint16_t* __restrict__ p1 = reinterpret_cast<const uint16_t*>(p1_);
  const uint16_t* __restrict__ p2 = reinterpret_cast<const uint16_t*>(p2_);
  const uint16_t* __restrict__ p3 = reinterpret_cast<const uint16_t*>(p3_);
#pragma omp simd
  for (int64_t k = 0; k < D; ++k) {
    acc[k] += a0 * bf16_bits_to_float(p0[k]) + a1 * bf16_bits_to_float(p1[k]) +
              a2 * bf16_bits_to_float(p2[k]) + a3 * bf16_bits_to_float(p3[k]);
  }
}

inline void accumulate_corners(float* __restrict__ acc, const c10::Half* p0, const c10::Half* p1,
                               const c10::Half* p2, const c10::Half* p3, float a0, float a1,
                               float a2, float a3, int64_t D) {
  for (int64_t k = 0; k < D; ++k) {
    acc[k] += a0 * static_cast<float>(p0[k]) + a1 * static_cast<float>(p1[k]) +
              a2 * static_cast<float>(p2[k]) + a3 * static_cast<float>(p3[k]);
  }
}

struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

// DC > 0: channel count known at compile time (the accumulator then lives in registers);
// DC == 0: any channel count, accumulated straight into the output row.
// value_t: value and output; scalar_t: locations, weights and the accumulator (float for the
// reduced-precision value types, else value_t).
template <typename value_t, typename scalar_t, int DC>
void forward_kernel(const value_t* value_hm, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* loc, const scalar_t* attn, value_t* out, const Dims& d) {
  constexpr bool kSame = std::is_same<value_t, scalar_t>::value;
  // reduced precision always accumulates in registers, then rounds once into the output row
  constexpr int kAcc = DC > 0 ? DC : 1;
  const int64_t D = DC > 0 ? DC : d.D;
  const int64_t row = D;  // value_hm is head-major (N, M, S, D)
  const int64_t LP = d.L * d.P;
  const LevelTable<scalar_t> table(shapes, starts, d.L, d.P);
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(LP, 1));
  // Items in the order (n, m, q): one head's queries in a row, so that the pixels a run of
  // neighbouring queries samples are one head's contiguous rows (D values each), an M times
  // smaller working set than in (q, m) order, where every head's rows of those pixels are live.
  at::parallel_for(0, d.N * d.M * d.Lq, grain, [&](int64_t begin, int64_t end) {
    const std::vector<value_t> zero(D, value_t(0));
    // generic channel count with a reduced-precision value: a float row to accumulate into
    std::vector<scalar_t> acc_row(kSame || DC > 0 ? 0 : D);
    PointBuffers<scalar_t> b(LP);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nm = t / d.Lq, q = t % d.Lq, n = nm / d.M, m = nm % d.M;
      const int64_t i = (n * d.Lq + q) * d.M + m;  // (n, q, m): locations, weights and output
      const value_t* vbase = value_hm + nm * d.S * D;
      const scalar_t* ap = attn + i * LP;
      value_t* op = out + i * D;
      prepare_points(loc + i * LP * 2, LP, table, b);
      const int32_t* idx = b.idx.data();
      const scalar_t* w = b.w.data();
      scalar_t acc_fixed[kAcc];
      scalar_t* acc = DC > 0 ? acc_fixed : (kSame ? reinterpret_cast<scalar_t*>(op) : acc_row.data());
      for (int64_t k = 0; k < D; ++k) acc[k] = 0;
      for (int64_t j = 0; j < LP; ++j) {
        const int32_t c0 = idx[j], c1 = idx[LP + j], c2 = idx[2 * LP + j], c3 = idx[3 * LP + j];
        if ((c0 & c1 & c2 & c3) < 0) continue;  // all four corners outside
        const scalar_t a = ap[j];
        const scalar_t a0 = a * w[j], a1 = a * w[LP + j], a2 = a * w[2 * LP + j],
                       a3 = a * w[3 * LP + j];
        const value_t* __restrict__ p0 = c0 >= 0 ? vbase + c0 * row : zero.data();
        const value_t* __restrict__ p1 = c1 >= 0 ? vbase + c1 * row : zero.data();
        const value_t* __restrict__ p2 = c2 >= 0 ? vbase + c2 * row : zero.data();
        const value_t* __restrict__ p3 = c3 >= 0 ? vbase + c3 * row : zero.data();
        accumulate_corners(acc, p0, p1, p2, p3, a0, a1, a2, a3, D);
      }
      if (DC > 0 || !kSame) {
        for (int64_t k = 0; k < D; ++k) op[k] = static_cast<value_t>(acc[k]);
      }
    }
  });
}

template <typename scalar_t, int DC>
void backward_kernel(const scalar_t* grad_out, const scalar_t* value_hm, const int64_t* shapes,
                     const int64_t* starts, const scalar_t* loc, const scalar_t* attn,
                     scalar_t* grad_value_hm, scalar_t* grad_loc, scalar_t* grad_attn,
                     const Dims& d) {
  const int64_t D = DC > 0 ? DC : d.D;
  const int64_t row = D;  // value_hm / grad_value_hm are head-major (N, M, S, D)
  const int64_t LP = d.L * d.P;
  const LevelTable<scalar_t> table(shapes, starts, d.L, d.P);
  at::parallel_for(0, d.N * d.M, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zero(D, scalar_t(0));
    PointBuffers<scalar_t> b(LP);
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / d.M, m = nm % d.M;
      const scalar_t* vbase = value_hm + nm * d.S * D;
      scalar_t* gvbase = grad_value_hm + nm * d.S * D;
      for (int64_t q = 0; q < d.Lq; ++q) {
        const int64_t i = (n * d.Lq + q) * d.M + m;
        const scalar_t* __restrict__ go = grad_out + i * D;
        const scalar_t* ap = attn + i * LP;
        scalar_t* glp = grad_loc + i * LP * 2;
        scalar_t* gap = grad_attn + i * LP;
        prepare_points(loc + i * LP * 2, LP, table, b);
        const int32_t* idx = b.idx.data();
        const scalar_t* w = b.w.data();
        for (int64_t j = 0; j < LP; ++j) {
          const int32_t c[4] = {idx[j], idx[LP + j], idx[2 * LP + j], idx[3 * LP + j]};
          // Points with no corner inside keep the zeros the gradient buffers were created with.
          if ((c[0] & c[1] & c[2] & c[3]) < 0) continue;
          const scalar_t* __restrict__ p0 = c[0] >= 0 ? vbase + c[0] * row : zero.data();
          const scalar_t* __restrict__ p1 = c[1] >= 0 ? vbase + c[1] * row : zero.data();
          const scalar_t* __restrict__ p2 = c[2] >= 0 ? vbase + c[2] * row : zero.data();
          const scalar_t* __restrict__ p3 = c[3] >= 0 ? vbase + c[3] * row : zero.data();
          scalar_t g0 = 0, g1 = 0, g2 = 0, g3 = 0;  // <grad_out, corner row>
#pragma omp simd reduction(+ : g0, g1, g2, g3)
          for (int64_t k = 0; k < D; ++k) {
            g0 += go[k] * p0[k];
            g1 += go[k] * p1[k];
            g2 += go[k] * p2[k];
            g3 += go[k] * p3[k];
          }
          const scalar_t a = ap[j];
          const scalar_t fx = b.fx[j], fy = b.fy[j];
          const scalar_t wc[4] = {w[j], w[LP + j], w[2 * LP + j], w[3 * LP + j]};
          gap[j] = wc[0] * g0 + wc[1] * g1 + wc[2] * g2 + wc[3] * g3;
          // d sample / d pixel coordinate; the pixel x is x_norm * W - 0.5.
          const scalar_t gx = (1 - fy) * (g1 - g0) + fy * (g3 - g2);
          const scalar_t gy = (1 - fx) * (g2 - g0) + fx * (g3 - g1);
          glp[2 * j] = a * table.Wf[j] * gx;
          glp[2 * j + 1] = a * table.Hf[j] * gy;
          for (int cc = 0; cc < 4; ++cc) {
            if (c[cc] < 0) continue;
            scalar_t* __restrict__ gv = gvbase + c[cc] * row;
            const scalar_t s = a * wc[cc];
#pragma omp simd
            for (int64_t k = 0; k < D; ++k) gv[k] += s * go[k];
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

// Pixel indices are int32 inside the kernels (int64 once multiplied by the row stride).
void check_index_range(const Dims& d) {
  TORCH_CHECK_VALUE(d.S < (int64_t(1) << 31) - 1,
                    "ms_deform_attn (CPU): value.size(1) = S must be below 2**31, got ", d.S);
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
  // head-major copy (N, M, S, D); for one head it is the value itself
  const auto value = value_.permute({0, 2, 1, 3}).contiguous();
  const auto shapes = spatial_shapes_.contiguous();
  const auto starts = level_start_index_.contiguous();
  const auto loc = sampling_locations_.contiguous();
  const auto attn = attention_weights_.contiguous();
  const Dims d = dims_of(value_, loc);
  check_index_range(d);
  auto out = at::empty({d.N, d.Lq, d.M * d.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    using value_t = scalar_t;
    using acc_t = at::opmath_type<value_t>;  // float for bfloat16 / half
    // check_inputs allows float32 locations / weights beside a reduced-precision value only
    const auto loc_acc = loc.to(c10::CppTypeToScalarType<acc_t>::value);
    const auto attn_acc = attn.to(c10::CppTypeToScalarType<acc_t>::value);
    with_channels<acc_t>(d.D, [&](auto dc) {
      forward_kernel<value_t, acc_t, decltype(dc)::value>(
          value.data_ptr<value_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc_acc.data_ptr<acc_t>(), attn_acc.data_ptr<acc_t>(), out.data_ptr<value_t>(), d);
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
  const auto shapes = spatial_shapes_.contiguous();
  const auto starts = level_start_index_.contiguous();
  const auto loc = sampling_locations_.contiguous();
  const auto attn = attention_weights_.contiguous();
  const Dims d = dims_of(value_, loc);
  check_index_range(d);
  // Each thread owns heads; a head-major copy makes its slice of value and grad_value contiguous.
  const auto value = value_.permute({0, 2, 1, 3}).contiguous();
  auto grad_value_hm = at::zeros_like(value);
  auto grad_loc = at::zeros_like(loc);
  auto grad_attn = at::zeros_like(attn);
  if (grad_output.numel() == 0) return {grad_value_hm.permute({0, 2, 1, 3}).contiguous(), grad_loc, grad_attn};
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    with_channels<scalar_t>(d.D, [&](auto dc) {
      backward_kernel<scalar_t, decltype(dc)::value>(
          grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
          shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
          attn.data_ptr<scalar_t>(), grad_value_hm.data_ptr<scalar_t>(),
          grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), d);
    });
  });
  return {grad_value_hm.permute({0, 2, 1, 3}).contiguous(), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddetr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace ddetr
