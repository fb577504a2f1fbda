// The convolution body at inference (ConvNet under paddle.no_grad: scoring query sets,
// evaluation and validation, the playground), one operator call for the whole body:
//   fastbody_forward(x, [w_0, scale_0, shift_0, w_1, ...]) -> features [N, C]
// with attributes stride, padding, groups (T stacked tasks: x [N, T·C, H, W], w_i [T·O, C, k, k],
// as fastconv_forward) and eps: per block y = relu(batch norm(conv(x))) with the
// batch's statistics, then the mean over the spatial positions.
//
// Why: run op by op, each convolution reorders its input from Paddle's NCHW into the
// channel-blocked layout nChw{B}c its fastest implementation computes in (B = 8 on AVX2, 16 on
// AVX-512) and its output back, and each op costs an eager dispatch. Here the activations stay
// blocked from the first convolution's output to the last batch norm: the convolutions read and
// write that layout, and batch norm + ReLU runs in place on it (bn_forward_blocked). Where oneDNN
// prefers no such layout, or the width is not a multiple of B, every block runs on plain NCHW
// buffers and bn_forward itself. Weights are reordered per call (they change at every inner step). Plans are
// cached per shape and run with Runtime::threads threads.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "batch_norm.h"
#include "onednn.h"

namespace fastconv {

// features [N, blocks·B] = the mean over the hw positions of nChw{B}c activations.
static void spatial_mean(const float* p, int64_t n, int64_t blocks, int64_t hw, int64_t B,
                         float* out) {
  for (int64_t image = 0; image < n; ++image)
    for (int64_t cb = 0; cb < blocks; ++cb) {
      const float* v = p + (image * blocks + cb) * hw * B;
      float* f = out + (image * blocks + cb) * B;
      std::fill(f, f + B, 0.0f);
      for (int64_t i = 0; i < hw; ++i)
        for (int64_t l = 0; l < B; ++l) f[l] += v[i * B + l];
      for (int64_t l = 0; l < B; ++l) f[l] /= static_cast<float>(hw);
    }
}

class Body {
 public:
  // The convolution shapes of the blocks, in order; the plan computes in nChw{B}c if oneDNN
  // prefers that for the blocks after the first, else in plain NCHW (B = 1).
  Body(Runtime& rt, std::vector<Shape> shapes) : shapes_(std::move(shapes)), rt_(rt) {
    ThreadScope scope(rt_, rt_.threads);
    for (int64_t B : {int64_t{16}, int64_t{8}}) {
      if (!prefers(B)) continue;
      block_ = B;
      if (build()) {
        log();
        return;
      }
      release();
    }
    block_ = 1;
    if (!build()) PD_THROW("fastbody: oneDNN has no convolution for this body");
    log();
  }
  Body(const Body&) = delete;
  Body& operator=(const Body&) = delete;
  ~Body() { release(); }

  // x: [N, C, H, W]; params: w_i, scale_i, shift_i per block; out: [N, C_last].
  void run(float* x, const std::vector<float*>& params, float eps, float* out) {
    auto& api = rt_.api;
    ThreadScope scope(rt_, rt_.threads);
    check(api.memory_set_data_handle(x_user_, x), "memory_set_data_handle");
    for (size_t i = 0; i < layers_.size(); ++i) {
      Layer& layer = layers_[i];
      const Shape& s = shapes_[i];
      check(api.memory_set_data_handle(layer.w_user, params[3 * i]), "memory_set_data_handle");
      for (auto& step : layer.steps) run_step(rt_, step);
      check(api.stream_wait(rt_.stream), "stream_wait");
      const float *a = params[3 * i + 1], *b = params[3 * i + 2];
      const int64_t hw = s.oh * s.ow;
      auto run = block_ == 16 ? bn_forward_blocked<16, true>
                 : block_ == 8  ? bn_forward_blocked<8, true>
                                : bn_forward<true>;
      run({s.n, s.o, hw}, layer.y, a, b, eps, layer.y, mean_.data(), rstd_.data());
    }
    const Shape& s = shapes_.back();
    spatial_mean(layers_.back().y, s.n, s.o / block_, s.oh * s.ow, block_, out);
  }

 private:
  void log() const {
    if (!verbose()) return;
    const Shape& s = shapes_.front();
    std::string impls;
    for (chandle pd : pds_) impls += std::string(" ") + impl_name(rt_, pd);
    std::fprintf(stderr, "fastbody: x=[%ld,%ld,%ld,%ld] g%ld %zu blocks -> %s, %d threads:%s\n",
                 long(s.n), long(s.c), long(s.h), long(s.w), long(s.g), shapes_.size(),
                 block_ == 1 ? "plain NCHW" : ("nChw" + std::to_string(block_) + "c").c_str(),
                 rt_.threads, impls.c_str());
  }

  struct Layer {
    handle w_user = nullptr;  // over Paddle's OIHW weight; data handle set per call
    float* y = nullptr;       // the block's activations, owned by y_mem
    std::vector<Step> steps;  // reorders, then the convolution
  };

  // Whether oneDNN's own choice of output layout for the second block (the first if alone)
  // is nChw{B}c, and B divides every block's width.
  bool prefers(int64_t B) {
    int tag = B == 16 ? kTagABcd16b : kTagABcd8b;
    for (const Shape& s : shapes_)
      if ((s.o / s.g) % B != 0) return false;  // each group's channels fill whole blocks
    if (!is_channel_blocked(rt_, tag, B)) return false;
    const Shape& s = shapes_[shapes_.size() > 1 ? 1 : 0];
    handle x = md(s.x(), kTagAny), w = md(s.wei(), kTagAny), y = md(s.y(), kTagAny);
    handle want = md(s.y(), tag);
    handle pd = conv_pd(s, x, w, y);
    bool yes = pd != nullptr && rt_.api.memory_desc_equal(
                                    rt_.api.primitive_desc_query_md(pd, kQueryDstMd, 0), want);
    if (pd) rt_.api.primitive_desc_destroy(pd);
    return yes;
  }

  handle md(const Dims& dims, int tag) {
    handle d = tagged_md(rt_, dims, tag);
    if (d == nullptr) PD_THROW("fastbody: memory descriptor refused");
    mds_.push_back(d);
    return d;
  }

  bool is_reference(chandle pd) { return std::strncmp(impl_name(rt_, pd), "ref:", 4) == 0; }

  handle conv_pd(const Shape& s, chandle x, chandle w, chandle y) {
    Geometry g(s);
    handle pd = nullptr;
    if (rt_.api.conv_fwd_pd_create(&pd, rt_.engine, kForwardTraining, kConvolutionDirect, x, w,
                                   nullptr, y, g.strides, g.dilates, g.pad_l, g.pad_r,
                                   rt_.attr) != kSuccess)
      return nullptr;
    return pd;
  }

  handle memory(chandle desc, void* data) {
    handle mem = nullptr;
    check(rt_.api.memory_create(&mem, desc, rt_.engine, data), "memory_create");
    mems_.push_back(mem);
    return mem;
  }

  Step reorder(handle from, handle to) {
    auto& api = rt_.api;
    chandle from_md = nullptr, to_md = nullptr;
    check(api.memory_get_memory_desc(from, &from_md), "memory_get_memory_desc");
    check(api.memory_get_memory_desc(to, &to_md), "memory_get_memory_desc");
    Step step = reorder_step(rt_, from, from_md, to, to_md, &pds_, &mems_);
    primitives_.push_back(step.primitive);
    return step;
  }

  // Memory in layout `want` holding `user` before the convolution runs (a reorder if needed).
  handle input(Layer& layer, handle user, chandle user_md, chandle want) {
    if (rt_.api.memory_desc_equal(want, user_md)) return user;
    handle mem = memory(want, kMemoryAllocate);
    layer.steps.push_back(reorder(user, mem));
    return mem;
  }

  // The primitives of every block in layout block_; false if oneDNN has no convolution for one.
  bool build() {
    const int tag = block_ == 16 ? kTagABcd16b : block_ == 8 ? kTagABcd8b : kTagAbcd;
    handle src = nullptr;  // the previous block's activations
    for (size_t i = 0; i < shapes_.size(); ++i) {
      const Shape& s = shapes_[i];
      Layer layer;
      handle x_md = i == 0 ? md(s.x(), kTagAbcd) : md(s.x(), tag);
      handle y_md = md(s.y(), tag);
      handle w_plain = md(s.wei(), plain_tag(s.wei()));
      handle pd = i == 0 ? conv_pd(s, md(s.x(), kTagAny), md(s.wei(), kTagAny), y_md)
                         : conv_pd(s, x_md, md(s.wei(), kTagAny), y_md);
      if (i == 0 && (pd == nullptr || is_reference(pd))) {
        // The first block reads plain images; writing the blocked layout may leave oneDNN only
        // its reference code (grouped 1-channel inputs): compute in its own layout, reorder.
        if (pd != nullptr) rt_.api.primitive_desc_destroy(pd);
        pd = conv_pd(s, md(s.x(), kTagAny), md(s.wei(), kTagAny), md(s.y(), kTagAny));
      }
      if (pd == nullptr) return false;
      pds_.push_back(pd);
      if (block_ != 1 && is_reference(pd)) return false;  // plain NCHW has better code
      if (i == 0) {
        x_user_ = memory(x_md, nullptr);
        src = input(layer, x_user_, x_md, rt_.api.primitive_desc_query_md(pd, kQuerySrcMd, 0));
      }
      layer.w_user = memory(w_plain, nullptr);
      handle w = input(layer, layer.w_user, w_plain,
                       rt_.api.primitive_desc_query_md(pd, kQueryWeightsMd, 0));
      handle y = memory(y_md, kMemoryAllocate);
      void* data = nullptr;
      check(rt_.api.memory_get_data_handle(y, &data), "memory_get_data_handle");
      layer.y = static_cast<float*>(data);
      chandle out_md = rt_.api.primitive_desc_query_md(pd, kQueryDstMd, 0);
      handle out = rt_.api.memory_desc_equal(out_md, y_md) ? y : memory(out_md, kMemoryAllocate);
      handle conv = nullptr;
      check(rt_.api.primitive_create(&conv, pd), "primitive_create");
      primitives_.push_back(conv);
      layer.steps.push_back(
          make_step(rt_, pd, conv, {{kArgSrc, src}, {kArgWeights, w}, {kArgDst, out}}, &mems_));
      if (out != y) layer.steps.push_back(reorder(out, y));
      layers_.push_back(std::move(layer));
      src = y;
    }
    int64_t widest = 0;
    for (const Shape& s : shapes_) widest = std::max(widest, s.o);
    mean_.assign(widest, 0.0f);
    rstd_.assign(widest, 0.0f);
    return true;
  }

  void release() {
    auto& api = rt_.api;
    for (handle p : primitives_) api.primitive_destroy(p);
    for (handle m : mems_) api.memory_destroy(m);
    for (handle p : pds_) api.primitive_desc_destroy(p);
    for (handle d : mds_) api.memory_desc_destroy(d);
    primitives_.clear(), mems_.clear(), pds_.clear(), mds_.clear(), layers_.clear();
    x_user_ = nullptr;
  }

  std::vector<Shape> shapes_;
  Runtime& rt_;
  int64_t block_ = 1;
  handle x_user_ = nullptr;
  std::vector<Layer> layers_;
  std::vector<float> mean_, rstd_;  // batch norm's statistics (unused here)
  std::vector<handle> primitives_, mems_, pds_, mds_;
};

std::vector<paddle::Tensor> BodyForward(const paddle::Tensor& x_in,
                                        const std::vector<paddle::Tensor>& params_in, int stride,
                                        int padding, int groups, float eps) {
  PD_CHECK(!params_in.empty() && params_in.size() % 3 == 0,
           "fastbody: params are (weight, scale, shift) per block");
  paddle::Tensor x = dense(x_in, "x");
  std::vector<paddle::Tensor> params;  // contiguous copies where needed, alive for the call
  std::vector<Shape> shapes;
  PD_CHECK(groups >= 1, "fastbody: groups must be positive");
  Dims key = {stride, padding, groups};
  std::vector<int64_t> in_shape = x.shape();
  for (size_t i = 0; i < params_in.size(); i += 3) {
    paddle::Tensor w = dense(params_in[i], "weight");
    PD_CHECK(in_shape[1] == w.shape()[1] * groups && w.shape()[0] % groups == 0, "fastbody: block ",
             i / 3, " expects ", w.shape()[1] * groups, " channels, gets ", in_shape[1]);
    Shape s{in_shape[0], in_shape[1], in_shape[2], in_shape[3], w.shape()[0], w.shape()[2], 0, 0,
            stride, padding, groups};
    PD_CHECK(w.shape()[2] == w.shape()[3], "fastbody: only square kernels are supported");
    PD_CHECK(stride >= 1 && padding >= 0, "fastbody: bad stride/padding");
    s.oh = (s.h + 2 * padding - s.k) / stride + 1;
    s.ow = (s.w + 2 * padding - s.k) / stride + 1;
    PD_CHECK(s.n > 0 && s.oh > 0 && s.ow > 0, "fastbody: empty activations");
    params.push_back(w);
    params.push_back(per_channel(params_in[i + 1], s.o, "scale"));
    params.push_back(per_channel(params_in[i + 2], s.o, "shift"));
    shapes.push_back(s);
    key.insert(key.end(), {s.n, s.c, s.h, s.w, s.o, s.k});
    in_shape = {s.n, s.o, s.oh, s.ow};
  }
  auto features = empty({in_shape[0], in_shape[1]});
  std::vector<float*> pointers;
  for (const auto& t : params) pointers.push_back(ptr(t));
  std::lock_guard<std::mutex> guard(lock());
  static std::map<Dims, std::unique_ptr<Body>> plans;
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, std::make_unique<Body>(runtime(), shapes)).first;
  it->second->run(ptr(x), pointers, eps, ptr(features));
  return {features};
}

}  // namespace fastconv

PD_BUILD_OP(fastbody_forward)
    .Inputs({"X", paddle::Vec("Params")})
    .Outputs({"Features"})
    .Attrs({"stride: int", "padding: int", "groups: int", "eps: float"})
    .SetKernelFn(PD_KERNEL(fastconv::BodyForward));
