// Batch norm with the batch's own statistics, its backward and its double backward, optionally
// followed by ReLU in the same operator:
//   fastbn_forward(x, scale, shift)                        -> y, xhat, rstd
//   fastbn_backward(xhat, rstd, scale, dy)                 -> dx, dscale, dshift
//   fastbn_double_backward(xhat, rstd, scale, dy, gx, gs, gb) -> d_x, d_scale, d_dy
//   fastbnrelu_backward(xhat, rstd, scale, shift, dz)      -> dx, dscale, dshift
//   fastbnrelu_double_backward(xhat, rstd, scale, shift, dz, gx, gs, gb) -> d_x, d_scale, d_dz
// with attributes eps (float), relu (bool: y = z = relu(batch norm)) and save (bool: output x̂
// for a backward pass, else an empty xhat) for the forward.
//
// x is [N, C, H, W]; channel c is normalised over its M = N·H·W values: mean μ, variance σ² of
// the centred values, r = 1/sqrt(σ² + eps), x̂ = (x − μ)·r, y = scale·x̂ + shift. The statistics
// are two passes with double sums (the corrected two-pass algorithm): E[x²] − E[x]² in float32
// cancels catastrophically on sparse binary images. Rows of H·W are summed in float partials,
// then in double.
//
// Backward, for g = dL/dy (means over the channel's M values):
//   dshift = Σ g,  dscale = Σ g·x̂,  dx = scale·r·(g − mean(g) − x̂·mean(g·x̂)).
// Double backward: L = <gx, dx> + <gs, dscale> + <gb, dshift> as a function of (x, scale, g).
// With ḡ = mean(g), m = mean(g·x̂), Ḡ = mean(gx), q = mean(gx·x̂), S = Σ gx·g and
// ∂x̂/∂x·v = r·(v − mean(v) − x̂·mean(x̂·v)), ∂r/∂x = −r²·x̂/M:
//   d_dy    = scale·r·gx + (gs − scale·r·q)·x̂ + gb − scale·r·Ḡ
//   d_scale = r·(S − M·ḡ·Ḡ − M·m·q)
//   d_x     = r·(u − mean(u) − x̂·mean(x̂·u)) − R·r²·x̂/M, where
//             u = (gs − scale·r·q)·g − scale·r·m·gx   (∂L/∂x̂ at fixed r) and
//             R = scale·d_scale/r                      (∂L/∂r at fixed x̂).
//
// With ReLU (the `fastbnrelu_*` operators and fastbn_forward's `relu`), the output is
// z = max(y, 0) and the incoming gradient is dL/dz. The backward passes use the mask [z > 0] (the
// one Paddle's relu_grad uses), recomputed as [y > 0] from the saved x̂ with the forward's float
// operations (bn_out), so no output needs saving: g = [y > 0]·dL/dz goes into the formulas above,
// and the double backward's d_dy (a cotangent of dL/dz) is masked the same way. The mask is
// piecewise constant in (x, scale, shift), so it contributes no other term: ReLU's second
// derivative is 0.
//
// Threads: the channels are split into contiguous ranges, one per thread, through the
// GOMP_parallel entry point of the OpenMP runtime oneDNN uses (libiomp5 in a Paddle process, see
// "Threads" in onednn.h), with `Runtime::threads` threads on shapes with at least kBnParallelWork
// values: always if PADDLE_MAML_FASTCONV_THREADS fixes the count, else where the running timings
// of class Pace find a team faster than one thread. Every channel's sums are formed by one thread
// in the same order whatever the thread count, so results are bit-identical for any number of
// threads. All passes over a channel run back to back, while its N·H·W values are in the cache.

#include "batch_norm.h"

#include <array>
#include <cmath>
#include <map>
#include <vector>

namespace fastconv {

static BnShape bn_shape(const paddle::Tensor& x) {
  auto s = x.shape();
  return {s[0], s[1], s[2] * s[3]};
}

static paddle::Tensor like_x(const paddle::Tensor& t, const paddle::Tensor& x, const char* name) {
  paddle::Tensor d = dense(t, name);
  PD_CHECK(d.shape() == x.shape(), "fastbn: ", name, " must have the shape of x");
  return d;
}

paddle::Tensor per_channel(const paddle::Tensor& t, int64_t c, const char* name) {
  PD_CHECK(t.is_cpu(), "fastbn: ", name, " must be a CPU tensor");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, "fastbn: ", name, " must be float32");
  PD_CHECK(t.numel() == c, "fastbn: ", name, " must hold one value per channel");
  return t.is_contiguous() ? t : t.contiguous();
}

constexpr int kLanes = 8;

// Σ f(i) over i < len in kLanes independent float partial sums (a row of H·W values), in double.
template <class F>
static inline double row_sum(int64_t len, F f) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int k = 0; k < kLanes; ++k) part[k] += f(i + k);
  double total = 0;
  for (; i < len; ++i) total += f(i);
  for (int k = 0; k < kLanes; ++k) total += part[k];
  return total;
}

// Σ over the channel's N rows of row_sum(H·W, f(offset of the row + i)).
template <class F>
static inline double channel_sum(const BnShape& s, int64_t c, F f) {
  double total = 0;
  for (int64_t n = 0; n < s.n; ++n) {
    const int64_t at = s.at(n, c);
    total += row_sum(s.hw, [&](int64_t i) { return f(at + i); });
  }
  return total;
}

std::mutex& pace_lock() {
  static std::mutex m;
  return m;
}

Pace& pace_of(int pass, const BnShape& s) {
  static std::map<std::array<int64_t, 4>, Pace> paces;
  return paces[{pass, s.n, s.c, s.hw}];
}

// The incoming gradient g[i] as the batch-norm formulas see it: after a fused ReLU, masked by
// [y > 0] (x̂ = h[i], scale a, shift b).
template <bool kRelu>
static inline float bn_grad(const float* g, const float* h, float a, float b, int64_t i) {
  if (kRelu) return keep_if(bn_out(h[i], a, b) > 0.0f, g[i]);
  return g[i];
}

template <bool kRelu, bool kSave>
void bn_forward(const BnShape& s, const float* xp, const float* a, const float* b, float eps,
                float* yp, float* hp, float* r) {
  for_channel_ranges(kRelu * 2 + kSave, s, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const float mean0 = static_cast<float>(channel_sum(s, c, [&](int64_t i) { return xp[i]; }) /
                                             s.count());
      double dev = 0, sq = 0;
      for (int64_t n = 0; n < s.n; ++n) {
        const float* row = xp + s.at(n, c);
        dev += row_sum(s.hw, [&](int64_t i) { return row[i] - mean0; });
        sq += row_sum(s.hw, [&](int64_t i) { return (row[i] - mean0) * (row[i] - mean0); });
      }
      const double shift_of_mean = dev / s.count();
      const double var = std::max(0.0, sq / s.count() - shift_of_mean * shift_of_mean);
      const float m = static_cast<float>(mean0 + shift_of_mean);
      const float rc = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
      const float ac = a[c], bc = b[c];
      r[c] = rc;
      for (int64_t n = 0; n < s.n; ++n) {
        const int64_t at = s.at(n, c);
        for (int64_t i = at; i < at + s.hw; ++i) {
          const float h = (xp[i] - m) * rc, y = bn_out(h, ac, bc);
          if (kSave) hp[i] = h;
          yp[i] = kRelu ? keep_if(y > 0.0f, y) : y;
        }
      }
    }
  });
}

// The fused body's blocks on plain NCHW buffers (body.cc) call this one from another file.
template void bn_forward<true, false>(const BnShape& s, const float* xp, const float* a,
                                      const float* b, float eps, float* yp, float* hp, float* r);

// Without `save` (no backward pass will follow) x̂ is not written and comes back empty ([0]).
std::vector<paddle::Tensor> BnForward(const paddle::Tensor& x_in, const paddle::Tensor& scale_in,
                                      const paddle::Tensor& shift_in, float eps, bool relu,
                                      bool save) {
  paddle::Tensor x = dense(x_in, "x");
  BnShape s = bn_shape(x);
  paddle::Tensor scale = per_channel(scale_in, s.c, "scale");
  paddle::Tensor shift = per_channel(shift_in, s.c, "shift");
  auto y = empty(x.shape()), rstd = empty({s.c});
  auto xhat = save ? empty(x.shape()) : empty({0});
  auto run = relu ? (save ? bn_forward<true, true> : bn_forward<true, false>)
                  : (save ? bn_forward<false, true> : bn_forward<false, false>);
  run(s, ptr(x), ptr(scale), ptr(shift), eps, ptr(y), save ? ptr(xhat) : nullptr, ptr(rstd));
  return {y, xhat, rstd};
}

template <bool kRelu>
static void bn_backward(const BnShape& s, const float* hp, const float* r, const float* a,
                        const float* b, const float* gp, float* dxp, float* ds, float* db) {
  for_channel_ranges(4 + kRelu, s, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const float ac = a[c], bc = kRelu ? b[c] : 0.0f;
      double sg = 0, sgh = 0;
      for (int64_t n = 0; n < s.n; ++n) {
        const int64_t at = s.at(n, c);
        auto g = [&](int64_t i) { return bn_grad<kRelu>(gp, hp, ac, bc, at + i); };
        sg += row_sum(s.hw, [&](int64_t i) { return g(i); });
        sgh += row_sum(s.hw, [&](int64_t i) { return g(i) * hp[at + i]; });
      }
      ds[c] = static_cast<float>(sgh);
      db[c] = static_cast<float>(sg);
      const float kc = ac * r[c], g0 = static_cast<float>(sg / s.count()),
                  gh = static_cast<float>(sgh / s.count());
      for (int64_t n = 0; n < s.n; ++n) {
        const int64_t at = s.at(n, c);
        for (int64_t i = at; i < at + s.hw; ++i)
          dxp[i] = kc * (bn_grad<kRelu>(gp, hp, ac, bc, i) - g0 - hp[i] * gh);
      }
    }
  });
}

// fastbn_backward (no shift) and fastbnrelu_backward (the forward's shift, for the ReLU mask).
static std::vector<paddle::Tensor> bn_backward_op(const paddle::Tensor& xhat_in,
                                                  const paddle::Tensor& rstd_in,
                                                  const paddle::Tensor& scale_in,
                                                  const paddle::Tensor* shift_in,
                                                  const paddle::Tensor& dy_in) {
  paddle::Tensor xhat = dense(xhat_in, "xhat");
  BnShape s = bn_shape(xhat);
  paddle::Tensor dy = like_x(dy_in, xhat, "dy");
  paddle::Tensor rstd = per_channel(rstd_in, s.c, "rstd");
  paddle::Tensor scale = per_channel(scale_in, s.c, "scale");
  paddle::Tensor shift = shift_in ? per_channel(*shift_in, s.c, "shift") : scale;
  auto dx = empty(xhat.shape()), dscale = empty({s.c}), dshift = empty({s.c});
  auto run = shift_in ? bn_backward<true> : bn_backward<false>;
  run(s, ptr(xhat), ptr(rstd), ptr(scale), ptr(shift), ptr(dy), ptr(dx), ptr(dscale),
      ptr(dshift));
  return {dx, dscale, dshift};
}

std::vector<paddle::Tensor> BnBackward(const paddle::Tensor& xhat, const paddle::Tensor& rstd,
                                       const paddle::Tensor& scale, const paddle::Tensor& dy) {
  return bn_backward_op(xhat, rstd, scale, nullptr, dy);
}

std::vector<paddle::Tensor> BnReluBackward(const paddle::Tensor& xhat, const paddle::Tensor& rstd,
                                           const paddle::Tensor& scale,
                                           const paddle::Tensor& shift, const paddle::Tensor& dz) {
  return bn_backward_op(xhat, rstd, scale, &shift, dz);
}

struct BnDoubleBackwardArgs {
  const float *hp, *gp, *xp, *r, *a, *b, *gsp, *gbp;
  float *dxp, *dsp, *ddp;
};

template <bool kRelu>
static void bn_double_backward(const BnShape& s, const BnDoubleBackwardArgs& p) {
  const double count = s.count();
  for_channel_ranges(6 + kRelu, s, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const float ac32 = p.a[c], bc32 = kRelu ? p.b[c] : 0.0f;
      double sg = 0, sgh = 0, sx = 0, sxh = 0, sxg = 0;
      for (int64_t n = 0; n < s.n; ++n) {
        const int64_t at = s.at(n, c);
        const float *h = p.hp + at, *v = p.xp + at;
        auto g = [&](int64_t i) { return bn_grad<kRelu>(p.gp, p.hp, ac32, bc32, at + i); };
        sg += row_sum(s.hw, [&](int64_t i) { return g(i); });
        sgh += row_sum(s.hw, [&](int64_t i) { return g(i) * h[i]; });
        sx += row_sum(s.hw, [&](int64_t i) { return v[i]; });
        sxh += row_sum(s.hw, [&](int64_t i) { return v[i] * h[i]; });
        sxg += row_sum(s.hw, [&](int64_t i) { return v[i] * g(i); });
      }
      // d_x = α·g + β·gx + γ·x̂ + δ and d_dy = κ·gx + λ·x̂ + ν (see the comment above).
      const double rc = p.r[c], ac = ac32, k = ac * rc;
      const double gbar = sg / count, m = sgh / count, xbar = sx / count, q = sxh / count;
      const double dscale = rc * (sxg - sg * xbar - sgh * q);
      const double big_r = ac * dscale / rc;
      const double w = p.gsp[c] - k * q;  // u = w·g − k·m·gx
      const double mean_u = w * gbar - k * m * xbar;
      const double mean_hu = w * m - k * m * q;
      p.dsp[c] = static_cast<float>(dscale);
      const float al = static_cast<float>(rc * w), be = static_cast<float>(-rc * k * m),
                  ga = static_cast<float>(-rc * mean_hu - big_r * rc * rc / count),
                  de = static_cast<float>(-rc * mean_u), ka = static_cast<float>(k),
                  la = static_cast<float>(w), nc = static_cast<float>(p.gbp[c] - k * xbar);
      for (int64_t n = 0; n < s.n; ++n) {
        const int64_t at = s.at(n, c);
        for (int64_t i = at; i < at + s.hw; ++i) {
          const float v = p.xp[i], h = p.hp[i];
          const bool open = !kRelu || bn_out(h, ac32, bc32) > 0.0f;  // the ReLU mask
          const float g = keep_if(open, p.gp[i]);
          p.dxp[i] = al * g + be * v + ga * h + de;
          p.ddp[i] = keep_if(open, ka * v + la * h + nc);
        }
      }
    }
  });
}

// fastbn_double_backward (no shift) and fastbnrelu_double_backward (the forward's shift, for the
// ReLU mask).
static std::vector<paddle::Tensor> bn_double_backward_op(
    const paddle::Tensor& xhat_in, const paddle::Tensor& rstd_in, const paddle::Tensor& scale_in,
    const paddle::Tensor* shift_in, const paddle::Tensor& dy_in, const paddle::Tensor& gx_in,
    const paddle::Tensor& gs_in, const paddle::Tensor& gb_in) {
  paddle::Tensor xhat = dense(xhat_in, "xhat");
  BnShape s = bn_shape(xhat);
  paddle::Tensor dy = like_x(dy_in, xhat, "dy"), gx = like_x(gx_in, xhat, "gx");
  paddle::Tensor rstd = per_channel(rstd_in, s.c, "rstd");
  paddle::Tensor scale = per_channel(scale_in, s.c, "scale");
  paddle::Tensor shift = shift_in ? per_channel(*shift_in, s.c, "shift") : scale;
  paddle::Tensor gs = per_channel(gs_in, s.c, "gs"), gb = per_channel(gb_in, s.c, "gb");
  auto d_x = empty(xhat.shape()), d_dy = empty(xhat.shape()), d_scale = empty({s.c});
  BnDoubleBackwardArgs args{ptr(xhat), ptr(dy), ptr(gx),  ptr(rstd),    ptr(scale), ptr(shift),
                            ptr(gs),   ptr(gb), ptr(d_x), ptr(d_scale), ptr(d_dy)};
  (shift_in ? bn_double_backward<true> : bn_double_backward<false>)(s, args);
  return {d_x, d_scale, d_dy};
}

std::vector<paddle::Tensor> BnDoubleBackward(
    const paddle::Tensor& xhat, const paddle::Tensor& rstd, const paddle::Tensor& scale,
    const paddle::Tensor& dy, const paddle::Tensor& gx, const paddle::Tensor& gs,
    const paddle::Tensor& gb) {
  return bn_double_backward_op(xhat, rstd, scale, nullptr, dy, gx, gs, gb);
}

std::vector<paddle::Tensor> BnReluDoubleBackward(
    const paddle::Tensor& xhat, const paddle::Tensor& rstd, const paddle::Tensor& scale,
    const paddle::Tensor& shift, const paddle::Tensor& dz, const paddle::Tensor& gx,
    const paddle::Tensor& gs, const paddle::Tensor& gb) {
  return bn_double_backward_op(xhat, rstd, scale, &shift, dz, gx, gs, gb);
}

std::vector<std::vector<int64_t>> BnForwardShape(const std::vector<int64_t>& x,
                                                 const std::vector<int64_t>& scale,
                                                 const std::vector<int64_t>& shift, float eps,
                                                 bool relu, bool save) {
  return {x, save ? x : std::vector<int64_t>{0}, {x[1]}};
}

std::vector<std::vector<int64_t>> BnBackwardShape(const std::vector<int64_t>& xhat,
                                                  const std::vector<int64_t>& rstd,
                                                  const std::vector<int64_t>& scale,
                                                  const std::vector<int64_t>& dy) {
  return {xhat, {xhat[1]}, {xhat[1]}};
}

std::vector<std::vector<int64_t>> BnReluBackwardShape(const std::vector<int64_t>& xhat,
                                                      const std::vector<int64_t>& rstd,
                                                      const std::vector<int64_t>& scale,
                                                      const std::vector<int64_t>& shift,
                                                      const std::vector<int64_t>& dz) {
  return {xhat, {xhat[1]}, {xhat[1]}};
}

std::vector<std::vector<int64_t>> BnDoubleBackwardShape(
    const std::vector<int64_t>& xhat, const std::vector<int64_t>& rstd,
    const std::vector<int64_t>& scale, const std::vector<int64_t>& dy,
    const std::vector<int64_t>& gx, const std::vector<int64_t>& gs,
    const std::vector<int64_t>& gb) {
  return {xhat, {xhat[1]}, xhat};
}

std::vector<std::vector<int64_t>> BnReluDoubleBackwardShape(
    const std::vector<int64_t>& xhat, const std::vector<int64_t>& rstd,
    const std::vector<int64_t>& scale, const std::vector<int64_t>& shift,
    const std::vector<int64_t>& dz, const std::vector<int64_t>& gx,
    const std::vector<int64_t>& gs, const std::vector<int64_t>& gb) {
  return {xhat, {xhat[1]}, xhat};
}

std::vector<paddle::DataType> BnForwardDtype(const paddle::DataType& x, const paddle::DataType& a,
                                             const paddle::DataType& b) {
  return {x, x, x};
}

std::vector<paddle::DataType> BnBackwardDtype(const paddle::DataType& xhat,
                                              const paddle::DataType& rstd,
                                              const paddle::DataType& scale,
                                              const paddle::DataType& dy) {
  return {xhat, xhat, xhat};
}

std::vector<paddle::DataType> BnReluBackwardDtype(const paddle::DataType& xhat,
                                                  const paddle::DataType& rstd,
                                                  const paddle::DataType& scale,
                                                  const paddle::DataType& shift,
                                                  const paddle::DataType& dz) {
  return {xhat, xhat, xhat};
}

std::vector<paddle::DataType> BnDoubleBackwardDtype(
    const paddle::DataType& xhat, const paddle::DataType& rstd, const paddle::DataType& scale,
    const paddle::DataType& dy, const paddle::DataType& gx, const paddle::DataType& gs,
    const paddle::DataType& gb) {
  return {xhat, xhat, xhat};
}

std::vector<paddle::DataType> BnReluDoubleBackwardDtype(
    const paddle::DataType& xhat, const paddle::DataType& rstd, const paddle::DataType& scale,
    const paddle::DataType& shift, const paddle::DataType& dz, const paddle::DataType& gx,
    const paddle::DataType& gs, const paddle::DataType& gb) {
  return {xhat, xhat, xhat};
}

}  // namespace fastconv

PD_BUILD_OP(fastbn_forward)
    .Inputs({"X", "Scale", "Shift"})
    .Outputs({"Y", "XHat", "RStd"})
    .Attrs({"eps: float", "relu: bool", "save: bool"})
    .SetKernelFn(PD_KERNEL(fastconv::BnForward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BnForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BnForwardDtype));

PD_BUILD_OP(fastbn_backward)
    .Inputs({"XHat", "RStd", "Scale", "DY"})
    .Outputs({"DX", "DScale", "DShift"})
    .SetKernelFn(PD_KERNEL(fastconv::BnBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BnBackwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BnBackwardDtype));

PD_BUILD_OP(fastbn_double_backward)
    .Inputs({"XHat", "RStd", "Scale", "DY", "GX", "GScale", "GShift"})
    .Outputs({"D_X", "D_Scale", "D_DY"})
    .SetKernelFn(PD_KERNEL(fastconv::BnDoubleBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BnDoubleBackwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BnDoubleBackwardDtype));

PD_BUILD_OP(fastbnrelu_backward)
    .Inputs({"XHat", "RStd", "Scale", "Shift", "DZ"})
    .Outputs({"DX", "DScale", "DShift"})
    .SetKernelFn(PD_KERNEL(fastconv::BnReluBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BnReluBackwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BnReluBackwardDtype));

PD_BUILD_OP(fastbnrelu_double_backward)
    .Inputs({"XHat", "RStd", "Scale", "Shift", "DZ", "GX", "GScale", "GShift"})
    .Outputs({"D_X", "D_Scale", "D_DZ"})
    .SetKernelFn(PD_KERNEL(fastconv::BnReluDoubleBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BnReluDoubleBackwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BnReluDoubleBackwardDtype));
