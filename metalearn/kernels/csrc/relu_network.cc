// The ReLU network (metalearn/kernels/ops.py, relu_network): h_0 = x, z_l = h_l·W_l + b_l,
// h_{l+1} = relu(z_l), y = z_{L-1}, for T stacked tasks (x [T, N, I], W_l [T, I_l, O_l],
// b_l [T, O_l]) or one (x [N, I], W_l [I_l, O_l], b_l [O_l]; T = 1). Each pass of the whole
// network is one operator call: for the sinusoid MLP's tiny shapes ([25, 10, 40]·[25, 40, 40])
// the cost of a pass composed of Paddle operators is mostly their dispatch. Products are plain
// loops that keep an output row in AVX2 registers where the CPU has FMA (chosen at run time),
// scalar loops otherwise; one thread.
//   fastnet_forward(x, params)                        -> y, state (the hidden h_l, packed)
//   fastnet_backward(x, params, state, dy)            -> grads (packed: [dx,] dW_0, db_0, ...),
//                                                        dz (packed dz_l, for the next one)
//   fastnet_double_backward(x, params, state, dz, cotangents of the grads) -> packed
//                                                        ([d x,] d W_0, d b_0, ..., d dy)
// with params = [W_0, b_0, W_1, b_1, ...] and a bool attribute with_x (dx wanted). The formulas
// of the backward and of its derivative (two sweeps) are those of NativeKernels in
// metalearn/kernels/registry.py, which compose the same passes of Paddle operators.

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "paddle/extension.h"

namespace fastnet {

// c[r, :] (+)= Σ_k a(r, k)·b[k, :] for r < rows, k < inner, with a(r, k) = a[r·ar + k·ak];
// b rows and c rows are contiguous of length o.
using AccumulateFn = void (*)(float*, const float*, int64_t, int64_t, const float*, int64_t,
                              int64_t, int64_t);
void accumulate_plain(float* c, const float* a, int64_t ar, int64_t ak, const float* b,
                      int64_t rows, int64_t inner, int64_t o) {
  for (int64_t r = 0; r < rows; ++r) {
    float* cr = c + r * o;
    for (int64_t k = 0; k < inner; ++k) {
      const float v = a[r * ar + k * ak];
      const float* bk = b + k * o;
      for (int64_t j = 0; j < o; ++j) cr[j] += v * bk[j];
    }
  }
}

#if defined(__x86_64__)
template <int V>
__attribute__((target("avx2,fma"))) void accumulate_rows_avx2(float* c, const float* a,
                                                               int64_t ar, int64_t ak,
                                                               const float* b, int64_t rows,
                                                               int64_t inner) {
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {  // two rows share each load of b
    float* c0 = c + r * 8 * V;
    float* c1 = c0 + 8 * V;
    __m256 acc0[V], acc1[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      acc0[v] = _mm256_loadu_ps(c0 + 8 * v);
      acc1[v] = _mm256_loadu_ps(c1 + 8 * v);
    }
    for (int64_t k = 0; k < inner; ++k) {
      const __m256 s0 = _mm256_set1_ps(a[r * ar + k * ak]);
      const __m256 s1 = _mm256_set1_ps(a[(r + 1) * ar + k * ak]);
      const float* bk = b + k * 8 * V;
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const __m256 bv = _mm256_loadu_ps(bk + 8 * v);
        acc0[v] = _mm256_fmadd_ps(s0, bv, acc0[v]);
        acc1[v] = _mm256_fmadd_ps(s1, bv, acc1[v]);
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      _mm256_storeu_ps(c0 + 8 * v, acc0[v]);
      _mm256_storeu_ps(c1 + 8 * v, acc1[v]);
    }
  }
  for (; r < rows; ++r) {
    float* cr = c + r * 8 * V;
    __m256 acc[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[v] = _mm256_loadu_ps(cr + 8 * v);
    for (int64_t k = 0; k < inner; ++k) {
      const __m256 scale = _mm256_set1_ps(a[r * ar + k * ak]);
      const float* bk = b + k * 8 * V;
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v)
        acc[v] = _mm256_fmadd_ps(scale, _mm256_loadu_ps(bk + 8 * v), acc[v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(cr + 8 * v, acc[v]);
  }
}

__attribute__((target("avx2,fma"))) void accumulate_avx2(float* c, const float* a, int64_t ar,
                                                          int64_t ak, const float* b,
                                                          int64_t rows, int64_t inner,
                                                          int64_t o) {
  switch (o) {  // widths of 8·V: the row of c stays in V registers over the whole sum
    case 8: return accumulate_rows_avx2<1>(c, a, ar, ak, b, rows, inner);
    case 16: return accumulate_rows_avx2<2>(c, a, ar, ak, b, rows, inner);
    case 24: return accumulate_rows_avx2<3>(c, a, ar, ak, b, rows, inner);
    case 32: return accumulate_rows_avx2<4>(c, a, ar, ak, b, rows, inner);
    case 40: return accumulate_rows_avx2<5>(c, a, ar, ak, b, rows, inner);
    case 48: return accumulate_rows_avx2<6>(c, a, ar, ak, b, rows, inner);
    case 56: return accumulate_rows_avx2<7>(c, a, ar, ak, b, rows, inner);
    case 64: return accumulate_rows_avx2<8>(c, a, ar, ak, b, rows, inner);
    default: break;
  }
  const int64_t vec = o - o % 8;
  for (int64_t r = 0; r < rows; ++r) {
    float* cr = c + r * o;
    for (int64_t k = 0; k < inner; ++k) {
      const float v = a[r * ar + k * ak];
      const __m256 vv = _mm256_set1_ps(v);
      const float* bk = b + k * o;
      int64_t j = 0;
      for (; j < vec; j += 8)
        _mm256_storeu_ps(cr + j,
                         _mm256_fmadd_ps(vv, _mm256_loadu_ps(bk + j), _mm256_loadu_ps(cr + j)));
      for (; j < o; ++j) cr[j] += v * bk[j];
    }
  }
}

#endif

// c[r] += Σ_k a[r·inner + k]·b[k] (a matrix times a vector: layers of width 1)
void dots_plain(float* c, const float* a, const float* b, int64_t rows, int64_t inner) {
  for (int64_t r = 0; r < rows; ++r) {
    float sum = 0.0f;
    for (int64_t k = 0; k < inner; ++k) sum += a[r * inner + k] * b[k];
    c[r] += sum;
  }
}

// out = max(v, 0) and out = g·[h > 0] (ReLU and its backward), count values
void relu_plain(float* out, const float* v, int64_t count) {
  for (int64_t k = 0; k < count; ++k) out[k] = std::max(v[k], 0.0f);
}

void mask_plain(float* out, const float* h, const float* g, int64_t count) {
  for (int64_t k = 0; k < count; ++k) out[k] = h[k] > 0.0f ? g[k] : 0.0f;
}

// c[r, j] += Σ_k a[r·inner + k]·b[j·inner + k]: a times b transposed, both rows contiguous
void dot_rows_plain(float* c, const float* a, const float* b, int64_t rows, int64_t cols,
                    int64_t inner) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) {
      float sum = 0.0f;
      for (int64_t k = 0; k < inner; ++k) sum += a[r * inner + k] * b[j * inner + k];
      c[r * cols + j] += sum;
    }
}

#if defined(__x86_64__)
// Four columns at a time: the row of a is loaded once for four rows of b, and the four sums
// are reduced together.
__attribute__((target("avx2,fma"))) void dot_rows_avx2(float* c, const float* a, const float* b,
                                                       int64_t rows, int64_t cols,
                                                       int64_t inner) {
  const int64_t vec = inner - inner % 8, quads = cols - cols % 4;
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * inner;
    float* cr = c + r * cols;
    int64_t j = 0;
    for (; j < quads; j += 4) {
      const float *b0 = b + j * inner, *b1 = b0 + inner, *b2 = b1 + inner, *b3 = b2 + inner;
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      int64_t k = 0;
      for (; k < vec; k += 8) {
        const __m256 av = _mm256_loadu_ps(ar + k);
        s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b0 + k), s0);
        s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b1 + k), s1);
        s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b2 + k), s2);
        s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b3 + k), s3);
      }
      const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
      __m128 sums = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
      float out[4];
      _mm_storeu_ps(out, sums);
      for (; k < inner; ++k) {
        out[0] += ar[k] * b0[k];
        out[1] += ar[k] * b1[k];
        out[2] += ar[k] * b2[k];
        out[3] += ar[k] * b3[k];
      }
      for (int m = 0; m < 4; ++m) cr[j + m] += out[m];
    }
    for (; j < cols; ++j) {
      float sum = 0.0f;
      for (int64_t k = 0; k < inner; ++k) sum += ar[k] * b[j * inner + k];
      cr[j] += sum;
    }
  }
}

__attribute__((target("avx2,fma"))) void dots_avx2(float* c, const float* a, const float* b,
                                                   int64_t rows, int64_t inner) {
  const int64_t vec = inner - inner % 8;
  for (int64_t r = 0; r < rows; ++r) {
    const float* ar = a + r * inner;
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < vec; k += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(ar + k), _mm256_loadu_ps(b + k), acc);
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    half = _mm_add_ss(half, _mm_shuffle_ps(half, half, 1));
    float sum = _mm_cvtss_f32(half);
    for (; k < inner; ++k) sum += ar[k] * b[k];
    c[r] += sum;
  }
}

__attribute__((target("avx2,fma"))) void relu_avx2(float* out, const float* v, int64_t count) {
  const int64_t vec = count - count % 8;
  const __m256 zero = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k < vec; k += 8) _mm256_storeu_ps(out + k, _mm256_max_ps(_mm256_loadu_ps(v + k), zero));
  for (; k < count; ++k) out[k] = std::max(v[k], 0.0f);
}

__attribute__((target("avx2,fma"))) void mask_avx2(float* out, const float* h, const float* g,
                                                   int64_t count) {
  const int64_t vec = count - count % 8;
  const __m256 zero = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k < vec; k += 8) {
    const __m256 positive = _mm256_cmp_ps(_mm256_loadu_ps(h + k), zero, _CMP_GT_OQ);
    _mm256_storeu_ps(out + k, _mm256_and_ps(positive, _mm256_loadu_ps(g + k)));
  }
  for (; k < count; ++k) out[k] = h[k] > 0.0f ? g[k] : 0.0f;
}
#endif

struct Gemm {
  void (*dot_rows)(float*, const float*, const float*, int64_t, int64_t, int64_t) =
      dot_rows_plain;
  void (*dots)(float*, const float*, const float*, int64_t, int64_t) = dots_plain;
  void (*relu)(float*, const float*, int64_t) = relu_plain;
  void (*mask)(float*, const float*, const float*, int64_t) = mask_plain;
  AccumulateFn accumulate = accumulate_plain;
  Gemm() {
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      accumulate = accumulate_avx2;
      dots = dots_avx2;
      dot_rows = dot_rows_avx2;
      relu = relu_avx2;
      mask = mask_avx2;
    }
#endif
  }
};

const Gemm& gemm() {
  static const Gemm chosen;
  return chosen;
}


float* data(paddle::Tensor& t) { return t.data<float>(); }
const float* data(const paddle::Tensor& t) { return t.data<float>(); }

struct Net {
  int64_t t = 1, n = 0, layers = 0;
  std::vector<int64_t> size;  // size[l]: width of h_l; size[layers]: of y
  std::vector<int64_t> hidden_at, dz_at;  // offsets of h_l (l ≥ 1) and dz_l in the packed states
  int64_t hidden_total = 0, dz_total = 0;
};

Net describe(const paddle::Tensor& x, const std::vector<paddle::Tensor>& params) {
  const auto xs = x.shape();
  PD_CHECK(xs.size() == 2 || xs.size() == 3, "fastnet: x must be 2-D or 3-D");
  PD_CHECK(!params.empty() && params.size() % 2 == 0, "fastnet: params are (W, b) pairs");
  Net net;
  const bool stacked = xs.size() == 3;
  net.t = stacked ? xs[0] : 1;
  net.n = xs[xs.size() - 2];
  net.layers = static_cast<int64_t>(params.size() / 2);
  net.size.push_back(xs.back());
  for (int64_t l = 0; l < net.layers; ++l) {
    const auto ws = params[2 * l].shape(), bs = params[2 * l + 1].shape();
    PD_CHECK(ws.size() == xs.size() && bs.size() == xs.size() - 1, "fastnet: weight ranks");
    PD_CHECK(ws[ws.size() - 2] == net.size.back() && bs.back() == ws.back() &&
                 (!stacked || (ws[0] == net.t && bs[0] == net.t)),
             "fastnet: weight shapes");
    net.size.push_back(ws.back());
  }
  net.hidden_at.assign(net.layers + 1, 0);
  for (int64_t l = 1; l < net.layers; ++l) {
    net.hidden_at[l] = net.hidden_total;
    net.hidden_total += net.t * net.n * net.size[l];
  }
  net.dz_at.assign(net.layers, 0);
  for (int64_t l = 0; l < net.layers; ++l) {
    net.dz_at[l] = net.dz_total;
    net.dz_total += net.t * net.n * net.size[l + 1];
  }
  return net;
}

struct Layer {
  int64_t t, n, i, o;
};

Layer layer_of(const Net& net, int64_t l) {
  return {net.t, net.n, net.size[l], net.size[l + 1]};
}

// c[t] += a[t]·b[t] for a [T, N, I] and b [T, I, O].
void add_product(float* c, const float* a, const float* b, const Layer& d) {
  const auto& g = gemm();
  for (int64_t t = 0; t < d.t; ++t) {
    if (d.o == 1)  // b[t] is one column: dot products
      g.dots(c + t * d.n, a + t * d.n * d.i, b + t * d.i, d.n, d.i);
    else
      g.accumulate(c + t * d.n * d.o, a + t * d.n * d.i, d.i, 1, b + t * d.i * d.o, d.n, d.i,
                   d.o);
  }
}

// c[t] += a[t]ᵀ·b[t] for a [T, N, I] and b [T, N, O]: c [T, I, O].
void add_transposed_product(float* c, const float* a, const float* b, const Layer& d) {
  const auto& g = gemm();
  for (int64_t t = 0; t < d.t; ++t) {
    if (d.o == 1)  // c[t] is one column: the row c[t]ᵀ = b[t]ᵀ·a[t]
      g.accumulate(c + t * d.i, b + t * d.n, 0, 1, a + t * d.n * d.i, 1, d.n, d.i);
    else
      g.accumulate(c + t * d.i * d.o, a + t * d.n * d.i, 1, d.i, b + t * d.n * d.o, d.i, d.n,
                   d.o);
  }
}

// c[t] (+)= a[t]·b[t]ᵀ for a [T, N, O] and b [T, I, O]: c [T, N, I].
void add_product_transposed(float* c, const float* a, const float* b, const Layer& d,
                            bool accumulate) {
  const auto& g = gemm();
  if (!accumulate) std::fill(c, c + d.t * d.n * d.i, 0.0f);
  for (int64_t t = 0; t < d.t; ++t) {
    if (d.o == 1)  // an outer product: rows of c are multiples of b[t]'s column
      g.accumulate(c + t * d.n * d.i, a + t * d.n, 1, 0, b + t * d.i, d.n, 1, d.i);
    else
      g.dot_rows(c + t * d.n * d.i, a + t * d.n * d.o, b + t * d.i * d.o, d.n, d.i, d.o);
  }
}

// rows [T, N, O] = bias [T, O] broadcast over N
void fill_rows(float* rows, const float* bias, const Layer& d) {
  for (int64_t t = 0; t < d.t; ++t)
    for (int64_t n = 0; n < d.n; ++n)
      std::copy(bias + t * d.o, bias + (t + 1) * d.o, rows + (t * d.n + n) * d.o);
}

// sums [T, O] = Σ_n rows [T, N, O]: a product with a row of ones
void row_sums(float* sums, const float* rows, const Layer& d) {
  static const float one = 1.0f;
  std::fill(sums, sums + d.t * d.o, 0.0f);
  for (int64_t t = 0; t < d.t; ++t)
    gemm().accumulate(sums + t * d.o, &one, 0, 0, rows + t * d.n * d.o, 1, d.n, d.o);
}

// An uninitialised float buffer (every use writes before it reads).
class Scratch {
 public:
  explicit Scratch(int64_t count) : values_(count > 0 ? new float[count] : nullptr) {}
  float* get() const { return values_.get(); }

 private:
  std::unique_ptr<float[]> values_;
};

// out = g where h > 0, else 0 (ReLU's backward; h is ReLU's output), count values
void mask(float* out, const float* h, const float* g, int64_t count) {
  gemm().mask(out, h, g, count);
}

paddle::Tensor flat(int64_t count, const paddle::Tensor& like) {
  return paddle::empty({std::max<int64_t>(count, 1)}, paddle::DataType::FLOAT32, like.place());
}

// Operators have a fixed number of outputs, so the gradients come back as 1 + 2·kMaxLayers
// tensors: dx (a one-value placeholder without x), then dW_l, db_l, placeholders past the last
// layer. Deeper networks use Paddle's operators (metalearn/kernels/onednn.py).
constexpr int64_t kMaxLayers = 4;

struct Outputs {
  std::vector<paddle::Tensor> tensors;
  float* x = nullptr;
  std::vector<float*> w, b;
};

Outputs gradient_outputs(const paddle::Tensor& x, const std::vector<paddle::Tensor>& params,
                         bool with_x, const Net& net) {
  PD_CHECK(net.layers <= kMaxLayers, "fastnet: at most ", kMaxLayers, " layers");
  Outputs out;
  auto make = [&](const std::vector<int64_t>& shape) {
    out.tensors.push_back(paddle::empty(shape, paddle::DataType::FLOAT32, x.place()));
    return data(out.tensors.back());
  };
  out.x = with_x ? make(x.shape()) : (make({1}), nullptr);
  for (int64_t l = 0; l < kMaxLayers; ++l) {
    const bool used = l < net.layers;
    out.w.push_back(make(used ? params[2 * l].shape() : std::vector<int64_t>{1}));
    out.b.push_back(make(used ? params[2 * l + 1].shape() : std::vector<int64_t>{1}));
  }
  return out;
}

std::vector<paddle::Tensor> Forward(const paddle::Tensor& x,
                                    const std::vector<paddle::Tensor>& params) {
  const Net net = describe(x, params);
  auto out_shape = x.shape();
  out_shape.back() = net.size[net.layers];
  auto y = paddle::empty(out_shape, paddle::DataType::FLOAT32, x.place());
  auto state = flat(net.hidden_total, x);
  float* hp = data(state);
  const float* in = data(x);
  for (int64_t l = 0; l < net.layers; ++l) {
    const Layer d = layer_of(net, l);
    const bool last = l == net.layers - 1;
    float* out = last ? data(y) : hp + net.hidden_at[l + 1];
    fill_rows(out, data(params[2 * l + 1]), d);
    add_product(out, in, data(params[2 * l]), d);
    if (!last) gemm().relu(out, out, d.t * d.n * d.o);
    in = out;
  }
  return {y, state};
}

std::vector<paddle::Tensor> Backward(const paddle::Tensor& x,
                                     const std::vector<paddle::Tensor>& params,
                                     const paddle::Tensor& state, const paddle::Tensor& dy,
                                     bool with_x) {
  const Net net = describe(x, params);
  Outputs grads = gradient_outputs(x, params, with_x, net);
  auto dz = flat(net.dz_total, x);
  float* zp = data(dz);
  const float* hp = data(state);
  std::copy(data(dy), data(dy) + net.t * net.n * net.size[net.layers], zp + net.dz_at.back());
  for (int64_t l = net.layers - 1; l >= 0; --l) {
    const Layer d = layer_of(net, l);
    const float* h = l ? hp + net.hidden_at[l] : data(x);
    const float* gz = zp + net.dz_at[l];
    float* gw = grads.w[l];
    std::fill(gw, gw + d.t * d.i * d.o, 0.0f);
    add_transposed_product(gw, h, gz, d);
    row_sums(grads.b[l], gz, d);
    if (l) {
      float* below = zp + net.dz_at[l - 1];
      add_product_transposed(below, gz, data(params[2 * l]), d, false);
      mask(below, h, below, d.t * d.n * d.i);
    } else if (with_x) {
      add_product_transposed(grads.x, gz, data(params[0]), d, false);
    }
  }
  grads.tensors.push_back(dz);
  return grads.tensors;
}

std::vector<paddle::Tensor> DoubleBackward(const paddle::Tensor& x,
                                           const std::vector<paddle::Tensor>& params,
                                           const paddle::Tensor& state, const paddle::Tensor& dz,
                                           const std::vector<paddle::Tensor>& cotangents,
                                           bool with_x) {
  const Net net = describe(x, params);
  const int64_t first = with_x ? 1 : 0;
  PD_CHECK(static_cast<int64_t>(cotangents.size()) == first + 2 * net.layers,
           "fastnet: one cotangent per gradient");
  Outputs result = gradient_outputs(x, params, with_x, net);
  auto out_shape = x.shape();
  out_shape.back() = net.size[net.layers];
  auto d_dy_tensor = paddle::empty(out_shape, paddle::DataType::FLOAT32, x.place());
  float* d_dy = data(d_dy_tensor);
  const float *hp = data(state), *zp = data(dz);
  auto input = [&](int64_t l) { return l ? hp + net.hidden_at[l] : data(x); };
  // up: d dz_l = c_l·W_l + h_l·ḡW_l + ḡb_l, W̄_l = c_lᵀ·dz_l, h̄_l = dz_l·ḡW_lᵀ,
  // c_{l+1} = mask_{l+1} ⊙ d dz_l
  int64_t widest = 0;
  for (const int64_t size : net.size) widest = std::max(widest, size);
  const int64_t rows = net.t * net.n;
  Scratch d_dz(rows * widest), carry(rows * widest), bar_z(rows * widest);
  std::vector<Scratch> bar_h;
  for (int64_t l = 0; l < net.layers; ++l) bar_h.emplace_back(l || with_x ? rows * net.size[l] : 0);
  bool has_carry = with_x;
  if (with_x) std::copy(data(cotangents[0]), data(cotangents[0]) + rows * net.size[0], carry.get());
  for (int64_t l = 0; l < net.layers; ++l) {
    const Layer d = layer_of(net, l);
    const float* g_w = data(cotangents[first + 2 * l]);
    const float* g_b = data(cotangents[first + 2 * l + 1]);
    const float* gz = zp + net.dz_at[l];
    const bool last = l == net.layers - 1;
    float* ddz = last ? d_dy : d_dz.get();
    fill_rows(ddz, g_b, d);
    add_product(ddz, input(l), g_w, d);
    float* w_bar = result.w[l];
    std::fill(w_bar, w_bar + d.t * d.i * d.o, 0.0f);
    if (has_carry) {
      add_product(ddz, carry.get(), data(params[2 * l]), d);
      add_transposed_product(w_bar, carry.get(), gz, d);
    }
    if (l || with_x) add_product_transposed(bar_h[l].get(), gz, g_w, d, false);
    if (!last) {
      mask(carry.get(), hp + net.hidden_at[l + 1], ddz, rows * d.o);
      has_carry = true;
    }
  }
  // down: the h̄_l back through the forward pass, adding to W̄_l, b̄_l (and x̄)
  const float* bar = bar_h[net.layers - 1].get();
  for (int64_t l = net.layers - 2; l >= 0; --l) {
    const Layer d = layer_of(net, l);
    mask(bar_z.get(), hp + net.hidden_at[l + 1], bar, rows * d.o);
    add_transposed_product(result.w[l], input(l), bar_z.get(), d);
    row_sums(result.b[l], bar_z.get(), d);
    if (l || with_x) {
      add_product_transposed(bar_h[l].get(), bar_z.get(), data(params[2 * l]), d, true);
      bar = bar_h[l].get();
    }
  }
  {  // the last layer's bias does not enter the backward: b̄_{L-1} = 0
    const Layer d = layer_of(net, net.layers - 1);
    std::fill(result.b[net.layers - 1], result.b[net.layers - 1] + d.t * d.o, 0.0f);
  }
  if (with_x) std::copy(bar, bar + rows * net.size[0], result.x);
  result.tensors.push_back(d_dy_tensor);
  return result.tensors;
}

}  // namespace fastnet

PD_BUILD_OP(fastnet_forward)
    .Inputs({"X", paddle::Vec("Params")})
    .Outputs({"Y", "State"})
    .SetKernelFn(PD_KERNEL(fastnet::Forward));

PD_BUILD_OP(fastnet_backward)
    .Inputs({"X", paddle::Vec("Params"), "State", "DY"})
    .Outputs({"DX", "DW0", "DB0", "DW1", "DB1", "DW2", "DB2", "DW3", "DB3", "DZ"})
    .Attrs({"with_x: bool"})
    .SetKernelFn(PD_KERNEL(fastnet::Backward));

PD_BUILD_OP(fastnet_double_backward)
    .Inputs({"X", paddle::Vec("Params"), "State", "DZ", paddle::Vec("Cotangents")})
    .Outputs({"D_X", "D_W0", "D_B0", "D_W1", "D_B1", "D_W2", "D_B2", "D_W3", "D_B3", "D_DY"})
    .Attrs({"with_x: bool"})
    .SetKernelFn(PD_KERNEL(fastnet::DoubleBackward));
