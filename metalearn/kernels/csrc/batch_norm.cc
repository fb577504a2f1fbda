// Batch norm with the batch's own statistics, its backward and its double backward, optionally
// followed by ReLU in the same operator:
//   fastbn_forward(x, scale, shift)                              -> y, mean, rstd
//   fastbn_backward(x, mean, rstd, scale, dy)                    -> dx, dscale, dshift
//   fastbn_double_backward(x, mean, rstd, scale, dy, gx, gs, gb) -> d_x, d_scale, d_dy
//   fastbnrelu_backward(x, mean, rstd, scale, shift, dz)         -> dx, dscale, dshift
//   fastbnrelu_double_backward(x, mean, rstd, scale, shift, dz, gx, gs, gb)
//                                                                -> d_x, d_scale, d_dz
// with attributes eps (float) and relu (bool: y = z = relu(batch norm)) for the forward, and
// block (int) for all: 1 when the
// [N, C, H, W] tensors hold plain NCHW, B (8 or 16, dividing C) when they hold the channel-blocked
// layout nChw{B}c of oneDNN's convolutions (channel c = cb·B + l of pixel p at
// ((n·C/B + cb)·H·W + p)·B + l), which the training path keeps between its convolutions.
//
// x is [N, C, H, W]; channel c is normalised over its M = N·H·W values: mean μ, variance σ² of
// the centred values, r = 1/sqrt(σ² + eps), x̂ = (x − μ)·r, y = scale·x̂ + shift. The statistics
// are two passes with double sums (the corrected two-pass algorithm): E[x²] − E[x]² in float32
// cancels catastrophically on sparse binary images. Rows of H·W are summed in float partials,
// then in double. On nChw{B}c each image's row of a block (H·W·B values, in L1) is taken twice
// in a row, its mean and then its squared deviations from it, and the rows are combined in
// double by Chan's update: one pass over the block instead of two.
//
// The backward passes take x with the forward's μ and r and recompute x̂ = (x − μ)·r with the
// forward's float operations, bit for bit the x̂ the forward used: no x̂ is written or kept (one
// tensor of x's size less per layer, and one write less in the forward).
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
// one Paddle's relu_grad uses), recomputed as [y > 0] from x̂ with the forward's float
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
// On nChw{B}c the loops take a block of B channels at a time, one channel per lane (the
// per-channel arithmetic is the same; each lane's sums are float partials over one image's
// positions, then double).

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

RangeFn for_this_cpu(RangeFn avx512, RangeFn avx2, RangeFn baseline) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2;
  return baseline;
}

// x̂ of value v in a channel of mean m and r = rc: the forward's own expression.
inline float bn_hat(float v, float m, float rc) { return (v - m) * rc; }

// The incoming gradient g as the batch-norm formulas see it: after a fused ReLU, masked by
// [y > 0] (x̂ = h, scale a, shift b).
template <bool kRelu>
static inline float bn_grad(float g, float h, float a, float b) {
  if (kRelu) return keep_if(bn_out(h, a, b) > 0.0f, g);
  return g;
}

// The mean m and r = 1/sqrt(σ² + eps) of a channel of `count` values from its mean and the sum
// of its squared deviations, both in double.
static inline void finish_stats(double mean, double squares, double count, float eps, float* m,
                                float* rc) {
  *m = static_cast<float>(mean);
  *rc = static_cast<float>(1.0 / std::sqrt(std::max(0.0, squares / count) +
                                           static_cast<double>(eps)));
}

template <bool kRelu>
void bn_forward(const BnShape& s, const float* xp, const float* a, const float* b, float eps,
                float* yp, float* mp, float* r) {
  for_channel_ranges(kRelu, s, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const float mean0 = static_cast<float>(channel_sum(s, c, [&](int64_t i) { return xp[i]; }) /
                                             s.count());
      double dev = 0, sq = 0;
      for (int64_t n = 0; n < s.n; ++n) {
        const float* row = xp + s.at(n, c);
        dev += row_sum(s.hw, [&](int64_t i) { return row[i] - mean0; });
        sq += row_sum(s.hw, [&](int64_t i) { return (row[i] - mean0) * (row[i] - mean0); });
      }
      // Σ (x − μ)² = Σ (x − mean0)² − M·(μ − mean0)² with μ − mean0 = dev / M.
      const double shift_of_mean = dev / s.count();
      float m, rc;
      finish_stats(mean0 + shift_of_mean, sq - dev * shift_of_mean, s.count(), eps, &m, &rc);
      const float ac = a[c], bc = b[c];
      mp[c] = m;
      r[c] = rc;
      for (int64_t n = 0; n < s.n; ++n) {
        const int64_t at = s.at(n, c);
        for (int64_t i = at; i < at + s.hw; ++i) {
          const float y = bn_out(bn_hat(xp[i], m, rc), ac, bc);
          yp[i] = kRelu ? keep_if(y > 0.0f, y) : y;
        }
      }
    }
  });
}

// The fused body's blocks on plain NCHW buffers (body.cc) call this one from another file.
template void bn_forward<true>(const BnShape& s, const float* xp, const float* a, const float* b,
                               float eps, float* yp, float* mp, float* r);

// Pace keys of the nChw{B}c loops: kBlockedPass + the plain loop's key.
constexpr int kBlockedPass = 16;

// s as blocks of B channels: BnShape::at(image, block) is where the block's hw·B values start.
template <int B>
static BnShape blocks_of(const BnShape& s) {
  return {s.n, s.c / B, s.hw * B};
}

struct BnForwardArgs {
  const BnShape* s;
  const float *xp, *a, *b;
  float eps;
  float *yp, *mp, *r;
};

// Blocks [first, last) of the forward pass (run_ranges kernel).
template <int B, bool kRelu>
struct BnForwardBlocks {
  using Args = BnForwardArgs;
  static void run(const Args& args, int64_t first, int64_t last) {
    const BnShape& s = *args.s;
    const float *xp = args.xp, *a = args.a, *b = args.b;
    const float eps = args.eps;
    float *yp = args.yp, *mp = args.mp, *r = args.r;
    const BnShape blocks = blocks_of<B>(s);
    const double row_count = static_cast<double>(s.hw);
    for (int64_t cb = first; cb < last; ++cb) {
      double mean[B] = {}, squares[B] = {};  // of the images so far (Chan's update)
      for (int64_t image = 0; image < s.n; ++image) {
        const float* v = xp + blocks.at(image, cb);
        float part[B] = {};
        for (int64_t i = 0; i < s.hw; ++i)
          for (int l = 0; l < B; ++l) part[l] += v[i * B + l];
        float row_mean[B], part_dev[B] = {}, part_sq[B] = {};
        for (int l = 0; l < B; ++l) row_mean[l] = static_cast<float>(part[l] / row_count);
        for (int64_t i = 0; i < s.hw; ++i)
          for (int l = 0; l < B; ++l) {
            const float d = v[i * B + l] - row_mean[l];
            part_dev[l] += d;
            part_sq[l] += d * d;
          }
        const double before = static_cast<double>(image) * row_count, after = before + row_count;
        for (int l = 0; l < B; ++l) {
          // The row's mean and squared deviations, corrected for the rounding of its float mean
          // (as the plain loop's), then merged with the rows before it.
          const double dev = part_dev[l], shift_of_mean = dev / row_count;
          const double delta = row_mean[l] + shift_of_mean - mean[l];
          mean[l] += delta * row_count / after;
          squares[l] += part_sq[l] - dev * shift_of_mean + delta * delta * before * row_count / after;
        }
      }
      float m[B], rc[B], ac[B], bc[B];
      for (int l = 0; l < B; ++l) {
        finish_stats(mean[l], squares[l], s.count(), eps, &m[l], &rc[l]);
        mp[cb * B + l] = m[l];
        r[cb * B + l] = rc[l];
        ac[l] = a[cb * B + l];
        bc[l] = b[cb * B + l];
      }
      for (int64_t image = 0; image < s.n; ++image) {
        const int64_t at = blocks.at(image, cb);
        for (int64_t i = 0; i < s.hw; ++i)
          for (int l = 0; l < B; ++l) {
            const int64_t k = at + i * B + l;
            const float y = bn_out(bn_hat(xp[k], m[l], rc[l]), ac[l], bc[l]);
            yp[k] = kRelu ? keep_if(y > 0.0f, y) : y;
          }
      }
    }
  }
};

template <int B, bool kRelu>
void bn_forward_blocked(const BnShape& s, const float* xp, const float* a, const float* b,
                        float eps, float* yp, float* mp, float* r) {
  const BnForwardArgs args{&s, xp, a, b, eps, yp, mp, r};
  run_ranges<BnForwardBlocks<B, kRelu>>(kBlockedPass + kRelu, blocks_of<B>(s), args);
}

// The fused body (body.cc) runs its blocks in place with these.
template void bn_forward_blocked<8, true>(const BnShape& s, const float* xp, const float* a,
                                          const float* b, float eps, float* yp, float* mp,
                                          float* r);
template void bn_forward_blocked<16, true>(const BnShape& s, const float* xp, const float* a,
                                           const float* b, float eps, float* yp, float* mp,
                                           float* r);

static void check_block(const BnShape& s, int block) {
  PD_CHECK(block == 1 || ((block == 8 || block == 16) && s.c % block == 0),
           "fastbn: block must be 1, or 8 or 16 dividing the channels");
}

// The loop of each pass for activations in `block` (1: plain NCHW, else nChw{block}c).
using ForwardFn = void (*)(const BnShape&, const float*, const float*, const float*, float, float*,
                           float*, float*);

template <bool kRelu>
static ForwardFn forward_fn(int block) {
  if (block == 8) return bn_forward_blocked<8, kRelu>;
  if (block == 16) return bn_forward_blocked<16, kRelu>;
  return bn_forward<kRelu>;
}

std::vector<paddle::Tensor> BnForward(const paddle::Tensor& x_in, const paddle::Tensor& scale_in,
                                      const paddle::Tensor& shift_in, float eps, bool relu,
                                      int block) {
  paddle::Tensor x = dense(x_in, "x");
  BnShape s = bn_shape(x);
  check_block(s, block);
  paddle::Tensor scale = per_channel(scale_in, s.c, "scale");
  paddle::Tensor shift = per_channel(shift_in, s.c, "shift");
  auto y = empty(x.shape()), mean = empty({s.c}), rstd = empty({s.c});
  (relu ? forward_fn<true>(block) : forward_fn<false>(block))(
      s, ptr(x), ptr(scale), ptr(shift), eps, ptr(y), ptr(mean), ptr(rstd));
  return {y, mean, rstd};
}

// What the backward passes read: x, the forward's statistics, scale, shift (after a fused ReLU)
// and the incoming gradient g.
struct BnSaved {
  const float *xp, *mp, *r, *a, *b, *gp;
};

template <bool kRelu>
static void bn_backward(const BnShape& s, const BnSaved& p, float* dxp, float* ds, float* db) {
  for_channel_ranges(4 + kRelu, s, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const float ac = p.a[c], bc = kRelu ? p.b[c] : 0.0f, m = p.mp[c], rc = p.r[c];
      double sg = 0, sgh = 0;
      for (int64_t n = 0; n < s.n; ++n) {
        const float *x = p.xp + s.at(n, c), *gr = p.gp + s.at(n, c);
        auto g = [&](int64_t i) { return bn_grad<kRelu>(gr[i], bn_hat(x[i], m, rc), ac, bc); };
        sg += row_sum(s.hw, [&](int64_t i) { return g(i); });
        sgh += row_sum(s.hw, [&](int64_t i) { return g(i) * bn_hat(x[i], m, rc); });
      }
      ds[c] = static_cast<float>(sgh);
      db[c] = static_cast<float>(sg);
      const float kc = ac * rc, g0 = static_cast<float>(sg / s.count()),
                  gh = static_cast<float>(sgh / s.count());
      for (int64_t n = 0; n < s.n; ++n) {
        const int64_t at = s.at(n, c);
        for (int64_t i = at; i < at + s.hw; ++i) {
          const float h = bn_hat(p.xp[i], m, rc);
          dxp[i] = kc * (bn_grad<kRelu>(p.gp[i], h, ac, bc) - g0 - h * gh);
        }
      }
    }
  });
}

// The scale a, shift b (after a fused ReLU), mean m and r of block cb's B channels.
template <int B, bool kRelu>
static inline void block_lanes(const BnSaved& p, int64_t cb, float* ac, float* bc, float* m,
                               float* rc) {
  for (int l = 0; l < B; ++l) {
    const int64_t c = cb * B + l;
    ac[l] = p.a[c];
    bc[l] = kRelu ? p.b[c] : 0.0f;
    m[l] = p.mp[c];
    rc[l] = p.r[c];
  }
}

struct BnBackwardArgs {
  const BnShape* s;
  BnSaved p;
  float *dxp, *ds, *db;
};

// Blocks [first, last) of the backward pass (run_ranges kernel).
template <int B, bool kRelu>
struct BnBackwardBlocks {
  using Args = BnBackwardArgs;
  static void run(const Args& args, int64_t first, int64_t last) {
    const BnShape& s = *args.s;
    const BnSaved& p = args.p;
    float *dxp = args.dxp, *ds = args.ds, *db = args.db;
    const BnShape blocks = blocks_of<B>(s);
    for (int64_t cb = first; cb < last; ++cb) {
      float ac[B], bc[B], m[B], rc[B];
      block_lanes<B, kRelu>(p, cb, ac, bc, m, rc);
      double sg[B] = {}, sgh[B] = {};
      for (int64_t image = 0; image < s.n; ++image) {
        const int64_t at = blocks.at(image, cb);
        float part_g[B] = {}, part_gh[B] = {};
        for (int64_t i = 0; i < s.hw; ++i)
          for (int l = 0; l < B; ++l) {
            const int64_t k = at + i * B + l;
            const float h = bn_hat(p.xp[k], m[l], rc[l]);
            const float g = bn_grad<kRelu>(p.gp[k], h, ac[l], bc[l]);
            part_g[l] += g;
            part_gh[l] += g * h;
          }
        for (int l = 0; l < B; ++l) sg[l] += part_g[l], sgh[l] += part_gh[l];
      }
      float kc[B], g0[B], gh[B];
      for (int l = 0; l < B; ++l) {
        ds[cb * B + l] = static_cast<float>(sgh[l]);
        db[cb * B + l] = static_cast<float>(sg[l]);
        kc[l] = ac[l] * rc[l];
        g0[l] = static_cast<float>(sg[l] / s.count());
        gh[l] = static_cast<float>(sgh[l] / s.count());
      }
      for (int64_t image = 0; image < s.n; ++image) {
        const int64_t at = blocks.at(image, cb);
        for (int64_t i = 0; i < s.hw; ++i)
          for (int l = 0; l < B; ++l) {
            const int64_t k = at + i * B + l;
            const float h = bn_hat(p.xp[k], m[l], rc[l]);
            dxp[k] = kc[l] * (bn_grad<kRelu>(p.gp[k], h, ac[l], bc[l]) - g0[l] - h * gh[l]);
          }
      }
    }
  }
};

template <int B, bool kRelu>
static void bn_backward_blocked(const BnShape& s, const BnSaved& p, float* dxp, float* ds,
                                float* db) {
  const BnBackwardArgs args{&s, p, dxp, ds, db};
  run_ranges<BnBackwardBlocks<B, kRelu>>(kBlockedPass + 4 + kRelu, blocks_of<B>(s), args);
}

using BackwardFn = void (*)(const BnShape&, const BnSaved&, float*, float*, float*);

template <bool kRelu>
static BackwardFn backward_fn(int block) {
  if (block == 8) return bn_backward_blocked<8, kRelu>;
  if (block == 16) return bn_backward_blocked<16, kRelu>;
  return bn_backward<kRelu>;
}

// The inputs every backward operator shares, checked against x.
struct BnInputs {
  paddle::Tensor x, mean, rstd, scale, shift, dy;
  BnShape s;
  BnSaved saved() const {
    return {ptr(x), ptr(mean), ptr(rstd), ptr(scale), ptr(shift), ptr(dy)};
  }
};

static BnInputs bn_inputs(const paddle::Tensor& x_in, const paddle::Tensor& mean_in,
                          const paddle::Tensor& rstd_in, const paddle::Tensor& scale_in,
                          const paddle::Tensor* shift_in, const paddle::Tensor& dy_in,
                          int block) {
  paddle::Tensor x = dense(x_in, "x");
  BnShape s = bn_shape(x);
  check_block(s, block);
  paddle::Tensor scale = per_channel(scale_in, s.c, "scale");
  return {x,
          per_channel(mean_in, s.c, "mean"),
          per_channel(rstd_in, s.c, "rstd"),
          scale,
          shift_in ? per_channel(*shift_in, s.c, "shift") : scale,
          like_x(dy_in, x, "dy"),
          s};
}

// fastbn_backward (no shift) and fastbnrelu_backward (the forward's shift, for the ReLU mask).
static std::vector<paddle::Tensor> bn_backward_op(const paddle::Tensor& x,
                                                  const paddle::Tensor& mean,
                                                  const paddle::Tensor& rstd,
                                                  const paddle::Tensor& scale,
                                                  const paddle::Tensor* shift,
                                                  const paddle::Tensor& dy, int block) {
  BnInputs in = bn_inputs(x, mean, rstd, scale, shift, dy, block);
  auto dx = empty(in.x.shape()), dscale = empty({in.s.c}), dshift = empty({in.s.c});
  (shift ? backward_fn<true>(block) : backward_fn<false>(block))(in.s, in.saved(), ptr(dx),
                                                                 ptr(dscale), ptr(dshift));
  return {dx, dscale, dshift};
}

std::vector<paddle::Tensor> BnBackward(const paddle::Tensor& x, const paddle::Tensor& mean,
                                       const paddle::Tensor& rstd, const paddle::Tensor& scale,
                                       const paddle::Tensor& dy, int block) {
  return bn_backward_op(x, mean, rstd, scale, nullptr, dy, block);
}

std::vector<paddle::Tensor> BnReluBackward(const paddle::Tensor& x, const paddle::Tensor& mean,
                                           const paddle::Tensor& rstd, const paddle::Tensor& scale,
                                           const paddle::Tensor& shift, const paddle::Tensor& dz,
                                           int block) {
  return bn_backward_op(x, mean, rstd, scale, &shift, dz, block);
}

// The double backward's cotangents (gx of dx, gs of dscale, gb of dshift) and outputs.
struct BnCotangents {
  const float *gxp, *gsp, *gbp;
  float *dxp, *dsp, *ddp;
};

// One channel's double backward from its sums Σg, Σg·x̂, Σgx, Σgx·x̂, Σgx·g (g masked after a
// fused ReLU): d_scale, and d_x = α·g + β·gx + γ·x̂ + δ, d_dy = κ·gx + λ·x̂ + ν elementwise (see
// the comment above).
struct BnDoubleCoefficients {
  float d_scale, al, be, ga, de, ka, la, nc;
};

static inline BnDoubleCoefficients bn_double_coefficients(double sg, double sgh, double sx,
                                                          double sxh, double sxg, double count,
                                                          float r, float a, float gs, float gb) {
  const double rc = r, ac = a, k = ac * rc;
  const double gbar = sg / count, m = sgh / count, xbar = sx / count, q = sxh / count;
  const double dscale = rc * (sxg - sg * xbar - sgh * q);
  const double big_r = ac * dscale / rc;
  const double w = gs - k * q;  // u = w·g − k·m·gx
  const double mean_u = w * gbar - k * m * xbar;
  const double mean_hu = w * m - k * m * q;
  return {static_cast<float>(dscale),
          static_cast<float>(rc * w),
          static_cast<float>(-rc * k * m),
          static_cast<float>(-rc * mean_hu - big_r * rc * rc / count),
          static_cast<float>(-rc * mean_u),
          static_cast<float>(k),
          static_cast<float>(w),
          static_cast<float>(gb - k * xbar)};
}

// Element i of the double backward's outputs, given its channel's coefficients, x̂ = h.
template <bool kRelu>
static inline void bn_double_outputs(const BnSaved& p, const BnCotangents& q,
                                     const BnDoubleCoefficients& f, float h, float a, float b,
                                     int64_t i) {
  const float v = q.gxp[i];
  const bool open = !kRelu || bn_out(h, a, b) > 0.0f;  // the ReLU mask
  const float g = keep_if(open, p.gp[i]);
  q.dxp[i] = f.al * g + f.be * v + f.ga * h + f.de;
  q.ddp[i] = keep_if(open, f.ka * v + f.la * h + f.nc);
}

template <bool kRelu>
static void bn_double_backward(const BnShape& s, const BnSaved& p, const BnCotangents& q) {
  for_channel_ranges(6 + kRelu, s, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const float ac = p.a[c], bc = kRelu ? p.b[c] : 0.0f, m = p.mp[c], rc = p.r[c];
      double sg = 0, sgh = 0, sx = 0, sxh = 0, sxg = 0;
      for (int64_t n = 0; n < s.n; ++n) {
        const int64_t at = s.at(n, c);
        const float *x = p.xp + at, *gr = p.gp + at, *v = q.gxp + at;
        auto h = [&](int64_t i) { return bn_hat(x[i], m, rc); };
        auto g = [&](int64_t i) { return bn_grad<kRelu>(gr[i], h(i), ac, bc); };
        sg += row_sum(s.hw, [&](int64_t i) { return g(i); });
        sgh += row_sum(s.hw, [&](int64_t i) { return g(i) * h(i); });
        sx += row_sum(s.hw, [&](int64_t i) { return v[i]; });
        sxh += row_sum(s.hw, [&](int64_t i) { return v[i] * h(i); });
        sxg += row_sum(s.hw, [&](int64_t i) { return v[i] * g(i); });
      }
      const BnDoubleCoefficients f =
          bn_double_coefficients(sg, sgh, sx, sxh, sxg, s.count(), rc, ac, q.gsp[c], q.gbp[c]);
      q.dsp[c] = f.d_scale;
      for (int64_t n = 0; n < s.n; ++n) {
        const int64_t at = s.at(n, c);
        for (int64_t i = at; i < at + s.hw; ++i)
          bn_double_outputs<kRelu>(p, q, f, bn_hat(p.xp[i], m, rc), ac, bc, i);
      }
    }
  });
}

struct BnDoubleBackwardArgs {
  const BnShape* s;
  BnSaved p;
  BnCotangents q;
};

// Blocks [first, last) of the double backward (run_ranges kernel).
template <int B, bool kRelu>
struct BnDoubleBackwardBlocks {
  using Args = BnDoubleBackwardArgs;
  static void run(const Args& args, int64_t first, int64_t last) {
    const BnShape& s = *args.s;
    const BnSaved& p = args.p;
    const BnCotangents& q = args.q;
    const BnShape blocks = blocks_of<B>(s);
    for (int64_t cb = first; cb < last; ++cb) {
      float ac[B], bc[B], m[B], rc[B];
      block_lanes<B, kRelu>(p, cb, ac, bc, m, rc);
      double sg[B] = {}, sgh[B] = {}, sx[B] = {}, sxh[B] = {}, sxg[B] = {};
      for (int64_t image = 0; image < s.n; ++image) {
        const int64_t at = blocks.at(image, cb);
        float pg[B] = {}, pgh[B] = {}, px[B] = {}, pxh[B] = {}, pxg[B] = {};
        for (int64_t i = 0; i < s.hw; ++i)
          for (int l = 0; l < B; ++l) {
            const int64_t k = at + i * B + l;
            const float h = bn_hat(p.xp[k], m[l], rc[l]);
            const float g = bn_grad<kRelu>(p.gp[k], h, ac[l], bc[l]), v = q.gxp[k];
            pg[l] += g, pgh[l] += g * h, px[l] += v, pxh[l] += v * h, pxg[l] += v * g;
          }
        for (int l = 0; l < B; ++l)
          sg[l] += pg[l], sgh[l] += pgh[l], sx[l] += px[l], sxh[l] += pxh[l], sxg[l] += pxg[l];
      }
      BnDoubleCoefficients f[B];
      for (int l = 0; l < B; ++l) {
        const int64_t c = cb * B + l;
        f[l] = bn_double_coefficients(sg[l], sgh[l], sx[l], sxh[l], sxg[l], s.count(), rc[l],
                                      ac[l], q.gsp[c], q.gbp[c]);
        q.dsp[c] = f[l].d_scale;
      }
      for (int64_t image = 0; image < s.n; ++image) {
        const int64_t at = blocks.at(image, cb);
        for (int64_t i = 0; i < s.hw; ++i)
          for (int l = 0; l < B; ++l) {
            const int64_t k = at + i * B + l;
            bn_double_outputs<kRelu>(p, q, f[l], bn_hat(p.xp[k], m[l], rc[l]), ac[l], bc[l], k);
          }
      }
    }
  }
};

template <int B, bool kRelu>
static void bn_double_backward_blocked(const BnShape& s, const BnSaved& p,
                                       const BnCotangents& q) {
  const BnDoubleBackwardArgs args{&s, p, q};
  run_ranges<BnDoubleBackwardBlocks<B, kRelu>>(kBlockedPass + 6 + kRelu, blocks_of<B>(s), args);
}

using DoubleBackwardFn = void (*)(const BnShape&, const BnSaved&, const BnCotangents&);

template <bool kRelu>
static DoubleBackwardFn double_backward_fn(int block) {
  if (block == 8) return bn_double_backward_blocked<8, kRelu>;
  if (block == 16) return bn_double_backward_blocked<16, kRelu>;
  return bn_double_backward<kRelu>;
}

// fastbn_double_backward (no shift) and fastbnrelu_double_backward (the forward's shift, for the
// ReLU mask).
static std::vector<paddle::Tensor> bn_double_backward_op(
    const paddle::Tensor& x, const paddle::Tensor& mean, const paddle::Tensor& rstd,
    const paddle::Tensor& scale, const paddle::Tensor* shift, const paddle::Tensor& dy,
    const paddle::Tensor& gx_in, const paddle::Tensor& gs_in, const paddle::Tensor& gb_in,
    int block) {
  BnInputs in = bn_inputs(x, mean, rstd, scale, shift, dy, block);
  paddle::Tensor gx = like_x(gx_in, in.x, "gx");
  paddle::Tensor gs = per_channel(gs_in, in.s.c, "gs"), gb = per_channel(gb_in, in.s.c, "gb");
  auto d_x = empty(in.x.shape()), d_dy = empty(in.x.shape()), d_scale = empty({in.s.c});
  const BnCotangents q{ptr(gx), ptr(gs), ptr(gb), ptr(d_x), ptr(d_scale), ptr(d_dy)};
  (shift ? double_backward_fn<true>(block) : double_backward_fn<false>(block))(in.s, in.saved(),
                                                                               q);
  return {d_x, d_scale, d_dy};
}

std::vector<paddle::Tensor> BnDoubleBackward(
    const paddle::Tensor& x, const paddle::Tensor& mean, const paddle::Tensor& rstd,
    const paddle::Tensor& scale, const paddle::Tensor& dy, const paddle::Tensor& gx,
    const paddle::Tensor& gs, const paddle::Tensor& gb, int block) {
  return bn_double_backward_op(x, mean, rstd, scale, nullptr, dy, gx, gs, gb, block);
}

std::vector<paddle::Tensor> BnReluDoubleBackward(
    const paddle::Tensor& x, const paddle::Tensor& mean, const paddle::Tensor& rstd,
    const paddle::Tensor& scale, const paddle::Tensor& shift, const paddle::Tensor& dz,
    const paddle::Tensor& gx, const paddle::Tensor& gs, const paddle::Tensor& gb, int block) {
  return bn_double_backward_op(x, mean, rstd, scale, &shift, dz, gx, gs, gb, block);
}

using Shapes = std::vector<std::vector<int64_t>>;
using Dtypes = std::vector<paddle::DataType>;
using Dims = std::vector<int64_t>;
using DT = paddle::DataType;

Shapes BnForwardShape(const Dims& x, const Dims& scale, const Dims& shift, float eps, bool relu,
                      int block) {
  return {x, {x[1]}, {x[1]}};
}

Shapes BnBackwardShape(const Dims& x, const Dims& mean, const Dims& rstd, const Dims& scale,
                       const Dims& dy, int block) {
  return {x, {x[1]}, {x[1]}};
}

Shapes BnReluBackwardShape(const Dims& x, const Dims& mean, const Dims& rstd, const Dims& scale,
                           const Dims& shift, const Dims& dz, int block) {
  return {x, {x[1]}, {x[1]}};
}

Shapes BnDoubleBackwardShape(const Dims& x, const Dims& mean, const Dims& rstd, const Dims& scale,
                             const Dims& dy, const Dims& gx, const Dims& gs, const Dims& gb,
                             int block) {
  return {x, {x[1]}, x};
}

Shapes BnReluDoubleBackwardShape(const Dims& x, const Dims& mean, const Dims& rstd,
                                 const Dims& scale, const Dims& shift, const Dims& dz,
                                 const Dims& gx, const Dims& gs, const Dims& gb, int block) {
  return {x, {x[1]}, x};
}

Dtypes BnForwardDtype(const DT& x, const DT& a, const DT& b) { return {x, x, x}; }

Dtypes BnBackwardDtype(const DT& x, const DT& mean, const DT& rstd, const DT& scale,
                       const DT& dy) {
  return {x, x, x};
}

Dtypes BnReluBackwardDtype(const DT& x, const DT& mean, const DT& rstd, const DT& scale,
                           const DT& shift, const DT& dz) {
  return {x, x, x};
}

Dtypes BnDoubleBackwardDtype(const DT& x, const DT& mean, const DT& rstd, const DT& scale,
                             const DT& dy, const DT& gx, const DT& gs, const DT& gb) {
  return {x, x, x};
}

Dtypes BnReluDoubleBackwardDtype(const DT& x, const DT& mean, const DT& rstd, const DT& scale,
                                 const DT& shift, const DT& dz, const DT& gx, const DT& gs,
                                 const DT& gb) {
  return {x, x, x};
}

}  // namespace fastconv

PD_BUILD_OP(fastbn_forward)
    .Inputs({"X", "Scale", "Shift"})
    .Outputs({"Y", "Mean", "RStd"})
    .Attrs({"eps: float", "relu: bool", "block: int"})
    .SetKernelFn(PD_KERNEL(fastconv::BnForward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BnForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BnForwardDtype));

PD_BUILD_OP(fastbn_backward)
    .Inputs({"X", "Mean", "RStd", "Scale", "DY"})
    .Outputs({"DX", "DScale", "DShift"})
    .Attrs({"block: int"})
    .SetKernelFn(PD_KERNEL(fastconv::BnBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BnBackwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BnBackwardDtype));

PD_BUILD_OP(fastbn_double_backward)
    .Inputs({"X", "Mean", "RStd", "Scale", "DY", "GX", "GScale", "GShift"})
    .Outputs({"D_X", "D_Scale", "D_DY"})
    .Attrs({"block: int"})
    .SetKernelFn(PD_KERNEL(fastconv::BnDoubleBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BnDoubleBackwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BnDoubleBackwardDtype));

PD_BUILD_OP(fastbnrelu_backward)
    .Inputs({"X", "Mean", "RStd", "Scale", "Shift", "DZ"})
    .Outputs({"DX", "DScale", "DShift"})
    .Attrs({"block: int"})
    .SetKernelFn(PD_KERNEL(fastconv::BnReluBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BnReluBackwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BnReluBackwardDtype));

PD_BUILD_OP(fastbnrelu_double_backward)
    .Inputs({"X", "Mean", "RStd", "Scale", "Shift", "DZ", "GX", "GScale", "GShift"})
    .Outputs({"D_X", "D_Scale", "D_DZ"})
    .Attrs({"block: int"})
    .SetKernelFn(PD_KERNEL(fastconv::BnReluDoubleBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BnReluDoubleBackwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BnReluDoubleBackwardDtype));
