// Convolutions through oneDNN (the library, its threads and the other operators: onednn.h):
//   fastconv_forward(x, w)                  -> y
//   fastconv_backward(x, w, dy)             -> dx, dw
//   fastconv_backward_data(x, w, dy)        -> dx   (x supplies the shape only)
//   fastconv_backward_weights(x, w, dy)     -> dw   (w supplies the shape only)
// each with int attributes stride, padding and groups.
//
// Semantics are those of Paddle's `_C_ops.conv2d` / `_C_ops.conv2d_grad` with
// padding_algorithm="EXPLICIT", dilation 1, data_format "NCHW", no bias, square stride and
// padding, any number of groups, float32 only. Inputs and outputs are contiguous Paddle tensors;
// with g groups the weight [O, C/g, k, k] is the same bytes as oneDNN's plain grouped weight
// [g, O/g, C/g, k, k]. Weights are plain OIHW; the int attribute layout says how the activations
// are laid out: bit 1 set, x and dx hold nChw{B}c (B = activation_block(), see onednn.h) under
// their [N, C, H, W] shape, else plain NCHW; bit 2 likewise for y and dy. The training path keeps
// its activations blocked from the first convolution's output on, so that no convolution after
// it reorders them.
//   fastconv_activation_block(x) -> [B] (as float32; 1: oneDNN prefers plain NCHW here)
//
// Primitives are cached per (kind, shape). At the first call of a shape, the implementations
// oneDNN offers (up to kMaxImpls, reference ones excluded) on plain NCHW/OIHW memory and on the
// blocked layouts it prefers (with reorders in and out) are timed on scratch buffers with all
// threads, and the fastest is kept; unless the thread count is fixed, that one is then also timed
// on a single thread, which wins for small shapes and whenever the other core is busy.
// PADDLE_MAML_FASTCONV_LAYOUT=plain|blocked restricts the layouts; PADDLE_MAML_FASTCONV_TUNE=0
// skips the timing and takes oneDNN's first choice, blocked layout, all threads (deterministic
// choice, no start-up cost). PADDLE_MAML_FASTCONV_VERBOSE=1 prints the choices to stderr.
//
// Recorded choices: timing is noisy, so two processes may pick different implementations for a
// shape and then differ in the last bits of their results. When PADDLE_MAML_FASTCONV_CHOICES names
// a folder (metalearn/kernels/onednn.py sets it to one next to the compiled library), the first
// process that tunes a shape writes its choice there (one small text file per kind, shape, thread
// budget and layout setting; temporary file + rename), and later processes rebuild exactly that
// plan without timing. Tuning happens under an advisory lock on <folder>/.lock, re-checked once
// the lock is held, so processes started together agree too. A record that cannot be rebuilt
// (another CPU, say) is replaced by a new tuning. With PADDLE_MAML_FASTCONV_TUNE=0 records are
// not used.

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "batch_norm.h"
#include "onednn.h"

namespace fastconv {

constexpr int kMaxImpls = 6;  // implementations tried per layout when tuning

// ---------------------------------------------------------------------------------------------
// Execution plans: one convolution primitive plus the reorders between Paddle's plain layout and
// the layout the primitive computes in.

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };
const char* const kKindName[] = {"fwd", "bwd_data", "bwd_weights"};

// User slots (wrapping Paddle tensors; data handles set per run):
//   forward:          0 = x,  1 = w, 2 = y (output)
//   backward data:    0 = dy, 1 = w, 2 = dx (output)
//   backward weights: 0 = x,  1 = dy, 2 = dw (output)
class Plan {
 public:
  Plan(Runtime& rt, Kind kind, const Shape& s, int threads, bool blocked)
      : threads(threads), blocked(blocked), rt_(rt) {
    const int x = activation_tag(s.x_block), y = activation_tag(s.y_block),
              w = plain_tag(s.wei());
    if (kind == kForward) add_user(s.x(), x), add_user(s.wei(), w), add_user(s.y(), y);
    if (kind == kBackwardData) add_user(s.y(), y), add_user(s.wei(), w), add_user(s.x(), x);
    if (kind == kBackwardWeights) add_user(s.x(), x), add_user(s.y(), y), add_user(s.wei(), w);
  }
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  ~Plan() {
    auto& api = rt_.api;
    for (auto* steps : {&pre_, &main_, &post_})
      for (auto& step : *steps) api.primitive_destroy(step.primitive);
    for (handle mem : internal_mem_) api.memory_destroy(mem);
    for (handle mem : user_mem_) api.memory_destroy(mem);
    for (handle pd : pds_) api.primitive_desc_destroy(pd);
    for (handle md : mds_) api.memory_desc_destroy(md);
  }

  // Takes ownership of a primitive descriptor.
  handle own(handle pd) {
    pds_.push_back(pd);
    return pd;
  }

  // Memory to feed the primitive where it wants `want` for user input `slot`.
  handle input(int slot, chandle want) {
    if (rt_.api.memory_desc_equal(want, user_md_[slot])) return user_mem_[slot];
    handle mem = internal(want);
    pre_.push_back(reorder(user_mem_[slot], user_md_[slot], mem, want));
    return mem;
  }

  // Memory for the primitive to write user output `slot` into, in layout `want`.
  handle output(int slot, chandle want) {
    if (rt_.api.memory_desc_equal(want, user_md_[slot])) return user_mem_[slot];
    handle mem = internal(want);
    post_.push_back(reorder(mem, want, user_mem_[slot], user_md_[slot]));
    return mem;
  }

  void set_compute(handle pd, std::vector<dnnl_exec_arg> args) {
    handle primitive = nullptr;
    check(rt_.api.primitive_create(&primitive, pd), "primitive_create");
    const char* impl = nullptr;
    if (rt_.api.primitive_desc_query(pd, kQueryImplInfoStr, 0, &impl) == kSuccess && impl)
      impl_ = impl;
    main_.push_back(make_step(rt_, pd, primitive, std::move(args), &internal_mem_));
  }

  void run(void* in0, void* in1, void* out) {
    ThreadScope scope(rt_, threads);
    void* pointers[3] = {in0, in1, out};
    for (int i = 0; i < 3; ++i)
      check(rt_.api.memory_set_data_handle(user_mem_[i], pointers[i]), "memory_set_data_handle");
    for (auto* steps : {&pre_, &main_, &post_})
      for (auto& step : *steps) run_step(rt_, step);
    check(rt_.api.stream_wait(rt_.stream), "stream_wait");
  }

  std::string description() const {
    return std::string(blocked ? "blocked " : "plain   ") + impl_ + " +" +
           std::to_string(pre_.size() + post_.size()) + " reorders, " + std::to_string(threads) +
           (threads == 1 ? " thread" : " threads");
  }

  const std::string& impl() const { return impl_; }

  // Same implementation and same reorders means the same computation, whatever layout was asked.
  std::string signature() const {
    return impl_ + "|" + std::to_string(pre_.size()) + "|" + std::to_string(post_.size());
  }

  const int threads;
  const bool blocked;

 private:
  void add_user(const Dims& dims, int tag) {
    dnnl_dims d = {};
    std::copy(dims.begin(), dims.end(), d);
    handle desc = nullptr;
    check(rt_.api.memory_desc_create_with_tag(&desc, int(dims.size()), d, kF32, tag),
          "memory_desc_create");
    mds_.push_back(desc);
    handle mem = nullptr;
    check(rt_.api.memory_create(&mem, desc, rt_.engine, nullptr), "memory_create");
    user_md_.push_back(desc);
    user_mem_.push_back(mem);
  }

  handle internal(chandle desc) {
    handle mem = nullptr;
    check(rt_.api.memory_create(&mem, desc, rt_.engine, kMemoryAllocate), "memory_create");
    internal_mem_.push_back(mem);
    return mem;
  }

  Step reorder(handle from, chandle from_md, handle to, chandle to_md) {
    return reorder_step(rt_, from, from_md, to, to_md, &pds_, &internal_mem_);
  }

  Runtime& rt_;
  std::vector<handle> user_md_, user_mem_, internal_mem_, pds_, mds_;
  std::vector<Step> pre_, main_, post_;
  std::string impl_;
};

// Primitive descriptors of the implementations oneDNN offers for `kind` on shape `s`, best first
// by oneDNN's own ranking, at most `limit`, each one a separate clone that the caller owns. Empty
// when the layout has none.
//
// All candidates are enumerated before any primitive of this shape is created: oneDNN's
// implementation iterator consults the primitive cache by position, so iterating after a
// primitive was created for the same descriptor can hand back the same implementation again.
static std::vector<handle> candidates(Runtime& rt, Kind kind, const Shape& s, bool any,
                                      int limit) {
  auto& api = rt.api;
  Geometry g(s);
  std::vector<handle> mds, pds, out;
  auto md = [&](const Dims& dims) {
    dnnl_dims d = {};
    std::copy(dims.begin(), dims.end(), d);
    handle desc = nullptr;
    int tag = any ? kTagAny : plain_tag(dims);
    if (api.memory_desc_create_with_tag(&desc, int(dims.size()), d, kF32, tag) == kSuccess)
      mds.push_back(desc);
    return desc;
  };
  handle x_md = md(s.x()), w_md = md(s.wei()), y_md = md(s.y());
  handle pd = nullptr;
  if (mds.size() == 3 &&
      api.conv_fwd_pd_create(&pd, rt.engine, kForwardTraining, kConvolutionDirect, x_md, w_md,
                             nullptr, y_md, g.strides, g.dilates, g.pad_l, g.pad_r,
                             rt.attr) == kSuccess) {
    pds.push_back(pd);
    if (kind != kForward) {
      handle hint = pd;
      pd = nullptr;
      dnnl_status status =
          kind == kBackwardData
              ? api.conv_bwd_data_pd_create(&pd, rt.engine, kConvolutionDirect, x_md, w_md, y_md,
                                            g.strides, g.dilates, g.pad_l, g.pad_r, hint, rt.attr)
              : api.conv_bwd_weights_pd_create(&pd, rt.engine, kConvolutionDirect, x_md, w_md,
                                               nullptr, y_md, g.strides, g.dilates, g.pad_l,
                                               g.pad_r, hint, rt.attr);
      if (status == kSuccess) pds.push_back(pd);
      else pd = nullptr;
    }
  } else {
    pd = nullptr;
  }
  std::vector<std::string> seen;
  handle reference = nullptr;  // the reference implementation, kept only if nothing else exists
  while (pd != nullptr && static_cast<int>(out.size()) < limit) {
    std::string name = impl_name(rt, pd);
    bool is_reference = name.compare(0, 4, "ref:") == 0;
    if (std::find(seen.begin(), seen.end(), name) == seen.end() &&
        !(is_reference && reference != nullptr)) {
      handle clone = nullptr;
      if (api.primitive_desc_clone(&clone, pd) == kSuccess) {
        if (is_reference) reference = clone;
        else out.push_back(clone);
      }
      seen.push_back(name);
    }
    if (api.primitive_desc_next_impl(pd) != kSuccess) break;
  }
  if (reference != nullptr) {
    if (out.empty()) out.push_back(reference);
    else api.primitive_desc_destroy(reference);
  }
  for (handle p : pds) api.primitive_desc_destroy(p);
  for (handle d : mds) api.memory_desc_destroy(d);
  return out;
}

// The plan running the convolution of primitive descriptor `pd` (which it takes over).
// Must run inside a ThreadScope with `threads`, the count `pd` was created with.
static std::unique_ptr<Plan> build(Runtime& rt, Kind kind, const Shape& s, handle pd, int threads,
                                   bool blocked) {
  auto& api = rt.api;
  std::unique_ptr<Plan> plan;
  try {
    plan = std::make_unique<Plan>(rt, kind, s, threads, blocked);
  } catch (...) {
    api.primitive_desc_destroy(pd);
    throw;
  }
  plan->own(pd);
  auto md = [&](int query) { return api.primitive_desc_query_md(pd, query, 0); };
  if (kind == kForward) {
    handle x = plan->input(0, md(kQuerySrcMd));
    handle w = plan->input(1, md(kQueryWeightsMd));
    handle y = plan->output(2, md(kQueryDstMd));
    plan->set_compute(pd, {{kArgSrc, x}, {kArgWeights, w}, {kArgDst, y}});
  } else if (kind == kBackwardData) {
    handle dy = plan->input(0, md(kQueryDiffDstMd));
    handle w = plan->input(1, md(kQueryWeightsMd));
    handle dx = plan->output(2, md(kQueryDiffSrcMd));
    plan->set_compute(pd, {{kArgDiffDst, dy}, {kArgWeights, w}, {kArgDiffSrc, dx}});
  } else {
    handle x = plan->input(0, md(kQuerySrcMd));
    handle dy = plan->input(1, md(kQueryDiffDstMd));
    handle dw = plan->output(2, md(kQueryDiffWeightsMd));
    plan->set_compute(pd, {{kArgSrc, x}, {kArgDiffDst, dy}, {kArgDiffWeights, dw}});
  }
  return plan;
}

// Typical time in seconds of `plan` on scratch buffers; gives up early on clearly slower plans.
static double time_plan(Plan& plan, const Shape& s, Kind kind, double best_so_far) {
  auto count = [](const Dims& d) {
    size_t total = 1;
    for (int64_t v : d) total *= size_t(v);
    return total;
  };
  std::array<Dims, 3> dims;
  if (kind == kForward) dims = {s.x(), s.wei(), s.y()};
  if (kind == kBackwardData) dims = {s.y(), s.wei(), s.x()};
  if (kind == kBackwardWeights) dims = {s.x(), s.y(), s.wei()};
  std::vector<float> a(count(dims[0]), 0.5f), b(count(dims[1]), 0.25f), c(count(dims[2]));
  auto t0 = std::chrono::steady_clock::now();
  plan.run(a.data(), b.data(), c.data());  // warm-up: page faults, JIT caches
  double warm = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (warm > 4 * best_so_far) return warm;
  std::vector<double> times;
  for (int i = 0; i < 3; ++i) {
    t0 = std::chrono::steady_clock::now();
    plan.run(a.data(), b.data(), c.data());
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (times.back() > 3 * best_so_far) return times.back();
  }
  std::sort(times.begin(), times.end());
  return times[1];  // median: robust to a run that waited for a busy core
}

static void log_choice(Kind kind, const Shape& s, const Plan& plan, const std::string& report) {
  std::fprintf(stderr, "fastconv: %s x=[%ld,%ld,%ld,%ld] w=[%ld,%ld,%ld,%ld] g%ld s%d p%d -> %s%s\n",
               kKindName[kind], long(s.n), long(s.c), long(s.h), long(s.w), long(s.o),
               long(s.c / s.g), long(s.k), long(s.k), long(s.g), s.stride, s.pad,
               plan.description().c_str(), report.c_str());
}

// Without tuning: oneDNN's first choice on the preferred layout, with all threads.
static std::unique_ptr<Plan> first_choice(Runtime& rt, Kind kind, const Shape& s) {
  ThreadScope scope(rt, rt.threads);
  for (bool any : {true, false}) {
    if (any ? !rt.try_blocked : !rt.try_plain) continue;
    std::vector<handle> pds = candidates(rt, kind, s, any, 1);
    if (!pds.empty()) return build(rt, kind, s, pds[0], rt.threads, any);
  }
  PD_THROW("fastconv: oneDNN has no implementation of this ", kKindName[kind]);
}

// Times the implementations of both layouts with all threads and keeps the fastest; then, unless
// the thread count is fixed, times that implementation on one thread too (on a busy machine, or
// for small shapes, one thread is often faster than waiting for a second).
static std::unique_ptr<Plan> tuned_choice(Runtime& rt, Kind kind, const Shape& s) {
  std::unique_ptr<Plan> best;
  double best_time = 1e30;
  std::string report;
  auto consider = [&](std::unique_ptr<Plan> plan) {
    double t = time_plan(*plan, s, kind, best_time);
    if (verbose()) {
      char line[32];
      std::snprintf(line, sizeof(line), "%9.3f ms  ", t * 1e3);
      report += std::string("\n    ") + line + plan->description();
    }
    if (t < best_time) best_time = t, best = std::move(plan);
  };
  {
    ThreadScope scope(rt, rt.threads);
    std::vector<std::pair<bool, handle>> pds;  // (blocked layout, primitive descriptor)
    // Blocked first: usually faster, so that slower plans are abandoned early.
    for (bool any : {true, false}) {
      if (any ? !rt.try_blocked : !rt.try_plain) continue;
      for (handle pd : candidates(rt, kind, s, any, kMaxImpls)) pds.emplace_back(any, pd);
    }
    std::vector<std::string> seen;
    for (size_t i = 0; i < pds.size(); ++i) {
      std::unique_ptr<Plan> plan;
      try {
        plan = build(rt, kind, s, pds[i].second, rt.threads, pds[i].first);
      } catch (const std::exception& error) {
        if (verbose()) report += std::string("\n    failed: ") + error.what();
        continue;
      }
      std::string signature = plan->signature();  // e.g. gemm computes on plain either way
      if (std::find(seen.begin(), seen.end(), signature) != seen.end()) continue;
      seen.push_back(signature);
      consider(std::move(plan));
    }
  }
  if (!best) return first_choice(rt, kind, s);  // surfaces the error
  if (rt.threads > 1 && !rt.threads_fixed) {
    ThreadScope scope(rt, 1);
    std::string impl = best->impl();
    for (handle pd : candidates(rt, kind, s, best->blocked, kMaxImpls)) {
      if (impl_name(rt, pd) != impl) {
        rt.api.primitive_desc_destroy(pd);
        continue;
      }
      try {
        auto single = build(rt, kind, s, pd, 1, best->blocked);
        best_time = time_plan(*best, s, kind, 1e30);  // re-time now, under the same load
        consider(std::move(single));
      } catch (const std::exception&) {
      }
    }
  }
  if (verbose()) log_choice(kind, s, *best, report);
  return best;
}

// ---------------------------------------------------------------------------------------------
// Recorded choices (see the comment at the top of the file).

struct Choice {
  std::string impl, signature;
  bool blocked = false;
  int threads = 0;
};

// File name of the record of (kind, shape) under this process's thread budget and layout setting.
static std::string choice_file(const Runtime& rt, Kind kind, const Shape& s) {
  char name[256];
  char blocks[32] = "";  // the user tensors' layouts, where not plain
  if (s.x_block != 1 || s.y_block != 1)
    std::snprintf(blocks, sizeof(blocks), "-b%ldb%ld", long(s.x_block), long(s.y_block));
  std::snprintf(name, sizeof(name), "%s-x%ldx%ldx%ldx%ld-o%ld-k%ld-g%ld-s%d-p%d%s-t%d%s-%s.txt",
                kKindName[kind], long(s.n), long(s.c), long(s.h), long(s.w), long(s.o),
                long(s.k), long(s.g), s.stride, s.pad, blocks, rt.threads,
                rt.threads_fixed ? "fixed" : "", rt.layout.c_str());
  std::string file = name;
  for (char& ch : file)  // the layout comes from the environment: keep the name a plain file
    if (ch == '/' || ch == ' ') ch = '_';
  return rt.choices + "/" + file;
}

static bool read_choice(const std::string& path, Choice* choice) {
  FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return false;
  Choice c;
  char line[1024];
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    std::string text = line;
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
    size_t eq = text.find('=');
    if (eq == std::string::npos) continue;
    std::string key = text.substr(0, eq), value = text.substr(eq + 1);
    if (key == "impl") c.impl = value;
    else if (key == "signature") c.signature = value;
    else if (key == "blocked") c.blocked = value == "1";
    else if (key == "threads") c.threads = std::atoi(value.c_str());
  }
  std::fclose(f);
  if (c.impl.empty() || c.signature.empty() || c.threads < 1) return false;
  *choice = c;
  return true;
}

// Writes the record atomically (temporary file in the same folder, then rename).
static void write_choice(const std::string& path, const Plan& plan) {
  std::string tmp = path + ".tmp" + std::to_string(long(::getpid()));
  FILE* f = std::fopen(tmp.c_str(), "w");
  bool ok = f != nullptr;
  if (ok) {
    ok = std::fprintf(f, "impl=%s\nblocked=%d\nthreads=%d\nsignature=%s\n", plan.impl().c_str(),
                      int(plan.blocked), plan.threads, plan.signature().c_str()) > 0;
    ok = std::fclose(f) == 0 && ok;
  }
  if (ok) ok = std::rename(tmp.c_str(), path.c_str()) == 0;
  if (!ok) {
    std::remove(tmp.c_str());
    if (verbose())
      std::fprintf(stderr, "fastconv: could not record the choice in %s\n", path.c_str());
  }
}

// The plan of a recorded choice, or null when this process cannot build exactly that plan.
static std::unique_ptr<Plan> rebuild(Runtime& rt, Kind kind, const Shape& s, const Choice& c) {
  if (c.threads > rt.threads || (rt.threads_fixed && c.threads != rt.threads)) return nullptr;
  if (c.blocked ? !rt.try_blocked : !rt.try_plain) return nullptr;
  ThreadScope scope(rt, c.threads);
  std::unique_ptr<Plan> plan;
  for (handle pd : candidates(rt, kind, s, c.blocked, kMaxImpls)) {
    if (plan || c.impl != impl_name(rt, pd)) {
      rt.api.primitive_desc_destroy(pd);
      continue;
    }
    try {
      auto built = build(rt, kind, s, pd, c.threads, c.blocked);
      if (built->signature() == c.signature) plan = std::move(built);
    } catch (const std::exception&) {
    }
  }
  return plan;
}

// Exclusive advisory lock on a file for the lifetime of the object (no lock if it cannot be had).
class FileLock {
 public:
  explicit FileLock(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd_ < 0) return;
    int status;
    do status = ::flock(fd_, LOCK_EX);
    while (status != 0 && errno == EINTR);
    if (status != 0) ::close(fd_), fd_ = -1;
  }
  ~FileLock() {
    if (fd_ >= 0) ::close(fd_);  // closing releases the lock
  }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  int fd_ = -1;
};

// The recorded choice of this (kind, shape) if there is one this process can rebuild; otherwise
// tunes (under the lock, after looking again) and records the result.
static std::unique_ptr<Plan> recorded_or_tuned(Runtime& rt, Kind kind, const Shape& s) {
  std::string path = choice_file(rt, kind, s);
  auto load = [&]() -> std::unique_ptr<Plan> {
    Choice c;
    if (!read_choice(path, &c)) return nullptr;
    auto plan = rebuild(rt, kind, s, c);
    if (verbose()) {
      if (plan) log_choice(kind, s, *plan, "  (recorded)");
      else std::fprintf(stderr, "fastconv: cannot rebuild the choice in %s\n", path.c_str());
    }
    return plan;
  };
  if (auto plan = load()) return plan;
  FileLock guard(rt.choices + "/.lock");
  if (auto plan = load()) return plan;  // recorded meanwhile by another process
  auto plan = tuned_choice(rt, kind, s);
  write_choice(path, *plan);
  if (verbose()) std::fprintf(stderr, "fastconv: recorded in %s\n", path.c_str());
  return plan;
}

static std::unique_ptr<Plan> choose(Runtime& rt, Kind kind, const Shape& s) {
  if (!rt.tune) {
    auto plan = first_choice(rt, kind, s);
    if (verbose()) log_choice(kind, s, *plan, "");
    return plan;
  }
  if (rt.choices.empty()) return tuned_choice(rt, kind, s);
  return recorded_or_tuned(rt, kind, s);
}

static Plan& get_plan(Runtime& rt, Kind kind, const Shape& s) {
  using Key = std::array<int64_t, 12>;
  static std::map<Key, std::unique_ptr<Plan>> cache;
  Key key = {kind, s.n, s.c, s.h, s.w, s.o, s.k, s.stride, s.pad, s.g, s.x_block, s.y_block};
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  return *(cache[key] = choose(rt, kind, s));
}

// ---------------------------------------------------------------------------------------------
// One input channel per group, output in nChw{B}c: the first convolution of stacked tasks on
// one-channel images (T groups of 1 → O/T channels). oneDNN has only gemm on plain NCHW for it,
// and reordering its output into the blocked layout the next operators read cost as much again
// (measured: 13 ms each for 75 images of 8 tasks). These loops read and write the layouts
// directly, a B-lane multiply-add per tap: block cb reads input channel cb·B / (O/g) (a group's
// O/g channels fill whole blocks). They run on one thread or a team, like batch norm's loops, in
// the build for this CPU (run_ranges, batch_norm.h).

static bool single_channel_groups(const Shape& s) {
  return s.c == s.g && s.x_block == 1 && s.y_block > 1 && (s.o / s.g) % s.y_block == 0;
}

constexpr int kDirectPass = 48;  // Pace keys (batch_norm.h)

// [lo, hi): the output positions o < count whose input o·stride − pad + tap lies in [0, size).
static inline void reads_inside(int64_t count, int64_t size, int64_t stride, int64_t pad,
                                int64_t tap, int64_t* lo, int64_t* hi) {
  *lo = 0, *hi = count;
  while (*lo < count && *lo * stride - pad + tap < 0) ++*lo;
  while (*hi > *lo && (*hi - 1) * stride - pad + tap >= size) --*hi;
}

// B floats as one value of GCC's vector extension: the build of each loop for the target it is
// compiled for uses the widest registers that target has (one zmm for B = 16 with AVX-512).
// (GCC ignores a vector_size that depends on a template parameter: one type per width.)
typedef float Lanes8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Lanes16 __attribute__((vector_size(16 * sizeof(float))));
template <int B>
struct LanesOf;
template <>
struct LanesOf<8> {
  using type = Lanes8;
};
template <>
struct LanesOf<16> {
  using type = Lanes16;
};
template <int B>
using Lanes = typename LanesOf<B>::type;

template <int B>
static inline Lanes<B> load_lanes(const float* p) {
  static_assert(sizeof(Lanes<B>) == B * sizeof(float), "one float per lane");
  Lanes<B> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Blocks [first, last) of y, one output pixel at a time, its B lanes in a register. (The shape's
// fields are copied to locals: the stores through `y` could alias them otherwise.)
template <int B>
static inline void forward_blocks(const Shape& s, const float* x, const float* w, float* y,
                                  int64_t first, int64_t last) {
  const int64_t h = s.h, width = s.w, k = s.k, oh = s.oh, ow = s.ow, stride = s.stride,
                pad = s.pad, blocks = s.o / B, per_group = s.o / s.g, taps = k * k,
                hw = oh * ow, planes = s.c;
  std::vector<float> weights(taps * B);  // [tap][lane]
  for (int64_t cb = first; cb < last; ++cb) {
    for (int64_t t = 0; t < taps; ++t)
      for (int l = 0; l < B; ++l) weights[t * B + l] = w[(cb * B + l) * taps + t];
    const int64_t channel = cb * B / per_group;
    for (int64_t image = 0; image < s.n; ++image) {
      const float* plane = x + (image * planes + channel) * h * width;
      float* out = y + (image * blocks + cb) * hw * B;
      for (int64_t oy = 0; oy < oh; ++oy)
        for (int64_t ox = 0; ox < ow; ++ox) {
          Lanes<B> acc = {};
          for (int64_t kh = 0; kh < k; ++kh) {
            const int64_t iy = oy * stride - pad + kh;
            if (iy < 0 || iy >= h) continue;
            for (int64_t kw = 0; kw < k; ++kw) {
              const int64_t ix = ox * stride - pad + kw;
              if (ix >= 0 && ix < width)
                acc += load_lanes<B>(weights.data() + (kh * k + kw) * B) * plane[iy * width + ix];
            }
          }
          std::memcpy(out + (oy * ow + ox) * B, &acc, sizeof acc);
        }
    }
  }
}

// Blocks [first, last) of dw: each tap's sum over an image's positions in float, over the images
// in double.
template <int B>
static inline void backward_weights_blocks(const Shape& s, const float* x, const float* dy,
                                           float* dw, int64_t first, int64_t last) {
  const int64_t blocks = s.o / B, per_group = s.o / s.g, taps = s.k * s.k, hw = s.oh * s.ow;
  std::vector<double> total(taps * B);  // [tap][lane]
  for (int64_t cb = first; cb < last; ++cb) {
    std::fill(total.begin(), total.end(), 0.0);
    const int64_t channel = cb * B / per_group;
    for (int64_t image = 0; image < s.n; ++image) {
      const float* plane = x + (image * s.c + channel) * s.h * s.w;
      const float* grad = dy + (image * blocks + cb) * hw * B;
      for (int64_t kh = 0; kh < s.k; ++kh)
        for (int64_t kw = 0; kw < s.k; ++kw) {
          int64_t y_lo, y_hi, x_lo, x_hi;
          reads_inside(s.oh, s.h, s.stride, s.pad, kh, &y_lo, &y_hi);
          reads_inside(s.ow, s.w, s.stride, s.pad, kw, &x_lo, &x_hi);
          Lanes<B> acc = {};
          for (int64_t oy = y_lo; oy < y_hi; ++oy) {
            const float* row = plane + (oy * s.stride - s.pad + kh) * s.w - s.pad + kw;
            for (int64_t ox = x_lo; ox < x_hi; ++ox)
              acc += load_lanes<B>(grad + (oy * s.ow + ox) * B) * row[ox * s.stride];
          }
          float sums[B];
          std::memcpy(sums, &acc, sizeof sums);
          for (int l = 0; l < B; ++l) total[(kh * s.k + kw) * B + l] += sums[l];
        }
    }
    for (int64_t t = 0; t < taps; ++t)
      for (int l = 0; l < B; ++l)
        dw[(cb * B + l) * taps + t] = static_cast<float>(total[t * B + l]);
  }
}

// The direct loops as run_ranges kernels (batch_norm.h): y from (x, w), or dw from (x, dy).
struct DirectArgs {
  const Shape* s;
  const float *x, *b;
  float* out;
};

template <int B>
struct DirectForward {
  using Args = DirectArgs;
  static void run(const Args& a, int64_t first, int64_t last) {
    forward_blocks<B>(*a.s, a.x, a.b, a.out, first, last);
  }
};

template <int B>
struct DirectBackwardWeights {
  using Args = DirectArgs;
  static void run(const Args& a, int64_t first, int64_t last) {
    backward_weights_blocks<B>(*a.s, a.x, a.b, a.out, first, last);
  }
};

template <int B>
static void direct(bool backward, const Shape& s, const float* x, const float* b, float* out) {
  const DirectArgs args{&s, x, b, out};
  const BnShape pace{s.n, s.o / B, s.oh * s.ow * B};
  if (backward) run_ranges<DirectBackwardWeights<B>>(kDirectPass + 1, pace, args);
  else run_ranges<DirectForward<B>>(kDirectPass, pace, args);
}

static void direct_convolution(bool backward, const Shape& s, const float* x, const float* b,
                               float* out) {
  (s.y_block == 16 ? direct<16> : direct<8>)(backward, s, x, b, out);
}

// ---------------------------------------------------------------------------------------------
// Paddle operators.

static Shape shape_of(const paddle::Tensor& x, const paddle::Tensor& w, int stride, int pad,
                      int groups, int layout) {
  auto xs = x.shape(), ws = w.shape();
  PD_CHECK(groups >= 1 && ws[0] % groups == 0, "fastconv: ", ws[0], " filters in ", groups,
           " groups");
  PD_CHECK(ws[1] * groups == xs[1], "fastconv: input has ", xs[1], " channels, weight expects ",
           ws[1] * groups);
  PD_CHECK(ws[2] == ws[3], "fastconv: only square kernels are supported");
  PD_CHECK(stride >= 1 && pad >= 0, "fastconv: bad stride/padding");
  Shape s{xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], 0, 0, stride, pad, groups};
  s.oh = (s.h + 2 * pad - s.k) / stride + 1;
  s.ow = (s.w + 2 * pad - s.k) / stride + 1;
  PD_CHECK(s.oh > 0 && s.ow > 0, "fastconv: empty output");
  PD_CHECK(layout >= 0 && layout <= 3, "fastconv: layout must be 0..3");
  if (layout != 0) {
    std::lock_guard<std::mutex> guard(lock());
    const int64_t block = activation_block(runtime());
    PD_CHECK(block > 1, "fastconv: oneDNN prefers no blocked layout on this CPU");
    s.x_block = layout & 1 ? block : 1;
    s.y_block = layout & 2 ? block : 1;
    PD_CHECK(s.c % s.x_block == 0 && s.o % s.y_block == 0,
             "fastconv: blocked activations need a multiple of ", block, " channels");
  }
  return s;
}

static void check_grad_out(const paddle::Tensor& dy, const Shape& s) {
  auto d = dy.shape();
  PD_CHECK(d[0] == s.n && d[1] == s.o && d[2] == s.oh && d[3] == s.ow,
           "fastconv: grad_out has the wrong shape");
}

static paddle::Tensor zeros(const std::vector<int64_t>& shape) {
  return paddle::full(shape, 0.0, paddle::DataType::FLOAT32, paddle::CPUPlace());
}

static void execute(Kind kind, const Shape& s, void* in0, void* in1, void* out) {
  std::lock_guard<std::mutex> guard(lock());
  Runtime& rt = runtime();
  get_plan(rt, kind, s).run(in0, in1, out);
}

static bool degenerate(const Shape& s) { return s.n == 0 || s.c == 0 || s.o == 0; }

std::vector<paddle::Tensor> ConvForward(const paddle::Tensor& x_in, const paddle::Tensor& w_in,
                                        int stride, int padding, int groups, int layout) {
  paddle::Tensor x = dense(x_in, "x"), w = dense(w_in, "weight");
  Shape s = shape_of(x, w, stride, padding, groups, layout);
  if (degenerate(s)) return {zeros({s.n, s.o, s.oh, s.ow})};
  auto y = empty({s.n, s.o, s.oh, s.ow});
  if (single_channel_groups(s))
    direct_convolution(false, s, ptr(x), ptr(w), ptr(y));
  else
    execute(kForward, s, ptr(x), ptr(w), ptr(y));
  return {y};
}

std::vector<paddle::Tensor> ConvBackwardData(const paddle::Tensor& x_in,
                                             const paddle::Tensor& w_in,
                                             const paddle::Tensor& dy_in, int stride,
                                             int padding, int groups, int layout) {
  // x is used for its shape only.
  paddle::Tensor w = dense(w_in, "weight"), dy = dense(dy_in, "grad_out");
  PD_CHECK(x_in.shape().size() == 4, "fastconv: x must be 4-D");
  Shape s = shape_of(x_in, w, stride, padding, groups, layout);
  check_grad_out(dy, s);
  if (degenerate(s)) return {zeros(x_in.shape())};
  auto dx = empty(x_in.shape());
  execute(kBackwardData, s, ptr(dy), ptr(w), ptr(dx));
  return {dx};
}

std::vector<paddle::Tensor> ConvBackwardWeights(const paddle::Tensor& x_in,
                                                const paddle::Tensor& w_in,
                                                const paddle::Tensor& dy_in, int stride,
                                                int padding, int groups, int layout) {
  // w is used for its shape only.
  paddle::Tensor x = dense(x_in, "x"), dy = dense(dy_in, "grad_out");
  PD_CHECK(w_in.shape().size() == 4, "fastconv: weight must be 4-D");
  Shape s = shape_of(x, w_in, stride, padding, groups, layout);
  check_grad_out(dy, s);
  if (degenerate(s)) return {zeros(w_in.shape())};
  auto dw = empty(w_in.shape());
  if (single_channel_groups(s))
    direct_convolution(true, s, ptr(x), ptr(dy), ptr(dw));
  else
    execute(kBackwardWeights, s, ptr(x), ptr(dy), ptr(dw));
  return {dw};
}

std::vector<paddle::Tensor> ConvBackward(const paddle::Tensor& x_in, const paddle::Tensor& w_in,
                                         const paddle::Tensor& dy_in, int stride, int padding,
                                         int groups, int layout) {
  paddle::Tensor x = dense(x_in, "x"), w = dense(w_in, "weight"), dy = dense(dy_in, "grad_out");
  Shape s = shape_of(x, w, stride, padding, groups, layout);
  check_grad_out(dy, s);
  if (degenerate(s)) return {zeros(x.shape()), zeros(w.shape())};
  auto dx = empty(x.shape());
  auto dw = empty(w.shape());
  std::lock_guard<std::mutex> guard(lock());
  Runtime& rt = runtime();
  get_plan(rt, kBackwardData, s).run(ptr(dy), ptr(w), ptr(dx));
  get_plan(rt, kBackwardWeights, s).run(ptr(x), ptr(dy), ptr(dw));
  return {dx, dw};
}

std::vector<std::vector<int64_t>> ForwardShape(const std::vector<int64_t>& x,
                                               const std::vector<int64_t>& w, int stride,
                                               int padding, int groups, int layout) {
  return {{x[0], w[0], (x[2] + 2 * padding - w[2]) / stride + 1,
           (x[3] + 2 * padding - w[3]) / stride + 1}};
}

std::vector<std::vector<int64_t>> BackwardShape(const std::vector<int64_t>& x,
                                                const std::vector<int64_t>& w,
                                                const std::vector<int64_t>& dy, int stride,
                                                int padding, int groups, int layout) {
  return {x, w};
}

std::vector<std::vector<int64_t>> BackwardDataShape(const std::vector<int64_t>& x,
                                                    const std::vector<int64_t>& w,
                                                    const std::vector<int64_t>& dy, int stride,
                                                    int padding, int groups, int layout) {
  return {x};
}

std::vector<std::vector<int64_t>> BackwardWeightsShape(const std::vector<int64_t>& x,
                                                       const std::vector<int64_t>& w,
                                                       const std::vector<int64_t>& dy,
                                                       int stride, int padding, int groups,
                                                       int layout) {
  return {w};
}

std::vector<paddle::DataType> ForwardDtype(const paddle::DataType& x, const paddle::DataType& w) {
  return {x};
}

std::vector<paddle::DataType> BackwardDtype(const paddle::DataType& x, const paddle::DataType& w,
                                            const paddle::DataType& dy) {
  return {x, w};
}

std::vector<paddle::DataType> BackwardDataDtype(const paddle::DataType& x,
                                                const paddle::DataType& w,
                                                const paddle::DataType& dy) {
  return {x};
}

std::vector<paddle::DataType> BackwardWeightsDtype(const paddle::DataType& x,
                                                   const paddle::DataType& w,
                                                   const paddle::DataType& dy) {
  return {w};
}

std::vector<paddle::Tensor> ActivationBlock(const paddle::Tensor& x) {
  std::lock_guard<std::mutex> guard(lock());
  auto out = empty({1});
  ptr(out)[0] = static_cast<float>(activation_block(runtime()));
  return {out};
}

std::vector<std::vector<int64_t>> ActivationBlockShape(const std::vector<int64_t>& x) {
  return {{1}};
}

std::vector<paddle::DataType> ActivationBlockDtype(const paddle::DataType& x) {
  return {paddle::DataType::FLOAT32};
}

}  // namespace fastconv

PD_BUILD_OP(fastconv_activation_block)
    .Inputs({"X"})
    .Outputs({"Block"})
    .SetKernelFn(PD_KERNEL(fastconv::ActivationBlock))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::ActivationBlockShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::ActivationBlockDtype));

PD_BUILD_OP(fastconv_forward)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"stride: int", "padding: int", "groups: int", "layout: int"})
    .SetKernelFn(PD_KERNEL(fastconv::ConvForward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::ForwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::ForwardDtype));

PD_BUILD_OP(fastconv_backward)
    .Inputs({"X", "W", "DOut"})
    .Outputs({"DX", "DW"})
    .Attrs({"stride: int", "padding: int", "groups: int", "layout: int"})
    .SetKernelFn(PD_KERNEL(fastconv::ConvBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BackwardShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BackwardDtype));

PD_BUILD_OP(fastconv_backward_data)
    .Inputs({"X", "W", "DOut"})
    .Outputs({"DX"})
    .Attrs({"stride: int", "padding: int", "groups: int", "layout: int"})
    .SetKernelFn(PD_KERNEL(fastconv::ConvBackwardData))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BackwardDataShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BackwardDataDtype));

PD_BUILD_OP(fastconv_backward_weights)
    .Inputs({"X", "W", "DOut"})
    .Outputs({"DW"})
    .Attrs({"stride: int", "padding: int", "groups: int", "layout: int"})
    .SetKernelFn(PD_KERNEL(fastconv::ConvBackwardWeights))
    .SetInferShapeFn(PD_INFER_SHAPE(fastconv::BackwardWeightsShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(fastconv::BackwardWeightsDtype));
