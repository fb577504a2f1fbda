// Batch norm's channel loops and forward pass, shared by the batch-norm operators (batch_norm.cc,
// which describes the formulas and the threads) and the fused body (body.cc).

#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <mutex>

#include "onednn.h"

namespace fastconv {

struct BnShape {
  int64_t n, c, hw;
  double count() const { return static_cast<double>(n) * static_cast<double>(hw); }
  int64_t at(int64_t image, int64_t channel) const { return (image * c + channel) * hw; }
};

// `t` as a contiguous float32 CPU tensor of c values; `name` for errors.
paddle::Tensor per_channel(const paddle::Tensor& t, int64_t c, const char* name);

// Fewer values than this run on one thread: below it the fork and join cost more than they save.
constexpr int64_t kBnParallelWork = 1 << 14;

// Which of one thread and Runtime::threads threads is faster for one (pass, shape), learnt while
// running: both are timed on their first kPaceTrials calls, then the faster one runs, and every
// kPaceProbe-th call times the other again, so the choice follows the machine's load (a busy
// second core makes a team of two several times slower than one thread). Timing needs no care
// about determinism here: the results do not depend on the thread count.
class Pace {
 public:
  static constexpr int kPaceTrials = 3;
  static constexpr int64_t kPaceProbe = 32;

  bool use_team() {
    ++calls_;
    for (int team : {1, 0})
      if (runs_[team] < kPaceTrials) return team;
    const bool faster = seconds_[1] < seconds_[0];
    return calls_ % kPaceProbe == 0 ? !faster : faster;
  }

  // A moving average over the last ~2 calls, so that a probe soon corrects a time measured
  // while the machine was busier (an option probed every kPaceProbe calls learns slowly).
  void record(bool team, double seconds) {
    double& mean = seconds_[team];
    mean = runs_[team]++ == 0 ? seconds : 0.5 * (mean + seconds);
  }

 private:
  double seconds_[2] = {0, 0};  // [one thread, a team]
  int64_t runs_[2] = {0, 0};
  int64_t calls_ = 0;
};

std::mutex& pace_lock();

// Call with pace_lock() held.
Pace& pace_of(int pass, const BnShape& s);

// body(first, last) for contiguous channel ranges that cover [0, s.c): one call with the whole
// range, or on Runtime::threads OpenMP threads if the shape is large enough and Pace says so
// (always, if PADDLE_MAML_FASTCONV_THREADS fixes the count). `pass` names the calling loop.
template <class F>
void for_channel_ranges(int pass, const BnShape& s, F body) {
  const Runtime& rt = runtime();
  const int64_t threads = std::min<int64_t>(rt.threads, s.c);
  if (threads <= 1 || rt.omp.parallel == nullptr || s.n * s.c * s.hw < kBnParallelWork) {
    body(int64_t{0}, s.c);
    return;
  }
  Pace* pace = nullptr;
  bool team = true;
  if (!rt.threads_fixed) {
    std::lock_guard<std::mutex> hold(pace_lock());
    pace = &pace_of(pass, s);  // std::map: the reference stays valid
    team = pace->use_team();
  }
  const auto start = std::chrono::steady_clock::now();
  if (team) {
    struct Job {
      F* body;
      int64_t channels;
      const Omp* omp;
    } job{&body, s.c, &rt.omp};
    auto run = [](void* data) {
      const Job& j = *static_cast<const Job*>(data);
      const int64_t t = j.omp->thread_num(), count = j.omp->num_threads();
      const int64_t first = j.channels * t / count, last = j.channels * (t + 1) / count;
      if (first < last) (*j.body)(first, last);
    };
    rt.omp.parallel(run, &job, static_cast<unsigned>(threads), 0);
  } else {
    body(int64_t{0}, s.c);
  }
  if (pace != nullptr) {
    const auto end = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> hold(pace_lock());
    pace->record(team, std::chrono::duration<double>(end - start).count());
  }
}

// Loops compiled for this CPU. The library is built without -march flags (it runs wherever
// Paddle does), so a loop written as Kernel::run(args, first, last) over a range [first, last)
// of channels or blocks is also compiled for AVX-512 and for AVX2 + FMA (GCC's target attribute;
// `flatten` compiles everything it calls for that target too), and run_ranges picks the widest
// one this CPU has. The library is built with -ffp-contract=off, so no build fuses a multiply
// and an add: every build rounds exactly as the baseline does, bit for bit (vector width
// changes no result, the order of the sums is the code's own).
using RangeFn = void (*)(const void* args, int64_t first, int64_t last);

template <class Kernel>
__attribute__((target("avx512f,avx2,fma"), flatten)) void run_avx512(const void* args,
                                                                      int64_t first,
                                                                      int64_t last) {
  Kernel::run(*static_cast<const typename Kernel::Args*>(args), first, last);
}

template <class Kernel>
__attribute__((target("avx2,fma"), flatten)) void run_avx2(const void* args, int64_t first,
                                                            int64_t last) {
  Kernel::run(*static_cast<const typename Kernel::Args*>(args), first, last);
}

template <class Kernel>
void run_baseline(const void* args, int64_t first, int64_t last) {
  Kernel::run(*static_cast<const typename Kernel::Args*>(args), first, last);
}

RangeFn for_this_cpu(RangeFn avx512, RangeFn avx2, RangeFn baseline);

// Kernel::run over the ranges for_channel_ranges gives for `pace` (its c counts the ranges'
// units: channels or blocks), in the build for this CPU.
template <class Kernel>
void run_ranges(int pass, const BnShape& pace, const typename Kernel::Args& args) {
  static const RangeFn fn =
      for_this_cpu(run_avx512<Kernel>, run_avx2<Kernel>, run_baseline<Kernel>);
  for_channel_ranges(pass, pace, [&](int64_t first, int64_t last) { fn(&args, first, last); });
}

// y = scale·x̂ + shift, the one expression the forward and the ReLU masks of the backward use.
inline float bn_out(float h, float a, float b) { return h * a + b; }

// v if open, else +0, without a branch: `open ? v : 0` compiles to a jump that a ReLU mask
// mispredicts half the time (10x slower than the rest of the loop), and blocks vectorisation.
inline float keep_if(bool open, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= 0u - static_cast<uint32_t>(open);
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// y = batch norm of x (then ReLU if kRelu) with the batch's statistics; writes each channel's
// mean to mp and 1/sqrt(σ² + eps) to r. yp may be xp (in place). Defined in batch_norm.cc, which
// instantiates <true> for the body.
template <bool kRelu>
void bn_forward(const BnShape& s, const float* xp, const float* a, const float* b, float eps,
                float* yp, float* mp, float* r);

// The same on the channel-blocked layout nChw{B}c (s.c counts channels, a multiple of B): the
// B channels of a block side by side in the B lanes of each loop. Defined in batch_norm.cc,
// which instantiates <B, true> for the body.
template <int B, bool kRelu>
void bn_forward_blocked(const BnShape& s, const float* xp, const float* a, const float* b,
                        float eps, float* yp, float* mp, float* r);

}  // namespace fastconv
